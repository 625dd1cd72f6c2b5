"""k8s/observability offline: the PodMonitors point at ports the pods have, the rules pass
`promtool check rules` and `promtool test rules`, and the dashboard and the alerts use only
metrics the code exports and documents. tests/integration/test_observability_ray.py runs the
same rules and every dashboard query on a real Prometheus scraping a real router and controller.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers.manifests import K8S, OBSERVABILITY, find, pod_groups, ports, ray_container, render, serve_config

RULES_TEST = Path(__file__).with_name("prometheus-rules.test.yaml")
GRAFANA_MACROS = {"$__rate_interval"}  # what dashboard queries may use beyond PromQL


def dashboard() -> dict:
    return json.loads((OBSERVABILITY / "dashboard.json").read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def prometheus_rule() -> dict:
    (rule,) = find(render(OBSERVABILITY), "PrometheusRule")
    return rule


def exported_families() -> dict[str, str]:
    """Every metric the router and the controller can export (all optional families on), named as
    metrics.py documents them (counters with _total): name -> type."""
    from types import SimpleNamespace

    from cluster.state.metrics import AutoscalerMetrics, RouterMetrics

    router, scaler = RouterMetrics(per_expert=True), AutoscalerMetrics(per_expert=True)
    router.watch_engine(lambda: SimpleNamespace(blocks_used=0, blocks_total=1, preemptions=0, running=0, waiting=0))
    return {f.name + ("_total" if f.type == "counter" else ""): f.type
            for registry in (router.registry, scaler.registry) for f in registry.collect()}


def exported_series() -> set[str]:
    """Every series name a query can use."""
    return {name + suffix for name, kind in exported_families().items()
            for suffix in (("_bucket", "_sum", "_count") if kind == "histogram" else ("",))}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(elasticmoe_[a-z_]+)", expr))


def test_shapes_of_the_monitoring_objects():
    objects = render(OBSERVABILITY)
    assert {o["kind"] for o in objects} == {"PodMonitor", "PrometheusRule", "ConfigMap"}
    for o in objects:
        assert o["apiVersion"] == ("v1" if o["kind"] == "ConfigMap" else "monitoring.coreos.com/v1")
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "elasticmoe"
    for pm in find(objects, "PodMonitor"):
        spec = pm["spec"]
        assert set(spec) == {"selector", "podMetricsEndpoints"}, "no namespaceSelector: this namespace only"
        for endpoint in spec["podMetricsEndpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "relabelings"}, endpoint
            for r in endpoint.get("relabelings", []):
                assert set(r) <= {"sourceLabels", "targetLabel", "action", "regex", "replacement"}, r
    for group in prometheus_rule()["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"} and rule["labels"]["severity"]
            assert {"summary", "description"} == set(rule["annotations"])
    (cm,) = find(objects, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and json.loads(cm["data"]["dashboard.json"])


def test_pod_monitors_scrape_the_ports_the_code_serves_metrics_on():
    objects = render(K8S / "overlays" / "gpu")
    args = serve_config(objects)["applications"][0]["args"]
    want = {"router": args["router"]["metrics_port"], "head": args["controller"]["autoscaler"]["metrics_port"]}
    scraped = set()
    for pm in find(render(OBSERVABILITY), "PodMonitor"):
        selector = pm["spec"]["selector"]["matchLabels"]
        (endpoint,) = pm["spec"]["podMetricsEndpoints"]
        targets = [g for g in pod_groups(objects).values()
                   if selector.items() <= g["template"]["metadata"]["labels"].items()]
        assert targets, pm["metadata"]["name"]
        for group in targets:
            role = group["template"]["metadata"]["labels"]["elasticmoe.io/role"]
            assert ports(ray_container(group))[endpoint["port"]] == want[role]
            scraped.add(role)
            # the annotations stay for a Prometheus without the operator
            annotations = group["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(want[role])
    assert scraped == {"router", "head"}


def test_dashboard_and_alerts_use_only_exported_documented_metrics():
    from cluster.state import metrics

    documented = set(re.findall(r"^\| `(elasticmoe_[a-z_]+)`", metrics.__doc__, re.M))
    assert documented == set(exported_families()), "metrics.py's table and the code disagree"
    rules = [r["expr"] for g in prometheus_rule()["spec"]["groups"] for r in g["rules"]]
    used = set().union(*(metric_names(e) for _, e in dashboard_queries()), *(metric_names(e) for e in rules))
    assert used - exported_series() == set(), "queried but never exported"
    # what the issue asks the dashboard to show
    text = " ".join(e for _, e in dashboard_queries())
    for needed in ("generated_tokens", "ttft", "itl", "sequences", "kv_blocks", "routed_pairs", "imbalance",
                   "replicas", "rebalances_total", "rebalance_seconds", "group_utilization", "forward_seconds",
                   "forward_failures"):
        assert f"elasticmoe_{needed}" in text, needed


def test_dashboard_queries_use_only_known_variables():
    for title, expr in dashboard_queries():
        assert set(re.findall(r"\$\{?\w+\}?", expr)) <= GRAFANA_MACROS, title
    assert all(p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
               for p in dashboard()["panels"] if p["type"] != "row")


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make prometheus` installs it (Debian package prometheus)")
    return path


def test_promtool_checks_and_unit_tests_the_rules(tmp_path, promtool):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(prometheus_rule()["spec"], sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    for args in (["check", "rules", "rules.yaml"], ["test", "rules", RULES_TEST.name]):
        done = subprocess.run([promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
    # every alert has a case; and the cases can fail: a threshold moved breaks them
    alerts = {r["alert"] for g in prometheus_rule()["spec"]["groups"] for r in g["rules"]}
    assert alerts <= set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    broken = (tmp_path / "rules.yaml").read_text().replace("elasticmoe_imbalance > 1.5", "elasticmoe_imbalance > 2")
    (tmp_path / "rules.yaml").write_text(broken)
    done = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "ElasticMoEImbalanceHigh" in done.stdout + done.stderr
