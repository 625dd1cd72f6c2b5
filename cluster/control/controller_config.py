"""ControllerConfig: what the controller is told (by `moectl serve`, serveConfigV2 or a test).

Every field is validated when built, with a message that names it: a bad value fails where
it is written, not minutes later inside a group. The cluster secret is never in a repr.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from cluster.config import config_from_dict
from cluster.control.autoscaler_config import AutoscalerConfig
from cluster.state.store import check_url
from experts.config import DEVICES, DTYPES
from experts.credentials import ExpertCredentials, ExpertTLS


@dataclass
class ControllerConfig:
    checkpoint: str  # checkpoint directory, readable from every node a group may run on
    num_groups: int  # expert groups (one GPU each when the cluster has GPUs)
    redis_url: str = field(repr=False)  # redis://[:password@]host:port/db or rediss:// for TLS; never in a repr
    redis_namespace: str = "elasticmoe"  # key prefix in Redis (cluster/state/store.py)
    group_device: str = "auto"  # ExpertGroupConfig.device
    # The cluster's one model dtype: groups compute in it and routers are given it (model_dtype()).
    # None: bfloat16 when groups get GPUs, float32 on CPU.
    dtype: str | None = None
    group_host: str = "127.0.0.1"  # groups' bind address; "0.0.0.0" when routers run on other nodes
    group_cpu_threads: int | None = None  # ExpertGroupConfig.cpu_threads: torch threads per CPU group
    pin_groups: bool = False  # group i on CPU core i mod (cores): each group its own compute, as with a GPU each
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
        if not _is_int(self.num_groups) or self.num_groups < 1:
            raise ValueError(f"num_groups must be an int >= 1, got {self.num_groups!r}")
        check_url(self.redis_url)
        if not isinstance(self.redis_namespace, str) or not self.redis_namespace or ":" in self.redis_namespace:
            raise ValueError(f"redis_namespace must be a non-empty string without ':', got {self.redis_namespace!r}")
        if self.group_device not in DEVICES:
            raise ValueError(f"group_device must be one of {DEVICES}, got {self.group_device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be None (auto) or one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.group_host, str) or not self.group_host:
            raise ValueError(f"group_host must be a non-empty string, got {self.group_host!r}")
        if self.num_gpus_per_group is not None and (not _is_number(self.num_gpus_per_group)
                                                    or self.num_gpus_per_group < 0):
            raise ValueError(f"num_gpus_per_group must be None (auto) or a number >= 0, got {self.num_gpus_per_group!r}")
        if not _is_int(self.max_group_restarts) or self.max_group_restarts < -1:
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

    def expert_credentials(self, environ=os.environ) -> ExpertCredentials:
        """The cluster's expert-API credentials: the configured secret, else a fresh random one."""
        secret = self.expert_secret
        if secret is None and self.expert_secret_env is not None:
            secret = environ.get(self.expert_secret_env)
            if not secret:  # fail closed: a configured source that yields nothing is a mistake
                raise ValueError(f"expert_secret_env: ${self.expert_secret_env} is unset or empty here")
        tls = ExpertTLS.from_dict(self.expert_tls) if self.expert_tls else None
        return ExpertCredentials(secret, tls) if secret else ExpertCredentials.generate(tls)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
