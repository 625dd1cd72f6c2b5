"""RouterConfig: the settings of one router replica (Serve passes them as a dict).

Validated when built, unknown keys refused by name (cluster/config.py), so a typo in
serveConfigV2 fails the deploy with its name instead of being ignored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.checkpoint.reader import parse_dtype
from cluster.config import config_from_dict
from cluster.placement.table import PlacementTable
from experts.wire import MAX_FORWARD_TOKENS
from router_service.engine.config import EngineConfig
from router_service.engine.scheduler import SchedulerConfig
from router_service.serving.auth import TokenAuth, TokenSourceError


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when torch sees one, else cpu; "cpu", "cuda" or "cuda:N" as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return resolved


def served_model(checkpoint: str, served_model_name: str | None = None) -> str:
    """The `model` of the OpenAI-compatible API: served_model_name, else the checkpoint folder's name."""
    return served_model_name or Path(checkpoint).resolve().name


@dataclass(frozen=True)
class RouterConfig:
    checkpoint: str
    placement: str  # PlacementTable JSON: the groups' addresses and who holds what
    # The cluster's one model dtype (groups and routers alike). None: what the groups serve (their
    # Stats), else bfloat16 on CUDA, float32 on CPU. Set and different from a group's: refused at start.
    dtype: str | None = None
    device: str = "auto"  # where the dense model and KV cache live: auto (cuda when present) | cpu | cuda[:N]
    # The KV pool: kv_cache_bytes when set; else on CUDA kv_cache_fraction of the free memory after the
    # weights; else 1 GiB; never more than max_running full-length sequences use (engine/config.py).
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.5
    kv_block_size: int = 16
    micro_batches: int = 1  # 2: two micro-batches in flight, hiding the expert hop (engine/pipeline.py)
    max_running: int = 64
    max_step_tokens: int = 512
    prefill_chunk: int = 256
    max_queue: int = 256
    max_new_tokens: int = 4096
    forward_timeout_s: float = 30.0  # a MoE layer's deadline, retries on other replicas included
    # A group that has not answered a Forward after this long loses the call to another replica of its
    # experts, where every one has another (and is avoided for 2 s); without one the router waits.
    forward_slow_s: float = 2.0
    # An expert with fewer (token, expert) pairs than this in a layer's call goes whole to one of its
    # replicas, drawn per call by the shares, instead of being split (routes.py); 0: always split.
    whole_expert_below: int = 0
    # follow placement changes published there (None: the deploy-time table only); may hold a password: no repr
    redis_url: str | None = field(default=None, repr=False)
    redis_namespace: str = "elasticmoe"
    placement_poll_s: float = 0.5
    telemetry_flush_s: float = 0.1  # routed load goes to Redis at most this often (with redis_url)
    metrics_port: int | None = 9100  # Prometheus /metrics; 0 = a free port, None = off
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 where Prometheus scrapes the pod (k8s serve-config)
    metrics_per_expert: bool = False  # per-(layer, expert) series: L*E of them, off for big models
    # Client-API bearer tokens (router_service/serving/auth.py). Authentication is on when any of the three
    # is set, and a replica whose sources yield no token refuses to start: it fails closed.
    api_token_sha256: tuple[str, ...] = ()  # SHA-256 hex of accepted tokens (moectl serve: no raw token in Ray)
    api_tokens_file: str | None = None  # read on each replica at start (Kubernetes: a mounted Secret)
    api_tokens_env: str | None = None  # an environment variable of the replica: comma-separated tokens
    # The `model` of the OpenAI-compatible HTTP API (/v1/models); None: the checkpoint folder's name.
    served_model_name: str | None = None
    # No token source and this False: the replica refuses to start (client_auth()). Serving without
    # authentication is a choice made here, by name, never the result of a missing or empty setting.
    allow_unauthenticated: bool = False

    def __post_init__(self):
        if self.dtype is not None:
            parse_dtype(self.dtype)
        resolve_device(self.device)  # validates the form; whether CUDA is there is checked where it runs
        if isinstance(self.api_token_sha256, str) or not all(isinstance(d, str) for d in self.api_token_sha256):
            raise ValueError("api_token_sha256 must be a list of SHA-256 hex strings")
        object.__setattr__(self, "api_token_sha256", tuple(self.api_token_sha256))  # a JSON list becomes a tuple
        if self.api_token_sha256:
            TokenAuth(self.api_token_sha256)  # each must be 64 lowercase hex characters
        if self.api_tokens_env is not None and not (isinstance(self.api_tokens_env, str)
                                                    and self.api_tokens_env.isidentifier()):
            raise ValueError(f"api_tokens_env must name an environment variable, got {self.api_tokens_env!r}")
        if self.api_tokens_file is not None and (not isinstance(self.api_tokens_file, str)
                                                 or not self.api_tokens_file.strip()):
            raise ValueError("api_tokens_file must be the path of a token file; leave it out rather than empty "
                             "(an empty path once turned authentication off)")
        if not isinstance(self.allow_unauthenticated, bool):
            raise ValueError(f"allow_unauthenticated must be true or false, got {self.allow_unauthenticated!r}")
        if self.allow_unauthenticated and self.has_token_source():
            raise ValueError("allow_unauthenticated is true but a token source (api_token_sha256, api_tokens_file, "
                             "api_tokens_env) is set too: remove one of them")
        PlacementTable.from_json(self.placement)
        if self.served_model_name is not None and not (isinstance(self.served_model_name, str)
                                                       and self.served_model_name.strip()):
            raise ValueError(f"served_model_name must be a non-empty string or None, got {self.served_model_name!r}")
        if not isinstance(self.max_step_tokens, int) or not 1 <= self.max_step_tokens <= MAX_FORWARD_TOKENS:
            raise ValueError(f"max_step_tokens must be an int in [1, {MAX_FORWARD_TOKENS}] (the largest Forward an "
                             f"expert group accepts), got {self.max_step_tokens!r}")
        if isinstance(self.whole_expert_below, bool) or not isinstance(self.whole_expert_below, int) \
                or not 0 <= self.whole_expert_below <= MAX_FORWARD_TOKENS:
            raise ValueError(f"whole_expert_below must be an int in [0, {MAX_FORWARD_TOKENS}] (0: always split), "
                             f"got {self.whole_expert_below!r}")
        for name in ("forward_timeout_s", "forward_slow_s", "placement_poll_s", "telemetry_flush_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be None (off) or in [0, 65535], got {self.metrics_port}")

    @classmethod
    def from_dict(cls, d: dict) -> "RouterConfig":
        return config_from_dict(cls, d)

    @property
    def model_name(self) -> str:
        return served_model(self.checkpoint, self.served_model_name)

    def has_token_source(self) -> bool:
        return bool(self.api_token_sha256) or self.api_tokens_file is not None or self.api_tokens_env is not None

    def check_auth_setting(self) -> None:
        """TokenSourceError unless a token source is set or unauthenticated serving is chosen by name."""
        if not self.has_token_source() and not self.allow_unauthenticated:
            raise TokenSourceError("client API authentication has no token source: set api_tokens_env (a variable "
                                   "from a Secret), api_tokens_file or api_token_sha256; or, to serve without "
                                   "authentication (loopback, tests), set allow_unauthenticated: true")

    def client_auth(self, environ=os.environ) -> TokenAuth | None:
        """The replica's TokenAuth, read from its sources here; None only with allow_unauthenticated."""
        self.check_auth_setting()
        return TokenAuth.from_sources(self.api_token_sha256, self.api_tokens_file, self.api_tokens_env, environ)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(SchedulerConfig(self.max_running, self.max_step_tokens, self.prefill_chunk, self.max_queue),
                            max_new_tokens=self.max_new_tokens, kv_cache_bytes=self.kv_cache_bytes,
                            kv_cache_fraction=self.kv_cache_fraction, block_size=self.kv_block_size,
                            micro_batches=self.micro_batches)
