"""AutoscalerConfig: when the autoscaler moves experts and adds or removes groups.

Defaults aim at "skew onset to balanced placement within 10 s": a 4 s load window,
a condition held for 2 s, then one rebalance (load, publish, drain, unload).
Every field is validated when built, with a message that names it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.config import config_from_dict, is_int


@dataclass
class AutoscalerConfig:
    enabled: bool = True  # False: telemetry and metrics only, placement changes only by `moectl scale`
    interval_s: float = 1.0  # one observe -> decide -> apply round this often
    window_s: float = 4.0  # expert load is summed over this trailing window of telemetry buckets
    spare_slots: float = 0.5  # slots per layer per group = ceil(E / G * (1 + spare_slots)): room for replicas
    imbalance_threshold: float = 1.15  # act only when observed max/mean group load is above this (hysteresis)
    target_imbalance: float = 1.05  # the planner stops adding replicas once a plan reaches this
    min_gain: float = 0.05  # skip a plan that lowers expected imbalance by less than this
    sustain_s: float = 2.0  # a condition (imbalanced, idle, hot, cold) must hold this long before acting
    cooldown_s: float = 5.0  # after a placement change, wait this long before the next
    min_tokens: int = 64  # fewer routed (token, expert) pairs in a window count as no traffic
    # What the planner balances: pairs + touch_cost * expert calls that sent the expert a pair or more.
    # In decode a group's time follows the experts it reads as well as its tokens: one weight read costs
    # about touch_cost pairs (`moectl bench kernel --touch-cost` fits it). 0: pairs alone. The planner
    # splits both terms by share, which holds for weight reads only where the router sends an expert
    # whole to one replica per call (RouterConfig.whole_expert_below above its pairs per call): set both.
    touch_cost: float = 0.0
    min_groups: int = 1  # with max_groups set: never fewer groups than this
    max_groups: int | None = None  # None = no group scaling: the controller's num_groups stay
    scale_up_utilization: float = 0.8  # mean group busy fraction above this for scale_sustain_s adds a group
    scale_down_utilization: float = 0.2  # below this for scale_sustain_s removes a group (down to min_groups)
    scale_sustain_s: float = 30.0
    drain_timeout_s: float = 10.0  # wait this long for routers to leave a placement before unloading its replicas
    load_timeout_s: float = 300.0  # LoadExperts slower than this fails the rebalance (it rolls back)
    metrics_port: int | None = 9101  # Prometheus /metrics of the autoscaler; 0 = a free port, None = off
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 where Prometheus scrapes the pod (k8s serve-config)
    metrics_per_expert: bool = False  # per-(layer, expert) load and replica series: L*E of them

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be true or false, got {self.enabled!r}")
        for name in ("interval_s", "window_s", "drain_timeout_s", "load_timeout_s"):
            _positive(name, getattr(self, name))
        for name in ("sustain_s", "cooldown_s", "scale_sustain_s", "spare_slots", "min_gain", "touch_cost"):
            _non_negative(name, getattr(self, name))
        for name in ("imbalance_threshold", "target_imbalance"):
            value = getattr(self, name)
            if not _is_number(value) or value < 1.0:
                raise ValueError(f"{name} must be a number >= 1.0 (max/mean group load), got {value!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if not is_int(self.min_groups) or self.min_groups < 1:
            raise ValueError(f"min_groups must be an int >= 1, got {self.min_groups!r}")
        if self.max_groups is not None and (not is_int(self.max_groups) or self.max_groups < self.min_groups):
            raise ValueError(f"max_groups must be None or an int >= min_groups ({self.min_groups}), "
                             f"got {self.max_groups!r}")
        for name in ("scale_up_utilization", "scale_down_utilization"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
        if self.metrics_port is not None and (not is_int(self.metrics_port) or not 0 <= self.metrics_port <= 65535):
            raise ValueError(f"metrics_port must be None (off) or an int in [0, 65535], got {self.metrics_port!r}")
        if self.scale_down_utilization >= self.scale_up_utilization:
            raise ValueError(f"scale_down_utilization ({self.scale_down_utilization}) must be below "
                             f"scale_up_utilization ({self.scale_up_utilization})")

    def slots_per_group(self, num_experts: int, num_groups: int) -> int:
        """Slots per MoE layer per group: an even share of the experts plus spare_slots of room."""
        return max(math.ceil(num_experts / num_groups), math.ceil(num_experts / num_groups * (1 + self.spare_slots)))

    @classmethod
    def from_dict(cls, d: dict) -> "AutoscalerConfig":
        return config_from_dict(cls, d)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive(name: str, value) -> None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _non_negative(name: str, value) -> None:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
