"""When a group removed by a scale-down may be killed (cluster/control/retiring.py)."""
from __future__ import annotations

from cluster.control.retiring import RETIRE_WAIT_S, Retiring, ready_to_kill
from cluster.state.telemetry import ROUTER_TTL_S


def group(version: int, removed_at: float = 100.0) -> Retiring:
    return Retiring(name=f"g-v{version}", actor=None, address="10.0.0.1:5000", version=version, removed_at=removed_at)


def test_killed_once_every_router_heard_from_left_the_placement_that_named_it():
    g = group(7)
    assert ready_to_kill([g], [7, 8], now=101.0) == [g]
    assert ready_to_kill([g], [6, 8], now=101.0) == []  # one router still routes by v6, which names it
    both = [group(7), group(9)]
    assert ready_to_kill(both, [8, 9], now=101.0) == both[:1]


def test_silence_is_not_absence_it_waits_out_the_router_memory():
    """No router heard from (Redis restarted empty, routers cut off from it): wait, then kill anyway."""
    g = group(7, removed_at=100.0)
    assert RETIRE_WAIT_S == 12 * ROUTER_TTL_S  # the age at which telemetry forgets a silent router
    assert ready_to_kill([g], [], now=100.0 + RETIRE_WAIT_S - 0.1) == []
    assert ready_to_kill([g], [], now=100.0 + RETIRE_WAIT_S) == [g]
    # a router stuck behind does not hold the GPU forever either
    assert ready_to_kill([g], [6], now=100.0 + RETIRE_WAIT_S) == [g]
