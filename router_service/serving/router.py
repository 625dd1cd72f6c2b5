"""Router: everything a router replica holds, built without Serve so tests can use it directly.

    DenseModel (on `device`, in the cluster's dtype) + Engine (paged KV pool) + RemoteExperts
    + PlacementFollower and TelemetryReporter (with Redis) + Prometheus metrics + MoEApi

The dtype is the cluster's: the router checks at start that every group it can reach serves
the one it uses, and refuses to start otherwise with a message naming both; a mismatch never
reaches a Forward (where the group would refuse every call).
"""
from __future__ import annotations

import logging

import torch
from elasticmoe.v1 import serving_pb2

from cluster.checkpoint.reader import Checkpoint, parse_dtype
from cluster.placement.table import PlacementTable
from cluster.state.metrics import RouterMetrics, serve_metrics
from cluster.state.store import ClusterState
from cluster.state.telemetry import Telemetry
from experts.credentials import ExpertCredentials, RouterCredentials
from router_service.engine.engine import Engine
from router_service.model.dense import DenseModel
from router_service.model.tokenizer import Tokenizer
from router_service.serving.api import MoEApi
from router_service.serving.dispatch import RemoteExperts
from router_service.serving.health import HealthCache
from router_service.serving.placement_follower import PlacementFollower
from router_service.serving.router_config import RouterConfig, resolve_device
from router_service.serving.status import build_status
from router_service.serving.telemetry_reporter import TelemetryReporter

log = logging.getLogger(__name__)


class DtypeMismatch(ValueError):
    """The router and an expert group would compute in different dtypes."""


def cluster_dtype(configured: str | None, device: torch.device, stats: dict) -> str:
    """The router's dtype: configured, else what the groups serve, else bf16 on CUDA / fp32 on CPU.
    stats: group address -> StatsResponse (None: did not answer; checked later by the group itself)."""
    served = {address: reply.dtype for address, reply in stats.items() if reply is not None and reply.dtype}
    dtype = configured or next(iter(served.values()), None) or ("bfloat16" if device.type == "cuda" else "float32")
    wrong = {address: d for address, d in served.items() if d != dtype}
    if wrong:
        address, theirs = next(iter(wrong.items()))
        source = "configured" if configured else "what the first group serves"
        raise DtypeMismatch(f"router dtype {dtype} ({source}) but expert group {address} serves {theirs}"
                            f"{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}: a cluster has one "
                            "model dtype; set it once (moectl serve --dtype, ControllerConfig.dtype)")
    return dtype


class Router:
    """Everything a router replica holds; built without Serve so tests can use it directly."""

    def __init__(self, config: RouterConfig, credentials: RouterCredentials | ExpertCredentials | None = None):
        """credentials: the router's share of the cluster's credentials, from the controller
        (router_credentials()); the cluster's own are cut to that share here. None for groups started
        without any (tests, bench): placements in Redis are then adopted unverified."""
        if isinstance(credentials, ExpertCredentials):
            credentials = credentials.for_router()
        checkpoint = Checkpoint(config.checkpoint)
        spec = checkpoint.spec
        device = resolve_device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r} but torch sees no CUDA device here")
        self.metrics = RouterMetrics(config.metrics_per_expert, spec.sparse_layers)
        self.experts = RemoteExperts(spec, PlacementTable.from_json(config.placement), config.forward_timeout_s,
                                     on_forward=self.metrics.on_forward, credentials=credentials,
                                     slow_s=config.forward_slow_s, whole_below=config.whole_expert_below)
        try:
            dtype = cluster_dtype(config.dtype, device, self.experts.group_stats())
            tensors = checkpoint.load_dense(parse_dtype(dtype))  # no expert weights here
            dense = DenseModel(spec, {name: t.to(device) for name, t in tensors.items()})
            del tensors
            self.engine = Engine(dense, self.experts, config.engine_config())
            self.metrics.watch_engine(self.engine.stats)
        except BaseException:
            self.experts.close()
            raise
        self.metrics_server, self.metrics_address = None, None
        if config.metrics_port is not None:
            self.metrics_server, self.metrics_address = serve_metrics(self.metrics.registry, config.metrics_port,
                                                                      config.metrics_host)
        self.follower, self.reporter, self.state = None, None, None
        if config.redis_url:
            self.state = state = ClusterState(config.redis_url, config.redis_namespace,
                                              credentials.placement_signing_key if credentials else None)
            self.follower = PlacementFollower(self.experts, state, config.placement_poll_s,
                                              on_refused=self.metrics.placement_refused.inc)
            self.experts.on_stale = self.follower.refresh_soon
            self.reporter = TelemetryReporter(self.experts, Telemetry(state), config.telemetry_flush_s,
                                              metrics_address=self.metrics_address, on_flush=self._on_flush,
                                              on_drop=self.metrics.telemetry_dropped.inc,
                                              on_error=self.metrics.on_background_error)
        self.health = HealthCache(self.experts, self.state, on_error=self.metrics.on_background_error)
        self.api = MoEApi(self.engine, spec, Tokenizer.from_dir(config.checkpoint), self.status,
                          on_tokens=self.metrics.on_tokens)
        self.spec = spec
        log.info("router up: %s, %s on %s (torch threads %d), %d dense MiB, placement v%d over %d groups",
                 spec.family, dtype, device, torch.get_num_threads(), checkpoint.loaded_bytes // 2**20,
                 self.experts.table.version, len(self.experts.table.groups))

    def status(self) -> serving_pb2.StatusResponse:
        """From the background snapshots (health.py): answers at once whatever Redis and the groups do."""
        return build_status(self.spec.family, self.health.groups, self.health.redis if self.state else None,
                            self.engine.stats())

    def serving(self) -> bool:
        """Every expert has a replica on a group that answers Stats (the health check), as of a fresh snapshot."""
        return self.health.serving()

    def _on_flush(self, counts) -> None:
        self.metrics.on_load(counts)
        table = self.experts.table
        self.metrics.on_placement(table.version, table.groups)

    def close(self):
        self.health.close()
        if self.reporter is not None:
            self.reporter.close()
        if self.follower is not None:
            self.follower.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.engine.close()
        self.experts.close()
