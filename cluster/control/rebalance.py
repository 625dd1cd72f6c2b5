"""Apply a new placement without failing a request.

    1. load     LoadExperts on every group that gains replicas (concurrently); wait for all
    2. publish  placement v+1 to Redis (with its notification)
    3. drain    wait until every live router reports a version in use >= v+1: no step routes
                by v any more, so no Forward for a dropped replica is in flight or will come
    4. unload   UnloadExperts on every group that loses replicas

Until step 2 the routers use v, which the groups still serve in full: a failure in
steps 1-2 unloads what step 1 added and leaves v in place (rolled back). After step
2 the routers may already use v+1, which is served in full too: nothing to roll back.
A drain that times out (a router stuck in a step, or gone without a word) leaves the
dropped replicas loaded, which is safe; the next rebalance unloads them.

Groups hold a superset of their slots in the table at every moment, which is why a
router on either version always finds its experts. What each group holds is tracked
here (`held`), from LoadExperts/UnloadExperts answers.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from elasticmoe.v1 import expert_pb2, expert_pb2_grpc

from cluster.placement.table import PlacementTable
from cluster.state.store import ClusterState
from cluster.state.telemetry import ROUTER_TTL_S, Telemetry
from experts.credentials import ExpertCredentials, call_metadata, channel

log = logging.getLogger(__name__)

Slot = tuple[int, int]


class RebalanceError(RuntimeError):
    """A step of a rebalance failed; the message names the step and the group."""


@dataclass
class RebalanceResult:
    result: str  # "finished" | "failed" (rolled back) | "partial" (published, drain timed out)
    reason: str
    from_version: int
    to_version: int
    seconds: float = 0.0
    weights_loaded: int = 0  # expert replicas loaded onto groups
    unloaded: int = 0
    error: str = ""
    started_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


async def grpc_call(address: str, method: str, request, timeout_s: float,
                    credentials: ExpertCredentials | None = None):
    """One ExpertService call on a short-lived channel (control plane: rare, never hot). LoadExperts and
    UnloadExperts carry the controller's control secret, every other method the data one."""
    async with channel(address, credentials) as ch:
        return await getattr(expert_pb2_grpc.ExpertServiceStub(ch), method)(
            request, timeout=timeout_s, metadata=call_metadata(credentials, method))


def _slots(slots) -> list[expert_pb2.Slot]:
    return [expert_pb2.Slot(layer=l, expert=e) for l, e in sorted(slots)]


class Rebalancer:
    def __init__(self, state: ClusterState, telemetry: Telemetry, load_timeout_s: float, drain_timeout_s: float,
                 router_poll_s: float = 0.1, credentials: ExpertCredentials | None = None):
        self.state, self.telemetry, self.credentials = state, telemetry, credentials
        self.load_timeout_s, self.drain_timeout_s, self.router_poll_s = load_timeout_s, drain_timeout_s, router_poll_s

    async def load(self, address: str, slots) -> set[Slot]:
        """LoadExperts(slots) on one group: every slot it holds after."""
        reply = await grpc_call(address, "LoadExperts", expert_pb2.LoadExpertsRequest(slots=_slots(slots)),
                                self.load_timeout_s, self.credentials)
        return {(s.layer, s.expert) for s in reply.slots}

    async def unload(self, address: str, slots) -> set[Slot]:
        reply = await grpc_call(address, "UnloadExperts", expert_pb2.UnloadExpertsRequest(slots=_slots(slots)),
                                self.load_timeout_s, self.credentials)
        return {(s.layer, s.expert) for s in reply.slots}

    async def apply(self, old: PlacementTable, new: PlacementTable, held: list[set[Slot]], reason: str,
                    keep_groups: int | None = None) -> RebalanceResult:
        """Move from `old` (published) to `new` (version old.version + 1, same group addresses for
        the groups both name). held[g] is updated in place. Groups past keep_groups (being
        removed) are not unloaded: the caller kills them after a successful drain."""
        res = RebalanceResult("failed", reason, old.version, new.version)
        start = time.monotonic()
        keep = len(new.groups) if keep_groups is None else keep_groups
        gains = {g: sorted(set(new.slots_of(g)) - held[g]) for g in range(len(new.groups))}
        gains = {g: s for g, s in gains.items() if s}
        log.info("rebalance v%d -> v%d (%s): loading %d replica(s) on %d group(s)", old.version, new.version, reason,
                 sum(map(len, gains.values())), len(gains))
        # 1. load
        results = await asyncio.gather(*(self.load(new.groups[g], s) for g, s in gains.items()),
                                       return_exceptions=True)
        failed = []
        for (g, slots), r in zip(gains.items(), results):
            if isinstance(r, BaseException):
                failed.append(f"group {g} ({new.groups[g]}): LoadExperts: {_describe(r)}")
            else:
                res.weights_loaded += len(set(slots) - held[g])
                held[g] = r
        if not failed:
            # 2. publish
            try:
                await asyncio.to_thread(self.state.publish_placement, new)
            except Exception as e:
                failed.append(f"publish v{new.version}: {_describe(e)}")
        if failed:
            res.error = "; ".join(failed)
            await self._roll_back(old, new, held, gains)
            res.seconds = time.monotonic() - start
            log.error("rebalance v%d -> v%d failed and rolled back to v%d: %s", old.version, new.version, old.version,
                      res.error)
            return res
        # 3. drain
        drained = await self.wait_for_routers(new.version)
        if not drained:
            res.result = "partial"
            res.error = (f"routers did not leave v{old.version} within {self.drain_timeout_s} s; "
                         "dropped replicas stay loaded until the next rebalance")
            res.seconds = time.monotonic() - start
            log.warning("rebalance v%d -> v%d: %s", old.version, new.version, res.error)
            return res
        # 4. unload: everything a kept group holds beyond its slots (including leftovers of a partial rebalance)
        res.unloaded = await self.unload_extras(new, held, keep)
        res.result = "finished"
        res.seconds = time.monotonic() - start
        log.info("rebalance v%d -> v%d finished in %.2f s: %d replica(s) loaded, %d unloaded", old.version,
                 new.version, res.seconds, res.weights_loaded, res.unloaded)
        return res

    async def unload_extras(self, table: PlacementTable, held: list[set[Slot]], keep: int) -> int:
        extras = {g: sorted(held[g] - set(table.slots_of(g))) for g in range(min(keep, len(table.groups)))}
        extras = {g: s for g, s in extras.items() if s}
        results = await asyncio.gather(*(self.unload(table.groups[g], s) for g, s in extras.items()),
                                       return_exceptions=True)
        unloaded = 0
        for (g, slots), r in zip(extras.items(), results):
            if isinstance(r, BaseException):
                log.warning("group %d (%s): UnloadExperts of %d slot(s) failed (%s); retried at the next rebalance",
                            g, table.groups[g], len(slots), _describe(r))
            else:
                unloaded += len(held[g] - r)
                held[g] = r
        return unloaded

    async def wait_for_routers(self, version: int) -> bool:
        """True once every router heard from recently reports version_in_use >= version."""
        deadline = time.monotonic() + self.drain_timeout_s
        while True:
            try:
                routers = await asyncio.to_thread(self.telemetry.routers, ROUTER_TTL_S)
                behind = {r: e["version"] for r, e in routers.items() if e["version"] < version}
            except Exception as e:  # Redis is down: we cannot know, so we wait (the safe side)
                behind = {"?": f"Redis unreachable: {e}"}
            if not behind:
                return True
            if time.monotonic() >= deadline:
                log.warning("routers still behind v%d after %.1f s: %s", version, self.drain_timeout_s, behind)
                return False
            await asyncio.sleep(self.router_poll_s)

    async def _roll_back(self, old: PlacementTable, new: PlacementTable, held: list[set[Slot]], gains) -> None:
        """Unload what this rebalance added (not what old needs); best effort, logged."""
        for g in gains:
            added = held[g] - set(old.slots_of(g)) if g < len(old.groups) else set(held[g])
            if added:
                try:
                    held[g] = await self.unload(new.groups[g], added)
                except Exception as e:
                    log.warning("rollback: group %d (%s) keeps %d extra slot(s): %s", g, new.groups[g], len(added),
                                _describe(e))


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"
