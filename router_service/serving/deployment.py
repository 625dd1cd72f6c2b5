"""RouterDeployment: the router as a Ray Serve deployment behind Serve's gRPC ingress.

    client --gRPC--> Serve proxy (port 9000) --> RouterDeployment replica
                     MoEApi -> Engine -> DenseModel + RemoteExperts --gRPC--> expert groups

Serve forwards each registered service's methods to the deployment method of the same
name, so `Generate`, `Score`, `Status` (elasticmoe.v1.MoEService) and `Check`
(grpc.health.v1.Health) are plain methods here. Serve's ingress is for client traffic
only: router -> expert traffic goes over RemoteExperts' own channels (~0.37 ms a call
against ~4 ms through Serve, DESIGN.md).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from elasticmoe.v1 import serving_pb2
from grpc_health.v1 import health_pb2
from ray import serve

from cluster.checkpoint.reader import Checkpoint, parse_dtype
from cluster.config import config_from_dict
from cluster.placement.table import PlacementTable
from cluster.state.metrics import RouterMetrics, serve_metrics
from cluster.state.store import ClusterState
from cluster.state.telemetry import Telemetry
from experts.credentials import ExpertCredentials
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.scheduler import SchedulerConfig
from router_service.model.dense import DenseModel
from router_service.model.tokenizer import Tokenizer
from router_service.serving.api import ApiError, MoEApi
from router_service.serving.auth import AuthError, TokenAuth
from router_service.serving.dispatch import RemoteExperts
from router_service.serving.placement_follower import PlacementFollower
from router_service.serving.telemetry_reporter import TelemetryReporter

log = logging.getLogger(__name__)

# Serve's gRPC proxy accepts messages up to 2 GiB by default (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, Ray 2.60),
# read once where the proxy starts. A Generate request is a few KiB; 16 MiB leaves room for long prompts and
# bounds what one call can make the proxy hold. Larger messages are refused RESOURCE_EXHAUSTED by gRPC.
SERVE_MESSAGE_SIZE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
MAX_CLIENT_MESSAGE_BYTES = 16 * 2**20


def limit_client_messages(environ=os.environ) -> None:
    """Cap Serve's gRPC message size for a Ray started from this process (an explicit setting stays)."""
    environ.setdefault(SERVE_MESSAGE_SIZE_ENV, str(MAX_CLIENT_MESSAGE_BYTES))


# What `grpc_options.grpc_servicer_functions` must list for this deployment.
GRPC_SERVICER_FUNCTIONS = [
    "elasticmoe.v1.serving_pb2_grpc.add_MoEServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


@dataclass(frozen=True)
class RouterConfig:
    checkpoint: str
    placement: str  # PlacementTable JSON: the groups' addresses and who holds what
    dtype: str = "float32"
    max_running: int = 64
    max_step_tokens: int = 512
    prefill_chunk: int = 256
    max_queue: int = 256
    max_new_tokens: int = 4096
    forward_timeout_s: float = 30.0  # a MoE layer's deadline, retries on other replicas included
    # A group that has not answered a Forward after this long loses the call to another replica of its
    # experts, where every one has another (and is avoided for 2 s); without one the router waits.
    forward_slow_s: float = 2.0
    # follow placement changes published there (None: the deploy-time table only); may hold a password: no repr
    redis_url: str | None = field(default=None, repr=False)
    redis_namespace: str = "elasticmoe"
    placement_poll_s: float = 0.5
    telemetry_flush_s: float = 0.1  # routed load goes to Redis at most this often (with redis_url)
    metrics_port: int | None = 9100  # Prometheus /metrics; 0 = a free port, None = off
    metrics_host: str = "0.0.0.0"
    metrics_per_expert: bool = False  # per-(layer, expert) series: L*E of them, off for big models
    # Client-API bearer tokens (router_service/serving/auth.py). Authentication is on when any of the three
    # is set, and a replica whose sources yield no token refuses to start: it fails closed.
    api_token_sha256: tuple[str, ...] = ()  # SHA-256 hex of accepted tokens (moectl serve: no raw token in Ray)
    api_tokens_file: str | None = None  # read on each replica at start (Kubernetes: a mounted Secret)
    api_tokens_env: str | None = None  # an environment variable of the replica: comma-separated tokens

    def __post_init__(self):
        parse_dtype(self.dtype)
        if isinstance(self.api_token_sha256, str) or not all(isinstance(d, str) for d in self.api_token_sha256):
            raise ValueError("api_token_sha256 must be a list of SHA-256 hex strings")
        object.__setattr__(self, "api_token_sha256", tuple(self.api_token_sha256))  # a JSON list becomes a tuple
        if self.api_token_sha256:
            TokenAuth(self.api_token_sha256)  # each must be 64 lowercase hex characters
        if self.api_tokens_env is not None and not (isinstance(self.api_tokens_env, str)
                                                    and self.api_tokens_env.isidentifier()):
            raise ValueError(f"api_tokens_env must name an environment variable, got {self.api_tokens_env!r}")
        PlacementTable.from_json(self.placement)
        for name in ("forward_timeout_s", "forward_slow_s", "placement_poll_s", "telemetry_flush_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be None (off) or in [0, 65535], got {self.metrics_port}")

    @classmethod
    def from_dict(cls, d: dict) -> "RouterConfig":
        return config_from_dict(cls, d)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(SchedulerConfig(self.max_running, self.max_step_tokens, self.prefill_chunk, self.max_queue),
                            max_new_tokens=self.max_new_tokens)


class Router:
    """Everything a router replica holds; built without Serve so tests can use it directly."""

    def __init__(self, config: RouterConfig, credentials: ExpertCredentials | None = None):
        """credentials: the cluster's expert-API credentials, from the controller (expert_credentials());
        None for groups started without any (tests, bench)."""
        checkpoint = Checkpoint(config.checkpoint)
        spec = checkpoint.spec
        dense = DenseModel(spec, checkpoint.load_dense(parse_dtype(config.dtype)))  # no expert weights here
        self.metrics = RouterMetrics(config.metrics_per_expert)
        self.experts = RemoteExperts(spec, PlacementTable.from_json(config.placement), config.forward_timeout_s,
                                     on_forward=self.metrics.on_forward, credentials=credentials,
                                     slow_s=config.forward_slow_s)
        self.engine = Engine(dense, self.experts, config.engine_config())
        self.metrics_server, self.metrics_address = None, None
        if config.metrics_port is not None:
            self.metrics_server, self.metrics_address = serve_metrics(self.metrics.registry, config.metrics_port,
                                                                      config.metrics_host)
        self.follower, self.reporter, self.state = None, None, None
        if config.redis_url:
            self.state = state = ClusterState(config.redis_url, config.redis_namespace)
            self.follower = PlacementFollower(self.experts, state, config.placement_poll_s)
            self.experts.on_stale = self.follower.refresh_soon
            self.reporter = TelemetryReporter(self.experts, Telemetry(state), config.telemetry_flush_s,
                                              metrics_address=self.metrics_address, on_flush=self._on_flush,
                                              on_drop=self.metrics.telemetry_dropped.inc)
        self.api = MoEApi(self.engine, spec, Tokenizer.from_dir(config.checkpoint), self.status)
        self.spec = spec
        log.info("router up: %s, %d dense MiB, placement v%d over %d groups", spec.family,
                 checkpoint.loaded_bytes // 2**20, self.experts.table.version, len(self.experts.table.groups))

    def status(self) -> serving_pb2.StatusResponse:
        """Groups with their health (a Stats call answered), the placement, per-expert load.

        serving: every expert has at least one replica on a group that answered.
        load: (token, expert) pairs each expert has served, summed over its replicas.
        """
        table = self.experts.latest_table
        stats = self.experts.group_stats()
        live = _live_groups(table, stats)
        load: dict[tuple[int, int], int] = {}
        for reply in stats.values():
            for s in reply.slots if reply is not None else ():
                key = (s.slot.layer, s.slot.expert)
                load[key] = load.get(key, 0) + s.tokens
        return serving_pb2.StatusResponse(
            serving=_every_expert_live(table, live),
            placement_version=table.version, model=self.spec.family,
            groups=[serving_pb2.GroupStatus(name=f"group-{g}", address=a,
                                            health="SERVING" if g in live else "NOT_SERVING",
                                            experts=[serving_pb2.ExpertRef(layer=l, expert=e)
                                                     for l, e in table.slots_of(g)])
                    for g, a in enumerate(table.groups)],
            placement=[serving_pb2.PlacementEntry(layer=l, expert=e, groups=[f"group-{g}" for g in gs],
                                                  shares=table.shares_of((l, e)))
                       for (l, e), gs in sorted(table.replicas.items())],
            load=[serving_pb2.ExpertLoad(layer=l, expert=e, tokens=n) for (l, e), n in sorted(load.items())],
            autoscaler=self._autoscaler_status())

    def _autoscaler_status(self) -> serving_pb2.AutoscalerStatus | None:
        """What the controller last wrote to Redis; None without Redis or when it is unreachable."""
        if self.state is None:
            return None
        try:
            s = self.state.autoscaler_status()
            paused = self.state.paused()
        except Exception as e:  # Status must answer while Redis is down
            log.debug("autoscaler status unavailable: %s", e)
            return None
        if s is None:
            return None
        decision, last = s.get("decision") or {}, s.get("last_rebalance") or {}
        return serving_pb2.AutoscalerStatus(
            enabled=bool(s.get("enabled")), paused=paused, imbalance=float(s.get("imbalance") or 0.0),
            decision=decision.get("action", ""), reason=decision.get("reason", ""),
            last_rebalance=last.get("result", ""), last_rebalance_error=last.get("error", ""),
            last_rebalance_version=int(last.get("to_version", 0)), last_rebalance_seconds=float(last.get("seconds", 0.0)),
            groups=int(s.get("groups", 0)))

    def serving(self) -> bool:
        """Every expert has a replica on a group that answers Stats (the health check)."""
        table = self.experts.latest_table
        return _every_expert_live(table, _live_groups(table, self.experts.group_stats()))

    def _on_flush(self, counts) -> None:
        self.metrics.on_load(counts)
        self.metrics.placement_version.set(self.experts.table.version)

    def close(self):
        if self.reporter is not None:
            self.reporter.close()
        if self.follower is not None:
            self.follower.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.engine.close()
        self.experts.close()


def _live_groups(table: PlacementTable, stats: dict) -> set[int]:
    return {g for g, a in enumerate(table.groups) if stats.get(a) is not None}


def _every_expert_live(table: PlacementTable, live: set[int]) -> bool:
    return all(live.intersection(gs) for gs in table.replicas.values())


# max_ongoing_requests: calls a replica holds at once (its engine queues or refuses them, bounded by
# max_running + max_queue). max_queued_requests: calls Serve's proxy may hold for a replica beyond that;
# without it the proxy's queue has no bound, and past it Serve answers RESOURCE_EXHAUSTED itself.
# health_check_period_s: Serve's controller finds a dead replica at its next check; at the default 10 s
# a killed router took 6-12 s to be replaced (tests/integration/test_router_fault_ray.py), most of it waiting for that.
@serve.deployment(name="router", max_ongoing_requests=512, max_queued_requests=1024, health_check_period_s=2.0)
class RouterDeployment:
    def __init__(self, config: dict, credentials: ExpertCredentials | None = None):
        router_config = RouterConfig.from_dict(config)
        # Before the model loads: a bad token source fails the replica in seconds, with its reason.
        self.auth = TokenAuth.from_sources(router_config.api_token_sha256, router_config.api_tokens_file,
                                           router_config.api_tokens_env)
        if self.auth is None:
            log.info("client API authentication off (no api_token_sha256, api_tokens_file or api_tokens_env)")
        else:
            log.info("client API authentication on: %d token(s), fingerprint %s", len(self.auth),
                     self.auth.fingerprint)
        self.router = Router(router_config, credentials)

    def _authenticate(self, grpc_context) -> None:
        """Raise AuthError unless the call carries a valid token. Serve hands the deployment a
        RayServegRPCContext (ray/serve/grpc_util.py): a copy of the proxy's context, metadata included."""
        if self.auth is not None:
            self.auth.check(grpc_context.invocation_metadata())

    async def Generate(self, request: serving_pb2.GenerateRequest, grpc_context):
        try:
            self._authenticate(grpc_context)
            async for response in self.router.api.generate(request):
                yield response
        except (ApiError, AuthError) as e:
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.message)
            # Serve's proxy applies a streaming call's context only when a message is yielded
            # (ray/serve/_private/proxy.py, Ray 2.60): without one the client would see OK.
            # The SDK skips messages that carry nothing.
            yield serving_pb2.GenerateResponse()

    async def Score(self, request: serving_pb2.ScoreRequest, grpc_context) -> serving_pb2.ScoreResponse:
        try:
            self._authenticate(grpc_context)
            return await self.router.api.score(request)
        except (ApiError, AuthError) as e:
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.message)
            return serving_pb2.ScoreResponse()

    def Status(self, request: serving_pb2.StatusRequest, grpc_context) -> serving_pb2.StatusResponse:
        try:
            self._authenticate(grpc_context)
        except AuthError as e:  # Status names groups and addresses: callers must authenticate too
            grpc_context.set_code(e.code)
            grpc_context.set_details(e.message)
            return serving_pb2.StatusResponse()
        return self.router.api.status(request)

    def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        """Open without a token: load balancers and kubelet probes carry none, and it says only SERVING or not."""
        serving = self.router.serving()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)


def build_app(config: dict, credentials: ExpertCredentials | None = None):
    """The Serve application: `serve.run(build_app(config, credentials))`. credentials (the controller's
    expert_credentials()) travel as a deployment argument inside Ray, never in config or logs."""
    return RouterDeployment.bind(config, credentials)
