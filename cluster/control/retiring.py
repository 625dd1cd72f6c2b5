"""Removed groups wait here until no router can still send them tokens; then they are killed.

    removed at placement v (the first version without the group)
    killed once  every router heard from in the last RETIRE_WAIT_S reports a version >= v
                 (and at least one was heard from),
          or     RETIRE_WAIT_S has passed since the removal.

Why silence waits: a router that sends no heartbeat is not necessarily gone. One cut off from
Redis, or a Redis restarted empty (no persistence), looks the same as none at all, while the
router still routes by the placement it has, which names the group. So silence waits out
RETIRE_WAIT_S, the age at which telemetry presumes a silent router dead
(cluster/state/telemetry.py: 12 x ROUTER_TTL_S); past it the group goes anyway, so a scale-down
always frees its GPU. A router cut off from Redis for longer finds the group gone and fails
over to another replica (or answers UNAVAILABLE for experts it had nowhere else).
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.state.telemetry import ROUTER_TTL_S

RETIRE_WAIT_S = 12 * ROUTER_TTL_S


@dataclass(frozen=True)
class Retiring:
    """A group taken out of the placement, still alive until no router can route to it."""

    name: str
    actor: object  # its ActorHandle
    address: str
    version: int  # the first placement version without it
    removed_at: float  # time.monotonic() of the removal


def ready_to_kill(retiring: list[Retiring], router_versions: list[int], now: float,
                  wait_s: float = RETIRE_WAIT_S) -> list[Retiring]:
    """The retiring groups no router can still use. router_versions: the placement version in use of
    every router heard from in the last wait_s seconds; now: time.monotonic()."""
    oldest = min(router_versions, default=None)
    return [g for g in retiring if (oldest is not None and oldest >= g.version) or now - g.removed_at >= wait_s]
