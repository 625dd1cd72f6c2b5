"""The autoscaler's observe and decide; the controller applies (cluster/control/controller.py).

    every interval_s:
      observe  expert load [L, E] (pairs/s over window_s, from routers' telemetry) and the cost
               the planner balances (pairs + touch_cost * calls that touched the expert, per s),
               group utilisation (busy seconds / window_s), the imbalance of the current
               placement under that cost (max/mean group cost, cost-weighted over layers)
      decide   in this order, each condition held for its sustain time, none during cooldown:
               busy  (mean utilisation > scale_up_utilization)    and G < max_groups -> add a group
               quiet (mean utilisation < scale_down_utilization) and G > min_groups -> remove the last group
               idle  (< min_tokens pairs) with replicas beyond one per expert      -> drop them
               imbalanced (imbalance > imbalance_threshold)                         -> plan; apply unless
                                                                                       the gain < min_gain
      apply    (controller) load new replicas -> publish v+1 -> drain routers -> unload

Hysteresis: a placement changes only when imbalance passes imbalance_threshold, and a
plan aims at target_imbalance, well below it, so a fresh plan does not trigger the
next one; cooldown_s spaces changes; sustain_s ignores a one-window blip.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cluster.checkpoint.spec import ModelSpec
from cluster.control.autoscaler_config import AutoscalerConfig
from cluster.placement.layout import Placement, PlannerConfig
from cluster.placement.planner import plan
from cluster.placement.table import PlacementTable

if TYPE_CHECKING:  # a type only: the planner side (moectl simulate, bench kernel's CLI) needs no redis-py
    from cluster.state.telemetry import Telemetry

log = logging.getLogger(__name__)

HOLD, REBALANCE, ADD_GROUP, REMOVE_GROUP = "hold", "rebalance", "add_group", "remove_group"


@dataclass(frozen=True)
class Observation:
    now: float
    loads: np.ndarray  # [L, E] pairs/s per expert, L over spec.sparse_layers
    pairs: int  # (token, expert) pairs routed in the window, all routers
    utilization: dict[str, float]  # group name -> busy fraction over the window
    imbalance: float  # of the current placement under `cost`
    current: Placement  # the placement table in planner form, converted once per round
    cost: np.ndarray  # [L, E] per s, what the planner balances: `loads`, plus AutoscalerConfig.touch_cost's term

    @property
    def mean_utilization(self) -> float:
        return sum(self.utilization.values()) / len(self.utilization) if self.utilization else 0.0


@dataclass(frozen=True)
class Decision:
    action: str  # HOLD | REBALANCE | ADD_GROUP | REMOVE_GROUP
    reason: str
    placement: Placement | None = None  # REBALANCE / REMOVE_GROUP: the plan to apply


@dataclass
class Autoscaler:
    config: AutoscalerConfig
    spec: ModelSpec
    telemetry: Telemetry
    last_change: float = 0.0  # when the placement or the group count last changed
    _since: dict[str, float] = field(default_factory=dict)  # condition -> when it started to hold

    def slots_per_group(self, num_groups: int) -> int:
        return self.config.slots_per_group(self.spec.num_experts, num_groups)

    @property
    def planner_config(self) -> PlannerConfig:
        return PlannerConfig(target_imbalance=self.config.target_imbalance, min_gain=self.config.min_gain)

    # ---- observe ----------------------------------------------------------------------

    def observe(self, table: PlacementTable, group_names: list[str], now: float | None = None) -> Observation:
        """now: for decide()'s timers, this host's clock by default; the telemetry window is read by
        Redis' clock, which wrote its buckets (the hosts' clocks may disagree), unless now is given."""
        window = self.config.window_s
        redis_now = self.telemetry.server_time() if now is None else now  # one clock reading: the same buckets
        loads, cost = expert_cost(self.telemetry, self.spec, window, self.config.touch_cost, redis_now)
        groups = self.telemetry.group_load(window, redis_now)
        utilization = {name: min(1.0, groups[name]["busy_s"] / window) if name in groups else 0.0
                       for name in group_names}
        current = table.to_placement(self.spec, self.slots_per_group(len(table.groups)))
        return Observation(time.time() if now is None else now, loads / window, int(loads.sum()), utilization,
                           float(current.imbalance(cost)), current, cost / window)

    # ---- decide -----------------------------------------------------------------------

    def decide(self, obs: Observation, table: PlacementTable) -> Decision:
        cfg, G = self.config, len(table.groups)
        scaling = cfg.max_groups is not None  # None: the group count stays as the controller started it
        max_groups = cfg.max_groups if scaling else G
        idle = obs.pairs < cfg.min_tokens
        current = obs.current
        extra = bool((current.replica_counts() > 1).any())
        held = {  # every condition is evaluated each round, so its timer resets the moment it stops holding
            "busy": self._held("busy", obs.mean_utilization > cfg.scale_up_utilization and G < max_groups, obs.now),
            "quiet": self._held("quiet", scaling and (idle or obs.mean_utilization < cfg.scale_down_utilization)
                                and G > cfg.min_groups, obs.now),
            "idle": self._held("idle", idle and extra, obs.now),
            "imbalanced": self._held("imbalanced", not idle and obs.imbalance > cfg.imbalance_threshold, obs.now),
        }
        if obs.now - self.last_change < cfg.cooldown_s:
            return Decision(HOLD, f"cooldown: {cfg.cooldown_s - (obs.now - self.last_change):.1f} s left")
        if held["busy"] >= cfg.scale_sustain_s:
            return Decision(ADD_GROUP, f"mean group utilisation {obs.mean_utilization:.2f} > "
                                       f"{cfg.scale_up_utilization} for {held['busy']:.0f} s")
        if held["quiet"] >= cfg.scale_sustain_s:
            placement = self.plan(obs.cost, current, G - 1)
            return Decision(REMOVE_GROUP, f"mean group utilisation {obs.mean_utilization:.2f} < "
                                          f"{cfg.scale_down_utilization} for {held['quiet']:.0f} s", placement)
        if held["idle"] >= cfg.sustain_s:
            placement = self.plan(np.zeros_like(obs.cost), current, G)
            return Decision(REBALANCE, f"no traffic for {held['idle']:.0f} s: dropping extra replicas", placement)
        if held["imbalanced"] >= cfg.sustain_s:
            placement = self.plan(obs.cost, current, G)
            if placement.weight_loads == 0 and _same_sets(placement, current):
                return Decision(HOLD, f"imbalance {obs.imbalance:.2f}, but no plan gains {cfg.min_gain} or more")
            return Decision(REBALANCE, f"imbalance {obs.imbalance:.2f} > {cfg.imbalance_threshold} for "
                                       f"{held['imbalanced']:.0f} s; plan expects {placement.expected_imbalance:.2f} "
                                       f"with {placement.weight_loads} weight load(s)", placement)
        return Decision(HOLD, f"imbalance {obs.imbalance:.2f}, utilisation {obs.mean_utilization:.2f}, "
                              f"{obs.pairs} pairs in {cfg.window_s:.0f} s")

    def plan(self, loads: np.ndarray, current: Placement, num_groups: int) -> Placement:
        """A plan for num_groups groups (the current ones, the last ones dropped or new ones empty)."""
        return plan(loads, num_groups, self.slots_per_group(num_groups), current, self.planner_config)

    def changed(self, now: float | None = None) -> None:
        """The controller applied a change: start the cooldown, restart every timer."""
        self.last_change = time.time() if now is None else now
        self._since.clear()

    def _held(self, name: str, holds: bool, now: float) -> float:
        if not holds:
            self._since.pop(name, None)
            return 0.0
        return now - self._since.setdefault(name, now)


def expert_cost(telemetry: Telemetry, shape, window_s: float, touch_cost: float = 0.0,
                now: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Over the window: pairs [L, E] (shape's sparse layers), and what the planner balances, pairs +
    touch_cost * calls that touched the expert (the same array when touch_cost is 0)."""
    loads = _per_expert(telemetry.expert_load(window_s, now), shape)
    if not touch_cost:
        return loads, loads
    return loads, loads + touch_cost * _per_expert(telemetry.expert_touches(window_s, now), shape)


def _per_expert(counts: dict[tuple[int, int], int], shape) -> np.ndarray:
    index = {layer: i for i, layer in enumerate(shape.sparse_layers)}
    out = np.zeros((len(index), shape.num_experts))
    for (layer, expert), n in counts.items():
        if layer in index and 0 <= expert < shape.num_experts:
            out[index[layer], expert] += n
    return out


def _same_sets(a: Placement, b: Placement) -> bool:
    """Whether two placements hold the same experts on the same groups (slot order and shares aside)."""
    if a.slots.shape[:2] != b.slots.shape[:2]:
        return False
    L, G = a.slots.shape[:2]
    return all(set(a.slots[l, g][a.slots[l, g] >= 0].tolist()) == set(b.slots[l, g][b.slots[l, g] >= 0].tolist())
               for l in range(L) for g in range(G))
