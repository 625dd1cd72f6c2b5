"""`moectl simulate`'s modelled cluster: SimConfig holds every modelling assumption (one field
per flag, checked with errors that name the flag) and the constants derived from them, the
capacity formula among them (simulate.py's docstring states the model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cluster.control.autoscaler_config import AutoscalerConfig

GPUS_RANGE = (64, 256)


@dataclass(frozen=True)
class SimConfig:
    """Every modelling assumption, one field per flag; errors name the flag."""

    gpus: int = 64  # expert groups, one GPU each
    slots: int = 5  # expert slots per MoE layer per GPU
    layers: int = 58  # MoE layers (DeepSeek-V3: 58 of 61)
    experts: int = 256  # routed experts per layer
    top_k: int = 8
    hidden: int = 7168
    expert_ffn: int = 2048  # moe_intermediate_size
    dtype_bytes: int = 2  # bf16 weights
    duration_s: float = 600.0
    dt_s: float = 1.0
    shift_s: float = 120.0  # the hot set changes this often; 0 = never
    shift_mode: str = "permute"
    rotate_by: int = 32
    zipf: float = 1.2  # 0 = uniform
    seed: int = 0
    load: float = 0.8  # peak offered tokens/s / capacity of a perfectly balanced cluster
    diurnal_period_s: float = 600.0  # 0 = a flat rate
    diurnal_low: float = 0.5  # lowest rate / peak rate
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    mfu: float = 0.4
    layer_overhead_us: float = 50.0  # per layer per pass: kernel launch + RPC
    # the routers' part of a layer per pass (attention, norms, gate), an estimate for MLA decode of a 256-token
    # batch on an H100; with two micro-batches in flight it overlaps the expert stage (capacity(overlap=True))
    attention_us: float = 150.0
    tokens_per_gpu: int = 256  # tokens per forward pass per GPU (decode batch)
    link_gb_s: float = 25.0  # host -> GPU (or network) per GPU, GB/s
    drain_s: float = 0.5  # publish + routers leaving the old placement, after the weights load
    baseline: str = "round-robin"  # the static placement: round-robin or initial-plan
    autoscaler: dict = field(default_factory=dict)  # AutoscalerConfig overrides

    def __post_init__(self):
        lo, hi = GPUS_RANGE
        _int("--gpus", self.gpus, lo, hi)
        for flag, v in (("--slots", self.slots), ("--layers", self.layers), ("--experts", self.experts),
                        ("--hidden", self.hidden), ("--expert-ffn", self.expert_ffn),
                        ("--dtype-bytes", self.dtype_bytes), ("--tokens-per-gpu", self.tokens_per_gpu)):
            _int(flag, v, 1)
        _int("--top-k", self.top_k, 1, self.experts)
        _int("--rotate-by", self.rotate_by, 0)
        _int("--seed", self.seed, 0)
        if self.experts > self.gpus * self.slots:
            raise ValueError(f"--experts {self.experts} do not fit in --gpus * --slots = {self.gpus} * {self.slots} "
                             f"= {self.gpus * self.slots} slots per layer: raise --slots to at least "
                             f"{math.ceil(self.experts / self.gpus)}")
        for flag, v in (("--duration-s", self.duration_s), ("--dt-s", self.dt_s), ("--peak-tflops", self.peak_tflops),
                        ("--link-gb-s", self.link_gb_s), ("--load", self.load)):
            _number(flag, v, 0, strict=True)
        for flag, v in (("--shift-s", self.shift_s), ("--zipf", self.zipf), ("--drain-s", self.drain_s),
                        ("--diurnal-period-s", self.diurnal_period_s), ("--layer-overhead-us", self.layer_overhead_us),
                        ("--attention-us", self.attention_us)):
            _number(flag, v, 0)
        _number("--mfu", self.mfu, 0, 1, strict=True)
        _number("--diurnal-low", self.diurnal_low, 0, 1)
        if self.shift_mode not in ("permute", "rotate"):
            raise ValueError(f"--shift-mode must be permute or rotate, got {self.shift_mode!r}")
        if self.baseline not in ("round-robin", "initial-plan"):
            raise ValueError(f"--baseline must be round-robin or initial-plan, got {self.baseline!r}")
        if self.duration_s / self.dt_s > 1_000_000:
            raise ValueError(f"--duration-s / --dt-s = {self.duration_s / self.dt_s:.0f} steps: at most 1000000")
        for key in ("min_groups", "max_groups"):
            if key in self.autoscaler:
                raise ValueError(f"--autoscaler {key}: group scaling is not modelled; --gpus fixes the group count")
        self.autoscaler_config()  # bad --autoscaler settings fail here, naming the key

    def autoscaler_config(self) -> AutoscalerConfig:
        return AutoscalerConfig.from_dict({"metrics_port": None, **self.autoscaler})  # max_groups None: fixed G

    @property
    def steps(self) -> int:
        return int(round(self.duration_s / self.dt_s))

    # ---- derived constants (the header prints each) ----------------------------------------

    @property
    def pair_flops(self) -> float:  # gate, up, down projections: 3 matmuls of 2 * H * F FLOPs per (token, expert)
        return 3 * 2 * self.hidden * self.expert_ffn

    @property
    def pair_s(self) -> float:
        return self.pair_flops / (self.peak_tflops * 1e12 * self.mfu)

    @property
    def expert_bytes(self) -> int:  # one expert of one layer: 3 matrices of H x F
        return 3 * self.hidden * self.expert_ffn * self.dtype_bytes

    @property
    def pass_tokens(self) -> int:
        return self.tokens_per_gpu * self.gpus

    def capacity(self, max_pairs_per_token: np.ndarray, overlap: bool = False) -> float:
        """Tokens/s of the cluster when layer l's busiest GPU gets max_pairs_per_token[l] pairs per token.
        A layer is the routers' part (attention_us) then the expert stage (the busiest GPU + overhead); with
        two micro-batches in flight (overlap) one half's expert stage runs while the other's attention
        does, so a layer takes the slower of the two instead of their sum (MegaScale-Infer's ping-pong,
        idealised: no cost to splitting the batch)."""
        experts = self.pass_tokens * max_pairs_per_token * self.pair_s + self.layer_overhead_us * 1e-6  # [L]
        attention = self.attention_us * 1e-6
        pass_s = np.maximum(experts, attention) if overlap else experts + attention
        return self.pass_tokens / float(pass_s.sum())

    @property
    def balanced_capacity(self) -> float:
        return self.capacity(np.full(self.layers, self.top_k / self.gpus))

    def rate_fraction(self, t: float) -> float:
        """Offered rate / peak at time t: 1 at t = 0, diurnal_low half a period later."""
        if self.diurnal_period_s == 0:
            return 1.0
        return 1.0 - (1.0 - self.diurnal_low) * 0.5 * (1.0 - math.cos(2 * math.pi * t / self.diurnal_period_s))


def _int(flag: str, v, lo: int, hi: int | None = None) -> None:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        want = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{flag} must be an int {want}, got {v!r}")


def _number(flag: str, v, lo: float, hi: float | None = None, strict: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (v > lo if strict else v >= lo) and (hi is None or v <= hi)
    if not ok:
        want = (f"> {lo:g}" if strict else f">= {lo:g}") + (f" and <= {hi:g}" if hi is not None else "")
        raise ValueError(f"{flag} must be a number {want}, got {v!r}")
