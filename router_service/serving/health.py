"""What Status and the health Check answer from: snapshots refreshed in the background.

    every interval_s, on two threads of their own (ticker.py):
      groups   Stats of every group of the latest placement (group_timeout_s each, concurrently)
      redis    the autoscaler's status and the pause flag (Redis' own socket timeout)
    Status / Check read the latest snapshots: they never wait on a group or on Redis.

Operators call Status exactly when something is wrong, and Kubernetes gives a probe 1 s: a
router whose Check waited on a blackholed group or a stopped Redis (5 s socket timeout) would be
marked unready, or a flood of unauthenticated Checks would hold its replica slots. Each snapshot
carries its time, so Status says how old it is and what did not answer; a groups snapshot older
than stale_s means the checker itself is stuck, and Check then says NOT_SERVING.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from cluster.placement.table import PlacementTable
from cluster.state.store import ClusterState
from router_service.serving.dispatch import RemoteExperts
from router_service.serving.ticker import Ticker


@dataclass(frozen=True)
class GroupsSnapshot:
    at: float  # time.monotonic() when taken
    table: PlacementTable
    stats: dict = field(default_factory=dict)  # address -> StatsResponse, None for a group that did not answer

    @property
    def live(self) -> set[int]:
        return {g for g, a in enumerate(self.table.groups) if self.stats.get(a) is not None}

    def every_expert_live(self) -> bool:
        live = self.live
        return all(live.intersection(gs) for gs in self.table.replicas.values())


@dataclass(frozen=True)
class RedisSnapshot:
    at: float
    autoscaler: dict | None = None  # the controller's last status (Redis), None when none was written
    paused: bool = False
    error: str | None = None  # why the last refresh failed (no secret), None when it worked


class HealthCache:
    def __init__(self, experts: RemoteExperts, state: ClusterState | None, interval_s: float = 1.0,
                 group_timeout_s: float = 1.0, on_error=None):
        self.experts, self.state, self.group_timeout_s = experts, state, group_timeout_s
        self.stale_s = max(10.0, 10 * interval_s)
        self._groups = GroupsSnapshot(0.0, experts.latest_table)
        self._redis = RedisSnapshot(0.0)
        self.refresh_groups()  # answer accurately from the first Check on
        self._tickers = [Ticker("health-groups", interval_s, self.refresh_groups, on_error)]
        if state is not None:
            self._tickers.append(Ticker("health-redis", interval_s, self.refresh_redis, on_error))

    def refresh_groups(self) -> None:
        table = self.experts.latest_table
        self._groups = GroupsSnapshot(time.monotonic(), table, self.experts.group_stats(self.group_timeout_s))

    def refresh_redis(self) -> None:
        try:
            snapshot = RedisSnapshot(time.monotonic(), self.state.autoscaler_status(), self.state.paused())
        except Exception as e:  # Redis down: say so in Status; the ticker need not count it as a fault
            snapshot = RedisSnapshot(time.monotonic(), self._redis.autoscaler, self._redis.paused,
                                     self.state.explain(e))
        self._redis = snapshot

    @property
    def groups(self) -> GroupsSnapshot:
        return self._groups

    @property
    def redis(self) -> RedisSnapshot:
        return self._redis

    def serving(self) -> bool:
        """Every expert has a replica on a group that answered, as of a snapshot that is not stale."""
        snapshot = self._groups
        return time.monotonic() - snapshot.at <= self.stale_s and snapshot.every_expert_live()

    def close(self) -> None:
        for ticker in self._tickers:
            ticker.close()
