"""Prometheus metrics of the router and the autoscaler, each on its own HTTP port.

Label cardinality stays bounded: series are per layer (L), per group (G) or per
rebalance result; per-(layer, expert) series (L*E: 14,848 for DeepSeek-V3) appear only
with per_expert=True. Each process has its own registry, so two components in one
process (tests, `moectl serve`) never collide.

| metric | type | labels | from |
|---|---|---|---|
| `elasticmoe_routed_pairs_total` | counter | layer | router: (token, expert) pairs routed |
| `elasticmoe_expert_routed_pairs_total` | counter | layer, expert | router, per_expert only |
| `elasticmoe_forward_seconds` | histogram | group | router: one Forward RPC, by group address (host:port; ids shift when a group is dropped) |
| `elasticmoe_forward_failures_total` | counter | group | router: Forward RPCs that failed |
| `elasticmoe_forward_slow_total` | counter | group | router: Forward RPCs given up after `forward_slow_s`, their pairs moved to another replica |
| `elasticmoe_router_placement_version` | gauge | | router: the placement in use |
| `elasticmoe_telemetry_dropped_total` | counter | | router: load batches lost while Redis was down |
| `elasticmoe_placement_refused_total` | counter | | router: placements in Redis refused (not signed by this cluster's controller, malformed, not this model's) |
| `elasticmoe_background_errors_total` | counter | task | router: rounds of a background task (telemetry, health-groups, health-redis) that raised; the task runs on |
| `elasticmoe_kv_blocks` | gauge | state (used, total) | router: KV cache blocks of the pool |
| `elasticmoe_kv_preemptions_total` | counter | | router: sequences preempted for KV blocks (recomputed later) |
| `elasticmoe_sequences` | gauge | state (running, waiting) | router: sequences holding KV blocks, and queued |
| `elasticmoe_generated_tokens_total` | counter | | router: tokens streamed to clients by Generate |
| `elasticmoe_ttft_seconds` | histogram | | router: a Generate's first token, from the call reaching the replica (queueing included) |
| `elasticmoe_itl_seconds` | histogram | | router: time between a Generate's successive streamed tokens |
| `elasticmoe_expert_load` | gauge | layer, expert | autoscaler, per_expert only: pairs/s over the window |
| `elasticmoe_expert_replicas` | gauge | layer, expert | autoscaler, per_expert only |
| `elasticmoe_layer_max_expert_load` | gauge | layer | autoscaler: the hottest expert's pairs/s |
| `elasticmoe_replicas` | gauge | | autoscaler: replicas over all layers and experts |
| `elasticmoe_replicated_experts` | gauge | | autoscaler: experts with more than one replica |
| `elasticmoe_group_utilization` | gauge | group | autoscaler: busy fraction over the window |
| `elasticmoe_group_forwards_total` | counter | group | autoscaler: Forward calls a group served (from its Stats) |
| `elasticmoe_group_kernel_calls_total` | counter | group | autoscaler: its expert kernel calls: fewer than its Forwards when calls were coalesced |
| `elasticmoe_group_coalesced_forwards_total` | counter | group | autoscaler: its Forwards answered by a kernel call that also served another |
| `elasticmoe_imbalance` | gauge | | autoscaler: observed max/mean group load, in pairs or, with touch_cost, pairs + touch_cost x touches (1.0 = balanced) |
| `elasticmoe_planned_imbalance` | gauge | | autoscaler: what the last plan expected |
| `elasticmoe_groups` | gauge | | autoscaler: expert groups serving |
| `elasticmoe_placement_version` | gauge | | autoscaler: the published placement |
| `elasticmoe_rebalances_total` | counter | result | autoscaler: started, finished, partial (published, routers not drained in time), failed (rolled back) |
| `elasticmoe_rebalance_seconds` | histogram | | autoscaler: start to finish of a rebalance |
| `elasticmoe_weights_moved_total` | counter | | autoscaler: expert replicas loaded onto a group |
| `elasticmoe_weight_bytes_moved_total` | counter | | autoscaler: their bytes |
| `elasticmoe_group_changes_total` | counter | direction | autoscaler: groups added (up), not added (up_failed), removed (down), lost for good (lost) |
| `elasticmoe_group_restarts_total` | counter | group | autoscaler: a group Ray restarted, started again and re-published by the controller |
| `elasticmoe_experts_without_live_replica` | gauge | | autoscaler: (layer, expert) pairs whose every replica is on a group that did not answer Stats in the last round |
| `elasticmoe_gpu_request_bundles` | gauge | | autoscaler: GPU bundles asked of the Ray autoscaler (`request_resources`), 0 when none is pending |

Series with a label are created at zero as soon as their label value is known (a group in the
placement, a rebalance result, a direction), so a query over them returns series before the
first failure and `rate()`/`increase()` count the first event.
"""
from __future__ import annotations

import logging
import socket
import sys
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# A first token waits for the queue and the prompt's prefill: seconds, up to a minute under overload.
_TTFT_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_SECONDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
REBALANCE_RESULTS = ("started", "finished", "partial", "failed")
GROUP_CHANGES = ("up", "up_failed", "down", "lost")
# prometheus_client's own server takes every connection on a thread of its own and waits on it for
# ever: a few hundred idle sockets cost a process as many threads. A scrape is one short request.
MAX_METRICS_CONNECTIONS = 16  # at once; more are closed at once
METRICS_SOCKET_TIMEOUT_S = 10.0  # Prometheus' default scrape_timeout: a connection silent longer is dropped


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_SOCKET_TIMEOUT_S  # StreamRequestHandler.setup() puts it on the connection

    def log_message(self, format, *args):  # one line per scrape is noise
        pass


class BoundedMetricsServer(ThreadingMixIn, WSGIServer):
    """/metrics over HTTP with at most max_connections at once and a socket timeout on each."""

    daemon_threads = True

    def __init__(self, host: str, port: int, max_connections: int, timeout_s: float):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0  # connections closed at once because max_connections were open
        super().__init__((host, port), type("Handler", (_QuietHandler,), {"timeout": timeout_s}))

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # hands the connection to a new thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (TimeoutError, ConnectionError)):  # a slow or gone client is no bug
            super().handle_error(request, client_address)


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1",
                  max_connections: int = MAX_METRICS_CONNECTIONS,
                  timeout_s: float = METRICS_SOCKET_TIMEOUT_S) -> tuple[BoundedMetricsServer, str]:
    """Start the /metrics HTTP server on a daemon thread; (server, "host:port"). Loopback unless host says
    otherwise (0.0.0.0 where Prometheus scrapes pods). port 0 picks a free one; a taken port falls back to
    a free one (two routers on one node), with a log line naming both."""
    try:
        server = BoundedMetricsServer(host, port, max_connections, timeout_s)
    except OSError as e:
        if port == 0:
            raise
        log.warning("metrics port %d is taken (%s); serving metrics on a free port instead", port, e)
        server = BoundedMetricsServer(host, 0, max_connections, timeout_s)
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server, f"{f'[{host}]' if ':' in host else host}:{server.server_port}"  # host:port, IPv6 bracketed


class RouterMetrics:
    def __init__(self, per_expert: bool = False, sparse_layers=()):
        """sparse_layers: the MoE layers, whose load series exist (at 0) from the start."""
        self.registry = r = CollectorRegistry()
        self.per_expert = per_expert
        self.routed = Counter("elasticmoe_routed_pairs", "(token, expert) pairs routed", ["layer"], registry=r)
        self.expert_routed = (Counter("elasticmoe_expert_routed_pairs", "(token, expert) pairs routed per expert",
                                      ["layer", "expert"], registry=r) if per_expert else None)
        self.forward_seconds = Histogram("elasticmoe_forward_seconds", "Forward RPC latency by expert group",
                                         ["group"], buckets=_SECONDS, registry=r)
        self.forward_failures = Counter("elasticmoe_forward_failures", "Forward RPCs that failed", ["group"],
                                        registry=r)
        self.forward_slow = Counter("elasticmoe_forward_slow", "Forward RPCs given up after forward_slow_s, their "
                                    "pairs moved to another replica", ["group"], registry=r)
        self.placement_version = Gauge("elasticmoe_router_placement_version", "placement version in use",
                                       registry=r)
        for layer in sparse_layers:
            self.routed.labels(str(layer))
        self.telemetry_dropped = Counter("elasticmoe_telemetry_dropped", "load batches lost while Redis was down",
                                         registry=r)
        self.placement_refused = Counter("elasticmoe_placement_refused", "placements in Redis refused: unsigned, "
                                         "forged or malformed", registry=r)
        self.background_errors = Counter("elasticmoe_background_errors", "rounds of a background task that raised",
                                         ["task"], registry=r)
        self.generated_tokens = Counter("elasticmoe_generated_tokens", "tokens streamed by Generate", registry=r)
        self.ttft = Histogram("elasticmoe_ttft_seconds", "time to a Generate's first token", buckets=_TTFT_SECONDS,
                              registry=r)
        self.itl = Histogram("elasticmoe_itl_seconds", "time between a Generate's streamed tokens",
                             buckets=_ITL_SECONDS, registry=r)

    def on_background_error(self, task: str) -> None:
        self.background_errors.labels(task).inc()

    def watch_engine(self, stats) -> None:
        """Engine figures read at scrape time from stats() (an object with blocks_used, blocks_total,
        preemptions, running, waiting): nothing to update in the step loop."""
        self.registry.register(_EngineCollector(stats))

    def on_load(self, counts: dict[tuple[int, int], int]) -> None:
        by_layer: dict[int, int] = {}
        for (layer, expert), n in counts.items():
            by_layer[layer] = by_layer.get(layer, 0) + n
            if self.expert_routed is not None:
                self.expert_routed.labels(str(layer), str(expert)).inc(n)
        for layer, n in by_layer.items():
            self.routed.labels(str(layer)).inc(n)

    def on_tokens(self, num_tokens: int, since_previous_s: float, first: bool) -> None:
        """A Generate streamed num_tokens tokens since_previous_s after its previous ones (after its start
        when first). One observation per streamed message: the engine sends one token per step."""
        self.generated_tokens.inc(num_tokens)
        (self.ttft if first else self.itl).observe(since_previous_s)

    def on_placement(self, version: int, groups) -> None:
        """The placement in use (its group addresses); every group's Forward series exist (at 0) from here on."""
        self.placement_version.set(version)
        for group in groups:
            for family in (self.forward_seconds, self.forward_failures, self.forward_slow):
                family.labels(str(group))

    def on_forward(self, group: str, seconds: float, outcome: str) -> None:
        """outcome: "ok", "failed", or "slow" (given up after forward_slow_s and moved)."""
        self.forward_seconds.labels(str(group)).observe(seconds)
        if outcome == "failed":
            self.forward_failures.labels(str(group)).inc()
        elif outcome == "slow":
            self.forward_slow.labels(str(group)).inc()


class _EngineCollector:
    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        s = self.stats()
        blocks = GaugeMetricFamily("elasticmoe_kv_blocks", "KV cache blocks of the pool", labels=["state"])
        blocks.add_metric(["used"], s.blocks_used)
        blocks.add_metric(["total"], s.blocks_total)
        preempted = CounterMetricFamily("elasticmoe_kv_preemptions", "sequences preempted for KV blocks")
        preempted.add_metric([], s.preemptions)
        sequences = GaugeMetricFamily("elasticmoe_sequences", "sequences running and waiting", labels=["state"])
        sequences.add_metric(["running"], s.running)
        sequences.add_metric(["waiting"], s.waiting)
        return [blocks, preempted, sequences]


class AutoscalerMetrics:
    def __init__(self, per_expert: bool = False):
        self.registry = r = CollectorRegistry()
        self.per_expert = per_expert
        self.expert_load = (Gauge("elasticmoe_expert_load", "pairs/s per expert over the window",
                                  ["layer", "expert"], registry=r) if per_expert else None)
        self.expert_replicas = (Gauge("elasticmoe_expert_replicas", "replicas per expert", ["layer", "expert"],
                                      registry=r) if per_expert else None)
        self.layer_max_load = Gauge("elasticmoe_layer_max_expert_load", "the hottest expert's pairs/s", ["layer"],
                                    registry=r)
        self.replicas = Gauge("elasticmoe_replicas", "expert replicas over all layers", registry=r)
        self.replicated = Gauge("elasticmoe_replicated_experts", "experts with more than one replica", registry=r)
        self.utilization = Gauge("elasticmoe_group_utilization", "group busy fraction over the window", ["group"],
                                 registry=r)
        self.group_forwards = Counter("elasticmoe_group_forwards", "Forward calls a group served", ["group"],
                                      registry=r)
        self.group_kernel_calls = Counter("elasticmoe_group_kernel_calls", "expert kernel calls a group made",
                                          ["group"], registry=r)
        self.group_coalesced = Counter("elasticmoe_group_coalesced_forwards", "Forwards answered by a kernel call "
                                       "that also served another", ["group"], registry=r)
        self.imbalance = Gauge("elasticmoe_imbalance", "observed max/mean group load (pairs, or cost with touch_cost)",
                               registry=r)
        self.planned_imbalance = Gauge("elasticmoe_planned_imbalance", "max/mean group load the last plan expected",
                                       registry=r)
        self.groups = Gauge("elasticmoe_groups", "expert groups serving", registry=r)
        self.placement_version = Gauge("elasticmoe_placement_version", "published placement version", registry=r)
        self.rebalances = Counter("elasticmoe_rebalances", "rebalances by result", ["result"], registry=r)
        self.rebalance_seconds = Histogram("elasticmoe_rebalance_seconds", "start to finish of a rebalance",
                                           buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300), registry=r)
        self.weights_moved = Counter("elasticmoe_weights_moved", "expert replicas loaded onto a group", registry=r)
        self.weight_bytes_moved = Counter("elasticmoe_weight_bytes_moved", "bytes of expert replicas loaded",
                                          registry=r)
        self.group_changes = Counter("elasticmoe_group_changes", "groups added or removed", ["direction"],
                                     registry=r)
        self.group_restarts = Counter("elasticmoe_group_restarts", "groups restarted by Ray and re-published",
                                      ["group"], registry=r)
        self.unserved = Gauge("elasticmoe_experts_without_live_replica", "(layer, expert) pairs with no replica on a "
                              "group that answered Stats in the last round", registry=r)
        self.gpu_request_bundles = Gauge("elasticmoe_gpu_request_bundles", "GPU bundles asked of the Ray autoscaler",
                                         registry=r)
        for result in REBALANCE_RESULTS:
            self.rebalances.labels(result)
        for direction in GROUP_CHANGES:
            self.group_changes.labels(direction)
