"""ControllerConfig: what the controller is told (by `moectl serve`, serveConfigV2 or a test).

Every field is validated when built, with a message that names it: a bad value fails where
it is written, not minutes later inside a group. The cluster secret is never in a repr.

What comes from the environment is read in the controller's own process (redis_target(),
expert_credentials()), i.e. on the node the controller runs on: on Kubernetes the head pod,
where serveConfigV2's controller_label_selector pins it and whose template sets these
variables. Whoever builds the config (Serve's build task, on whichever pod Serve picks)
needs none of them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from cluster.config import config_from_dict, is_int
from cluster.control.autoscaler_config import AutoscalerConfig
from cluster.state.store import check_url
from experts.config import DEVICES, DTYPES
from experts.credentials import ExpertCredentials, ExpertTLS

REDIS_URL_ENV = "ELASTICMOE_REDIS_URL"  # the Redis URL when redis_url is None (on Kubernetes: from a Secret)
RAY_CLUSTER_ENV = "ELASTICMOE_RAY_CLUSTER"  # replaces RAY_CLUSTER_FIELD in redis_namespace
RAY_CLUSTER_FIELD = "{ray_cluster}"


@dataclass
class ControllerConfig:
    checkpoint: str  # checkpoint directory, readable from every node a group may run on
    num_groups: int  # expert groups (one GPU each when the cluster has GPUs)
    # redis://[:password@]host:port/db or rediss:// for TLS; never in a repr. None: $ELASTICMOE_REDIS_URL of the
    # controller's process (keeps the password out of serveConfigV2, which Serve logs).
    redis_url: str | None = field(default=None, repr=False)
    # Key prefix in Redis (cluster/state/store.py). "{ray_cluster}" becomes $ELASTICMOE_RAY_CLUSTER of the
    # controller's process: one key space per Ray cluster, so blue/green clusters never share a placement.
    redis_namespace: str = "elasticmoe"
    group_device: str = "auto"  # ExpertGroupConfig.device
    # The cluster's one model dtype: groups compute in it and routers are given it (model_dtype()).
    # None: bfloat16 when groups get GPUs, float32 on CPU.
    dtype: str | None = None
    group_host: str = "127.0.0.1"  # groups' bind address; "0.0.0.0" when routers run on other nodes
    group_cpu_threads: int | None = None  # ExpertGroupConfig.cpu_threads: torch threads per CPU group
    pin_groups: bool = False  # group i on CPU core i mod (cores): each group its own compute, as with a GPU each
    # ExpertGroupConfig.coalesce_window_s: how long a group holds a Forward for same-layer company (0: never
    # waits; calls queued while it computes still run as one)
    group_coalesce_window_s: float = 0.0
    num_gpus_per_group: float | None = None  # None = 1 when the cluster has GPUs, else 0
    max_group_restarts: int = 3  # Ray restarts of a group's process; -1 = unlimited
    group_start_timeout_s: float = 600.0  # start() loads weights: minutes for a large model
    health_timeout_s: float = 2.0  # a group's address() or Stats slower than this counts as not serving
    name: str = "elasticmoe-controller"  # the actor name; groups are named f"{name}-group-{i}"
    repair_interval_s: float | None = 2.0  # the control loop restarts stopped groups this often; None = on call only
    autoscaler: AutoscalerConfig | dict = field(default_factory=AutoscalerConfig)  # cluster/control/autoscaler_config.py
    # The internal expert API's credentials (experts/credentials.py). The cluster secret: given here (Python
    # only: serveConfigV2 args are logged), read from the environment variable named by expert_secret_env
    # in the controller's process, or else generated at start: 32 random bytes, never logged.
    expert_secret: str | None = field(default=None, repr=False)
    expert_secret_env: str | None = None
    expert_tls: dict | None = None  # {ca_file, cert_file, key_file[, server_name]}: mutual TLS on expert ports

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError(f"checkpoint must be a non-empty path string, got {self.checkpoint!r}")
        if not is_int(self.num_groups) or self.num_groups < 1:
            raise ValueError(f"num_groups must be an int >= 1, got {self.num_groups!r}")
        if self.redis_url is not None:
            check_url(self.redis_url)
        window = self.group_coalesce_window_s
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 <= window <= 0.1:
            raise ValueError(f"group_coalesce_window_s must be a number of seconds in [0, 0.1], "
                             f"got {self.group_coalesce_window_s!r}")
        ns = self.redis_namespace
        if not isinstance(ns, str) or not ns or ":" in ns or "{" in ns.replace(RAY_CLUSTER_FIELD, "") \
                or "}" in ns.replace(RAY_CLUSTER_FIELD, ""):
            raise ValueError(f"redis_namespace must be a non-empty string without ':' whose only placeholder is "
                             f"{RAY_CLUSTER_FIELD}, got {ns!r}")
        if self.group_device not in DEVICES:
            raise ValueError(f"group_device must be one of {DEVICES}, got {self.group_device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be None (auto) or one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.group_host, str) or not self.group_host:
            raise ValueError(f"group_host must be a non-empty string, got {self.group_host!r}")
        if self.num_gpus_per_group is not None and (not _is_number(self.num_gpus_per_group)
                                                    or self.num_gpus_per_group < 0):
            raise ValueError(f"num_gpus_per_group must be None (auto) or a number >= 0, got {self.num_gpus_per_group!r}")
        if not is_int(self.max_group_restarts) or self.max_group_restarts < -1:
            raise ValueError(f"max_group_restarts must be an int >= -1 (-1 = unlimited), got {self.max_group_restarts!r}")
        for key in ("group_start_timeout_s", "health_timeout_s"):
            value = getattr(self, key)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"{key} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if self.repair_interval_s is not None and (not _is_number(self.repair_interval_s)
                                                   or self.repair_interval_s <= 0):
            raise ValueError(f"repair_interval_s must be None or a positive number, got {self.repair_interval_s!r}")
        if self.expert_secret is not None:
            ExpertCredentials(self.expert_secret)  # validates it; the message never holds it
        if self.expert_secret_env is not None and not (isinstance(self.expert_secret_env, str)
                                                       and self.expert_secret_env.isidentifier()):
            raise ValueError(f"expert_secret_env must name an environment variable, got {self.expert_secret_env!r}")
        if self.expert_tls is not None:
            if not isinstance(self.expert_tls, dict):
                raise ValueError(f"expert_tls must be a mapping of ca_file, cert_file, key_file[, server_name], "
                                 f"got {self.expert_tls!r}")
            ExpertTLS.from_dict(self.expert_tls)
        if isinstance(self.autoscaler, dict):
            self.autoscaler = AutoscalerConfig.from_dict(self.autoscaler)
        if not isinstance(self.autoscaler, AutoscalerConfig):
            raise ValueError(f"autoscaler must be a mapping of AutoscalerConfig keys, got {self.autoscaler!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "ControllerConfig":
        return config_from_dict(cls, d)

    def redis_target(self, environ=os.environ) -> tuple[str, str]:
        """(Redis URL, namespace) as the calling process sees them: redis_url or $ELASTICMOE_REDIS_URL, and
        redis_namespace with {ray_cluster} replaced. A ValueError names the variable that is missing."""
        url = self.redis_url or environ.get(REDIS_URL_ENV)
        if not url:
            raise ValueError(f"no Redis URL: redis_url is not set and ${REDIS_URL_ENV} is unset or empty where the "
                             f"controller runs (on Kubernetes: the head pod, from the Redis Secret)")
        check_url(url)
        ns = self.redis_namespace
        if RAY_CLUSTER_FIELD in ns:
            cluster = environ.get(RAY_CLUSTER_ENV)
            if not cluster:
                raise ValueError(f"redis_namespace {ns!r} uses {RAY_CLUSTER_FIELD} but ${RAY_CLUSTER_ENV} is unset "
                                 f"where the controller runs (on Kubernetes: the head pod, from its ray.io/cluster "
                                 f"label)")
            ns = ns.replace(RAY_CLUSTER_FIELD, cluster)
            if ":" in ns:
                raise ValueError(f"${RAY_CLUSTER_ENV} must not contain ':', got {cluster!r}")
        return url, ns

    def expert_credentials(self, environ=os.environ) -> ExpertCredentials:
        """The cluster's expert-API credentials: the configured secret, else a fresh random one."""
        secret = self.expert_secret
        if secret is None and self.expert_secret_env is not None:
            secret = environ.get(self.expert_secret_env)
            if not secret:  # fail closed: a configured source that yields nothing is a mistake
                raise ValueError(f"expert_secret_env: ${self.expert_secret_env} is unset or empty here")
        tls = ExpertTLS.from_dict(self.expert_tls) if self.expert_tls else None
        return ExpertCredentials(secret, tls) if secret else ExpertCredentials.generate(tls)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
