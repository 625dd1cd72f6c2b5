"""The operators' view for real: a Prometheus server (the Debian package's binary) scrapes a real
router and a real controller, loads the alerts, and answers every query of the Grafana dashboard.

    local Ray: controller + 2 expert groups (tiny checkpoint), Redis, a router in this process
    prometheus on 127.0.0.1 (free port, temp config and storage): scrape both /metrics every 1 s,
        rule_files = the PrometheusRule's spec (k8s/observability/prometheusrule.yaml)
    traffic: Generate through the client API core (TTFT, ITL, tokens, Forward), one `moectl scale`
        (a rebalance: its count and duration)
    -> every dashboard query returns series, the ones over that traffic a finite positive value;
       every rule evaluates without error and none fires on a healthy cluster.
"""
from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest
import ray
import yaml
from elasticmoe.v1 import serving_pb2

from cluster.state.redis_server import EmbeddedRedis, free_port
from helpers.cluster import FAST, Cluster
from helpers.manifests import OBSERVABILITY, find, render
from helpers.traffic import wait_for

RATE_INTERVAL = "1m"  # Grafana's $__rate_interval, as it would be at a 15 s scrape interval
# Queries over what the test's traffic and rebalance produced: these must have a finite value > 0.
EXERCISED = ("generated_tokens", "ttft_seconds", "itl_seconds", "forward_seconds", "routed_pairs",
             "rebalance_seconds", "weight_bytes_moved")


class Prometheus:
    """A prometheus server on loopback, started and stopped by pid."""

    def __init__(self, workdir, targets: dict[str, str], rules: dict):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: `make prometheus` installs it (Debian package prometheus)")
        (workdir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        (workdir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in targets.items()]}))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"], cwd=workdir, stdout=self.log,
            stderr=subprocess.STDOUT)
        wait_for(self._ready, 30, what="prometheus to be ready")

    def _ready(self) -> bool:
        assert self.process.poll() is None, "prometheus exited: see prometheus.log"
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((OBSERVABILITY / "dashboard.json").read_text())
    return [(p["title"], t["expr"].replace("$__rate_interval", RATE_INTERVAL))
            for p in dashboard["panels"] for t in p.get("targets", [])]


async def _generate(router, prompt: list[int], max_tokens: int) -> int:
    n = 0
    async for reply in router.api.generate(serving_pb2.GenerateRequest(token_ids=prompt, max_tokens=max_tokens)):
        n += len(reply.token_ids)
    return n


def test_dashboard_and_alerts_on_a_real_prometheus(local_ray, tiny_checkpoint, tmp_path):
    with EmbeddedRedis() as redis:
        cluster = Cluster(tiny_checkpoint, redis.url, 2, {**FAST, "enabled": False})
        prometheus = None
        try:
            controller_metrics = ray.get(cluster.controller.__ray_call__.remote(lambda self: self.metrics_address))
            (rule,) = find(render(OBSERVABILITY), "PrometheusRule")
            prometheus = Prometheus(tmp_path, {"elasticmoe-router": cluster.router.metrics_address,
                                               "elasticmoe-controller": controller_metrics}, rule["spec"])
            wait_for(lambda: len(prometheus.query("up == 1")) == 2, 30, what="both targets scraped")

            async def traffic():
                return await asyncio.gather(*(_generate(cluster.router, [5 + i, 17, 42, 99], 8) for i in range(4)))
            assert sum(asyncio.run(traffic())) > 4
            layer = cluster.spec.sparse_layers[0]
            assert ray.get(cluster.controller.scale.remote(layer, 0, 2), timeout=60)["result"] != "failed"

            def answered() -> dict[str, list[dict]]:
                results = {f"{title}: {expr}": prometheus.query(expr) for title, expr in dashboard_queries()}
                return results if all(results.values()) else {}
            results = wait_for(answered, 30, poll_s=1.0, what="every dashboard query to return series")
            for name, series in results.items():
                if any(m in name for m in EXERCISED):
                    values = [float(s["value"][1]) for s in series]
                    assert any(math.isfinite(v) and v > 0 for v in values), (name, values)
            # the stall alert pairs counters by their labels: on real label sets that leaves one series at 0
            in_progress = prometheus.query('sum without (result) (elasticmoe_rebalances_total{result="started"}) - '
                                           'sum without (result) (elasticmoe_rebalances_total{result!="started"})')
            assert [float(s["value"][1]) for s in in_progress] == [0.0]

            def evaluated() -> list[dict]:
                rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
                return rules if rules and all(r["lastEvaluation"] > "2000" for r in rules) else []
            rules = wait_for(evaluated, 20, what="every rule evaluated")
            assert {r["name"] for r in rules} == {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
            assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
            assert prometheus.api("alerts")["alerts"] == [], "a healthy cluster raises no alert"
        finally:
            if prometheus is not None:
                prometheus.stop()
            cluster.close()
