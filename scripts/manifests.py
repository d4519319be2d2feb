"""The Kubernetes manifests as a cluster would get them: every overlay rendered with `kubectl kustomize`, alone and
with each combination of components the README documents, and the Pod Security Standards' `restricted` profile
checked on every pod that goes into a namespace which enforces it.

Used by scripts/check_deploy.py (which runs the linters on every rendering) and tests/test_deploy.py.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent.parent / "k8s"
OVERLAYS = ("dev", "staging", "prod")
# Each component alone, and together as the README documents them (the two autoscaling components exclude each
# other: both drive the replica count).
COMPONENT_SETS = (
    (),
    ("monitoring",),
    ("autoscaling-load",),
    ("autoscaling-keda",),
    ("gpu-upstream",),
    ("monitoring", "autoscaling-load", "gpu-upstream"),
    ("monitoring", "autoscaling-keda", "gpu-upstream"),
)
POD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}


def components() -> set[str]:
    return {c.name for c in (K8S / "components").iterdir() if (c / "kustomization.yaml").is_file()}


def name(overlay: str, component_set: tuple[str, ...]) -> str:
    return "+".join((overlay, *component_set))


def render(overlay: str, component_set: tuple[str, ...] = (), kubectl: str = "kubectl") -> str:
    """The overlay's YAML with the components listed in its kustomization (replacing any it lists)."""
    with tempfile.TemporaryDirectory(prefix="kustomize-") as tmp:
        tree = Path(tmp) / "k8s"
        shutil.copytree(K8S, tree)
        kustomization_file = tree / "overlays" / overlay / "kustomization.yaml"
        kustomization = yaml.safe_load(kustomization_file.read_text())
        kustomization["components"] = [f"../../components/{c}" for c in component_set]
        if not component_set:
            del kustomization["components"]
        kustomization_file.write_text(yaml.safe_dump(kustomization, sort_keys=False))
        result = subprocess.run([kubectl, "kustomize", str(kustomization_file.parent)], capture_output=True,
                                text=True, timeout=120)
    if result.returncode:
        raise RuntimeError(f"kubectl kustomize {name(overlay, component_set)}: {result.stderr.strip()}")
    return result.stdout


def pod_spec(obj: dict) -> dict | None:
    if obj.get("kind") not in POD_KINDS:
        return None
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    return spec if obj["kind"] == "Pod" else spec.get("template", {}).get("spec", {})


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(objects: list[dict]) -> list[str]:
    """What the `restricted` Pod Security Standard (Kubernetes 1.25+) refuses in pods bound for a namespace
    labelled `pod-security.kubernetes.io/enforce: restricted`: the baseline's host namespaces, privileged
    containers, host paths and ports, added capabilities, unsafe /proc mounts and sysctls; then the restricted
    profile's volume types, privilege escalation, non-root, seccomp and dropped capabilities."""
    enforced = {o["metadata"]["name"] for o in objects if o.get("kind") == "Namespace" and
                o["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") == "restricted"}
    problems = []
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None or obj["metadata"].get("namespace") not in enforced:
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        pod = spec.get("securityContext", {})
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(field):
                problems.append(f"{where}: {field}")
        for volume in spec.get("volumes", []):
            kind = next(k for k in volume if k != "name")
            if kind not in RESTRICTED_VOLUMES:
                problems.append(f"{where}: volume {volume['name']} is a {kind}")
        unsafe = [s["name"] for s in pod.get("sysctls", []) if not s["name"].startswith(("net.ipv4.ip_local_port",
                  "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start",
                  "net.ipv4.ip_local_reserved_ports", "net.ipv4.tcp_keepalive", "net.ipv4.tcp_fin_timeout",
                  "kernel.shm_rmid_forced"))]
        if unsafe:
            problems.append(f"{where}: sysctls {unsafe}")
        containers = [*spec.get("initContainers", []), *spec.get("containers", []),
                      *spec.get("ephemeralContainers", [])]
        for c in containers:
            at = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("privileged"):
                problems.append(f"{at}: privileged")
            if any(p.get("hostPort") for p in c.get("ports", [])):
                problems.append(f"{at}: hostPort")
            if sc.get("procMount", "Default") != "Default":
                problems.append(f"{at}: procMount {sc['procMount']}")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            non_root = sc.get("runAsNonRoot", pod.get("runAsNonRoot"))
            if non_root is not True:
                problems.append(f"{at}: runAsNonRoot is not true")
            if sc.get("runAsUser", pod.get("runAsUser")) == 0:
                problems.append(f"{at}: runAsUser 0")
            seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{at}: seccompProfile is {seccomp or 'unset'}")
            capabilities = sc.get("capabilities", {})
            if "ALL" not in capabilities.get("drop", []):
                problems.append(f"{at}: capabilities do not drop ALL")
            if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
                problems.append(f"{at}: adds capabilities {capabilities['add']}")
    return problems
