"""The deployment files as a cluster and Compose would read them: every overlay renders (kubectl kustomize) into
what the README promises, and every setting they pass is one the service accepts.

kubectl is on our machines; elsewhere these tests are skipped, except in CI, which has it. The linters
(kubernetes-validate, checkov, hadolint, compose) run in scripts/check_deploy.py, called by .ci/run.
"""

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from inference.config import ConfigError, Settings

KUBECTL = shutil.which("kubectl")
if not KUBECTL and not os.environ.get("CI"):
    pytest.skip("kubectl is not installed", allow_module_level=True)
sys.path.insert(0, str(ROOT / "scripts"))
import manifests  # noqa: E402  (scripts/manifests.py: every overlay with every component set)

# Variables the OpenTelemetry SDK reads itself (not Settings fields).
OTEL_SDK = {"OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}


def render(overlay):
    result = subprocess.run([KUBECTL, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                            capture_output=True, text=True, check=True, timeout=60)
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.fixture(scope="module", params=["dev", "staging", "prod"])
def rendered(request):
    return request.param, render(request.param)


def container(objects, name="inference"):
    return objects[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]


def config(objects):
    (data,) = [o["data"] for (kind, name), o in objects.items() if kind == "ConfigMap" and
               name.startswith("inference-config")]
    return data


def test_every_setting_is_one_the_service_accepts(rendered, tmp_path):
    overlay, objects = rendered
    env = dict(config(objects))
    unknown = set(env) - {f.upper() for f in Settings.__dataclass_fields__} - OTEL_SDK
    assert not unknown, f"{overlay}: not settings of the service: {unknown}"
    if env.get("API_KEYS_FILE"):
        keys = tmp_path / "keys"
        keys.write_text("a-key-for-the-test\n")
        env["API_KEYS_FILE"] = str(keys)  # the Secret's mount, here
    if env.get("REDIS_PASSWORD_FILE"):
        password = tmp_path / "password"
        password.write_text("a-password-for-the-test\n")
        env["REDIS_PASSWORD_FILE"] = str(password)
    env["N_THREADS"] = "2"  # from the Downward API (limits.cpu)
    try:
        Settings.from_env(env, env_file=None)
    except ConfigError as exc:
        pytest.fail(f"{overlay}: {exc}")


def test_pods_are_hardened_and_probed(rendered):
    overlay, objects = rendered
    for name in ("inference", "redis"):
        pod = objects[("Deployment", name)]["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        c = pod["containers"][0]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]
        assert c["image"].split(":")[-1] not in ("latest", c["image"]), f"{overlay}: {c['image']} is not pinned"
    c = container(objects)
    assert c["startupProbe"]["httpGet"]["path"] == c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # model load on a cold node
    assert {"mountPath": "/tmp", "name": "tmp"} in c["volumeMounts"]
    pod = objects[("Deployment", "inference")]["spec"]["template"]["spec"]
    # The service drains itself (serving while /ready says 503, then finishing what is in flight): no preStop
    # sleep, and a grace period longer than both phases.
    assert "lifecycle" not in c
    config = dict(line.split("=", 1) for line in (ROOT / "k8s/base/config.env").read_text().splitlines()
                  if line and not line.startswith("#"))
    drain = float(config["DRAIN_DELAY_SECONDS"]) + float(config["SHUTDOWN_TIMEOUT_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > drain + 5
    assert ("ServiceAccount", "inference") in objects and pod["serviceAccountName"] == "inference"
    assert ("PodDisruptionBudget", "inference") in objects
    assert {("NetworkPolicy", "inference"), ("NetworkPolicy", "redis")} <= set(objects)


def test_dev_is_one_replica_with_debug_logs_and_no_autoscaler():
    objects = render("dev")
    assert objects[("Deployment", "inference")]["spec"]["replicas"] == 1
    assert config(objects)["LOG_LEVEL"] == "DEBUG"
    assert not [k for k in objects if k[0] == "HorizontalPodAutoscaler"]
    assert all(v["name"] != "api-keys" for v in objects[("Deployment", "inference")]["spec"]["template"]["spec"]["volumes"])


def test_staging_runs_two_replicas():
    objects = render("staging")
    assert objects[("Deployment", "inference")]["spec"]["replicas"] == 2
    assert not [k for k in objects if k[0] == "HorizontalPodAutoscaler"]


def test_prod_autoscales_behind_tls_spread_over_zones():
    objects = render("prod")
    deployment = objects[("Deployment", "inference")]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    hpa = objects[("HorizontalPodAutoscaler", "inference")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"]}
    assert targets == {"cpu": 70, "memory": 80}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    ingress = objects[("Ingress", "inference")]
    assert ingress["spec"]["tls"][0]["secretName"] and ingress["spec"]["tls"][0]["hosts"]
    pod = deployment["spec"]["template"]["spec"]
    assert {t["topologyKey"] for t in pod["topologySpreadConstraints"]} == {"topology.kubernetes.io/zone",
                                                                           "kubernetes.io/hostname"}
    c = container(objects)
    assert c["resources"]["requests"] == c["resources"]["limits"]  # Guaranteed QoS
    assert {"name": "api-keys", "mountPath": "/etc/inference/api-keys", "readOnly": True} in c["volumeMounts"]


def test_compose_settings_are_ones_the_service_accepts():
    compose = yaml.safe_load((ROOT / "compose.yml").read_text())
    app = compose["services"]["app"]
    env = {k: str(v).split(":-", 1)[-1].rstrip("}") if str(v).startswith("${") else str(v)
           for k, v in app["environment"].items()}
    assert set(env) - {f.upper() for f in Settings.__dataclass_fields__} - OTEL_SDK == set()
    Settings.from_env(env, env_file=None)
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in compose["services"]["redis"]
    assert app["read_only"] and app["cap_drop"] == ["ALL"]


def objects_of(text):
    return [o for o in yaml.safe_load_all(text) if o]


@pytest.mark.parametrize("overlay", manifests.OVERLAYS)
@pytest.mark.parametrize("component_set", manifests.COMPONENT_SETS, ids=lambda c: "+".join(c) or "alone")
def test_every_rendering_meets_pod_security_restricted(overlay, component_set):
    """Every overlay enforces `restricted` on its namespace: each pod it renders, with any documented set of
    components (the vLLM Deployment of gpu-upstream included), must be admitted."""
    objects = objects_of(manifests.render(overlay, component_set, kubectl=KUBECTL))
    namespaces = [o for o in objects if o["kind"] == "Namespace"]
    assert [n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] for n in namespaces] == ["restricted"]
    assert manifests.restricted_violations(objects) == []


def test_the_restricted_check_refuses_what_admission_would():
    def deployment(pod_security, container_security):
        return {"kind": "Deployment", "metadata": {"name": "x", "namespace": "ns"}, "spec": {"template": {"spec": {
            "securityContext": pod_security, "volumes": [{"name": "v", "emptyDir": {}}],
            "containers": [{"name": "c", "securityContext": container_security}]}}}}
    namespace = {"kind": "Namespace", "metadata": {"name": "ns",
                                                   "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    good_pod = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    good = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert manifests.restricted_violations([namespace, deployment(good_pod, good)]) == []
    root = deployment({"seccompProfile": {"type": "RuntimeDefault"}}, good)  # the vLLM Deployment before
    assert manifests.restricted_violations([namespace, root]) == ["Deployment/x container c: runAsNonRoot is not true"]
    assert manifests.restricted_violations([root]) == []  # no namespace that enforces it
    escalating = deployment(good_pod, {"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}})
    assert len(manifests.restricted_violations([namespace, escalating])) == 2
    host = deployment(good_pod, good)
    host["spec"]["template"]["spec"]["volumes"] = [{"name": "h", "hostPath": {"path": "/"}}]
    assert manifests.restricted_violations([namespace, host]) == ["Deployment/x: volume h is a hostPath"]


@pytest.mark.parametrize("overlay", manifests.OVERLAYS)
def test_keda_queries_count_the_overlays_own_pods(overlay):
    objects = objects_of(manifests.render(overlay, ("autoscaling-keda",), kubectl=KUBECTL))
    (namespace,) = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    (scaled,) = [o for o in objects if o["kind"] == "ScaledObject"]
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    assert len(queries) == 2
    for query in queries:
        assert f'{{namespace="{namespace}"}}' in query, query


def routed(ingress, path):
    """Whether an Ingress sends `path` anywhere (Kubernetes' matching: Exact, or Prefix by whole path elements)."""
    for rule in ingress["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            prefix = entry["path"]
            if entry["pathType"] == "Exact" and path == prefix:
                return True
            if entry["pathType"] in ("Prefix", "ImplementationSpecific") and (
                    path == prefix or path.startswith(prefix.rstrip("/") + "/")):
                return True
    return False


def test_only_the_api_is_reachable_through_the_ingress():
    """The internet gets the API (the paths API keys protect); metrics and probes stay in the cluster, docs and
    the playground are opt-in (off in the cluster's settings, not routed)."""
    from inference.middleware.auth import PROTECTED_PREFIXES

    objects = render("prod")
    ingress = objects[("Ingress", "inference")]
    public = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/x", "/api/v1/infer",
              "/api/v1/model", "/tokenize", "/detokenize"]
    assert all(path.startswith(PROTECTED_PREFIXES) for path in public)
    for path in public:
        assert routed(ingress, path), path
    for path in ("/metrics", "/health", "/ready", "/", "/docs", "/docs/swagger-ui.css", "/openapi.json",
                 "/playground", "/v1x", "/tokenize/x"):
        assert not routed(ingress, path), f"{path} is reachable through the ingress"
    for overlay in ("staging", "prod"):
        assert config(render(overlay))["DOCS_ENABLED"] == "false"
    assert config(render("dev"))["DOCS_ENABLED"] == "true"


@pytest.mark.parametrize("overlay", manifests.OVERLAYS)
def test_redis_needs_the_password_the_service_gets_from_the_same_secret(overlay):
    objects = render(overlay)

    def secret_mount(name):
        """The Secret a Deployment mounts (as files, not environment variables) and where."""
        pod = objects[("Deployment", name)]["spec"]["template"]["spec"]
        (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName", "").startswith("redis-auth")]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        return volume["secret"]["secretName"], mount["mountPath"]

    secret, path = secret_mount("redis")
    redis = container(objects, "redis")
    assert f'--requirepass "$(cat {path}/password)"' in redis["args"][0]
    assert f"{path}/password" in " ".join(redis["readinessProbe"]["exec"]["command"])  # redis-cli must AUTH too
    service_secret, service_path = secret_mount("inference")
    assert service_secret == secret
    settings = config(objects)
    assert settings["REDIS_PASSWORD_FILE"] == f"{service_path}/password"
    assert "@" not in settings["REDIS_URL"]  # no credentials in a ConfigMap
    generated = [name for kind, name in objects if kind == "Secret"]
    # dev generates its own; staging and prod use one made outside git (README "Kubernetes").
    assert (secret in generated) == (overlay == "dev")
