"""The dashboard and the alert rules under k8s/components/monitoring/ only use metrics (and labels) the service exports;
with promtool (Debian package `prometheus`) every expression must also parse."""

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, base_settings, call_asgi
from prometheus_client.parser import text_string_to_metric_families

from inference.app import build_app

MONITORING = ROOT / "k8s" / "components" / "monitoring"
NAME = re.compile(r"\binference_[a-z_]+\b")
SELECTOR = re.compile(r"(inference_[a-z_]+)\{([^}]*)\}")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")
# Labels Prometheus adds at scrape time, and the histogram bucket label.
SCRAPE_LABELS = {"job", "instance", "le"}


def dashboard_expressions(variables=True):
    """The panels' PromQL, and (with `variables`) the template variables' Grafana queries."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    if variables:
        exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_expressions():
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    return [r["expr"] for group in rules["groups"] for r in group["rules"]]


@pytest.fixture(scope="module")
def exported(engine, redis_server):
    """Family name -> label names, from a real app's /metrics (with Redis, so that every family exists)."""
    app = build_app(base_settings(redis_url=redis_server.url), engine=engine)
    text = asyncio.run(call_asgi(app, "GET", "/metrics")).body.decode()
    families = {}
    for family in text_string_to_metric_families(text):
        labels = {label for sample in family.samples for label in sample.labels}
        families[family.name] = labels
    # Families with labels but no samples yet still declare their labels in the service.
    metrics = app.service.metrics
    for collector in (metrics.requests, metrics.duration, metrics.errors, metrics.model_info, metrics.engine_restarts):
        families.setdefault(collector._name.removesuffix("_total"), set()).update(collector._labelnames)
    return families


def family_of(name):
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_metric_and_label_used_is_exported(exported, source):
    exprs = dashboard_expressions() if source == "dashboard" else rule_expressions()
    assert exprs
    used = {family_of(n) for e in exprs for n in NAME.findall(e)}
    assert used, "no inference_ metric used"
    assert used <= set(exported), used - set(exported)
    for expr in exprs:
        for name, matchers in SELECTOR.findall(expr):
            labels = {m.split("=")[0].strip().rstrip("!~") for m in matchers.split(",") if m.strip()}
            unknown = labels - exported[family_of(name)] - SCRAPE_LABELS
            assert not unknown, f"{name} has no label {unknown} ({expr})"


def test_the_dashboard_covers_what_operators_ask_for():
    exprs = " ".join(dashboard_expressions())
    for needed in ("inference_http_requests_total", 'status=~"5..', "histogram_quantile(0.99",
                   "inference_time_to_first_token_seconds_bucket", "inference_tokens_total",
                   'result="hit"', "inference_rate_limited_total", "inference_queue_depth",
                   "inference_requests_in_flight", "count(inference_model_info"):
        assert needed in exprs, needed


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(not PROMTOOL and not os.environ.get("CI"), reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_the_rules_and_every_dashboard_expression(tmp_path):
    assert PROMTOOL, "CI installs promtool (Debian package prometheus)"
    subprocess.run([PROMTOOL, "check", "rules", str(MONITORING / "prometheus-rules.yaml")], check=True,
                   capture_output=True)
    # Dashboard expressions, with Grafana's variables filled in, as recording rules promtool can parse.
    records = [{"record": f"dashboard:expr{i}", "expr": e.replace("$__rate_interval", "5m").replace("$job", ".*")}
               for i, e in enumerate(dashboard_expressions(variables=False))]
    rules = Path(tmp_path, "dashboard.yaml")
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_readme_lists_exactly_the_exported_metrics(exported):
    table = (ROOT / "README.md").read_text().split("### Metrics", 1)[1].split("###", 1)[0]
    listed = {family_of(name) for name in re.findall(r"^\| `(inference_[a-z_]+)`", table, re.MULTILINE)}
    assert listed == {family_of(name) for name in exported}


def test_the_prometheus_operator_rules_are_the_plain_rules():
    plain = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    resource = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == plain["groups"]
