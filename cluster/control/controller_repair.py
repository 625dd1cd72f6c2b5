"""Repair: groups Ray restarted serve again, groups Ray cannot restart are dropped.

    check_groups()  observe: address() of every group (short timeout)
                    decide:  groups answering None / another address / not at all need start()
                    apply:   start() them, probe the new address over gRPC, publish v+1 if any moved

Why check_groups() and not a Ray callback: Ray restarts a dead group (max_restarts)
but only runs its __init__, so the new process serves nothing until start() is
called, and with port 0 it listens on a new port (experts/group.py). Nobody is told;
the controller notices because address() answers None, and publishes the new address.
A process that is dying still answers with its old address for a moment, so an
address is published only once it answers a gRPC Stats call.

A mixin of Controller (cluster/control/controller.py), whose __init__ sets and documents
the state used here; the control loop (controller_scaling.py) calls check_groups().
"""
from __future__ import annotations

import asyncio
import logging

import grpc
from elasticmoe.v1 import expert_pb2
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from cluster.control.controller_errors import ControllerError, GroupNotReadyError
from cluster.control.rebalance import grpc_call
from cluster.placement.table import PlacementTable

log = logging.getLogger("cluster.control.controller")  # one logger for the whole controller, named as before the split


class GroupRepair:
    """check_groups() and refresh_group(): observe, decide, apply."""

    # ---- repair: observe / decide / apply ---------------------------------------------

    async def check_groups(self) -> dict:
        """Restart every group that stopped serving its published address; publish the new
        addresses as one new placement version. Returns {"version", "refreshed": [names moved],
        "pending": [names still restarting: call again], "failed": {name: error, for good}}."""
        async with self._lock:
            table = self._started()
            seen = await asyncio.gather(*(self._observe(i) for i in range(len(self._actors))))
            stale = [i for i, address in enumerate(seen) if address != table.groups[i]]
            return await self._refresh(stale)

    async def refresh_group(self, i: int) -> dict:
        """Call start() on group i again (after a Ray restart it serves nothing until then) and
        publish placement version+1 if its address changed. Same return shape as check_groups()."""
        async with self._lock:
            self._started()
            if not 0 <= i < len(self._actors):
                raise ControllerError(f"group id {i} is outside [0, {len(self._actors) - 1}]")
            return await self._refresh([i])

    async def _observe(self, i: int) -> str | None:
        """What group i says its address is; None when it serves nothing, is dead or too slow."""
        try:
            return await asyncio.wait_for(self._actors[i].address.remote(), self.config.health_timeout_s)
        except (asyncio.TimeoutError, RayActorError):
            return None  # restarting, dead for good, or its loop is blocked: all "not serving"

    async def _refresh(self, ids: list[int]) -> dict:
        table = self._table
        results = await asyncio.gather(*(self._restart(i) for i in ids), return_exceptions=True)
        moved, pending, failed, lost = {}, [], {}, []
        for i, result in zip(ids, results):
            if isinstance(result, (GroupNotReadyError, ActorUnavailableError)):
                pending.append(self.names[i])  # Ray is restarting it: expected right after a crash
                log.warning("controller %s: group %s (published at %s) is not ready yet, will retry: %s",
                            self.config.name, self.names[i], table.groups[i], result)
            elif isinstance(result, ActorDiedError) and await self._dead_for_good(i):  # out of restarts
                lost.append(i)
                failed[self.names[i]] = f"{type(result).__name__}: {result}"
                log.error("controller %s: group %s (published at %s) is dead and Ray will not restart it; its "
                          "experts move to the other groups", self.config.name, self.names[i], table.groups[i])
            elif isinstance(result, BaseException):  # start() itself failed: the next check tries again
                failed[self.names[i]] = f"{type(result).__name__}: {result}"
                log.error("controller %s: group %s (published at %s) could not be restarted: %s", self.config.name,
                          self.names[i], table.groups[i], failed[self.names[i]])
            elif result != table.groups[i]:
                moved[i] = result
        if moved:
            groups = tuple(moved.get(i, address) for i, address in enumerate(table.groups))
            new = PlacementTable(table.version + 1, groups, table.replicas, table.shares)
            if table == self._published:  # else survivors of a lost group wait to be published (below)
                await self._register_and_publish(new, moved)
                self._published = new
            self._table = new
            for i, address in moved.items():
                log.info("controller %s: group %s moved %s -> %s, placement version %d", self.config.name,
                         self.names[i], table.groups[i], address, new.version)
        refreshed = [self.names[i] for i in moved]
        if lost:
            await self._drop_lost_groups(lost)
        if self._table != self._published and self._table.groups:  # dropped groups, not yet published (or retry)
            await self._publish_survivors()
        return {"version": self._published.version, "refreshed": refreshed, "pending": pending, "failed": failed}

    async def _dead_for_good(self, i: int) -> bool:
        """ActorDiedError also ends a call whose process died mid-call while Ray restarts it; only an
        actor that still answers ActorDiedError to a new call is out of restarts."""
        try:
            await asyncio.wait_for(self._actors[i].address.remote(), self.config.health_timeout_s)
        except ActorDiedError:
            return True
        except (ActorUnavailableError, asyncio.TimeoutError):
            pass
        return False

    async def _drop_lost_groups(self, lost: list[int]) -> None:
        """Forget groups Ray cannot restart (call with self._lock held). _publish_survivors then
        publishes the placement without them. Until it does, routers keep the old table: requests
        for experts only the lost groups held fail fast with UNAVAILABLE."""
        old = self._table
        survivors = [i for i in range(len(old.groups)) if i not in lost]
        gone = [(self.names[i], self._actors[i], old.groups[i]) for i in lost]
        new_id = {g: k for k, g in enumerate(survivors)}
        replicas, shares = {}, {}
        for slot, groups in old.replicas.items():
            kept = [(new_id[g], share) for g, share in zip(groups, old.shares_of(slot)) if g in new_id]
            if kept:  # the shares of the replicas left, renormalised
                total = sum(share for _, share in kept)
                replicas[slot] = tuple(g for g, _ in kept)
                shares[slot] = tuple(share / total if total > 0 else 1.0 / len(kept) for _, share in kept)
        # Not published: _publish_survivors publishes v+1 from it.
        self._table = PlacementTable(old.version, tuple(old.groups[i] for i in survivors), replicas, shares)
        self.names = [self.names[i] for i in survivors]
        self._actors = [self._actors[i] for i in survivors]
        self._held = [self._held[i] for i in survivors]
        await self._kill(gone)  # unregister them; Ray has them dead already
        self.metrics.group_changes.labels("lost").inc(len(gone))
        if not survivors:
            log.error("controller %s: every expert group is lost; nothing serves until the controller is restarted",
                      self.config.name)

    def _orphans(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs the controller's table gives no replica (their groups were lost)."""
        table = self._table
        return [(l, e) for l in self.spec.sparse_layers for e in range(self.spec.num_experts)
                if not table.replicas.get((l, e))]

    async def _publish_survivors(self) -> None:
        """After groups were dropped: a rebalance that publishes v+1 over the groups left, placing
        the experts only lost groups held where they move the fewest weights (call with
        self._lock held). A failure leaves the survivors unpublished: the next group check retries."""
        orphans = self._orphans()
        current = self._current_placement()
        if orphans:
            placement = await asyncio.to_thread(self.autoscaler.plan, self._loads(), current, len(self._table.groups))
        else:
            placement = current  # every expert has a replica left: only the lost addresses go
        result = await self._rebalance(placement, f"lost group(s) dropped; {len(orphans)} expert(s) re-placed")
        if result.result == "failed":
            log.error("controller %s: publishing the placement without the lost group(s) failed (%s); next try at the "
                      "next group check", self.config.name, result.error)

    async def _restart(self, i: int) -> str:
        """start() on group i and the address it returns, once that address answers over gRPC."""
        address = await self._call_start(i)
        if not await self._serves(address):
            # start() answered by the dying process with its old address (experts/group.py): the
            # next check_groups() sees the restarted process's None and tries again.
            raise GroupNotReadyError(f"group {self.names[i]}: start() returned {address}, which does not answer Stats")
        # A restarted process loaded the slots it was created with; the table may say otherwise
        # since (rebalances): load what it must serve before routers are sent there, drop the rest.
        want = set(self._table.slots_of(i)) if i < len(self._table.groups) else set()
        held = await self.rebalancer.load(address, want)
        if held - want:
            held = await self.rebalancer.unload(address, held - want)
        self._held[i] = held
        return address

    async def _serves(self, address: str) -> bool:
        """Whether a group answers Stats at address within health_timeout_s."""
        try:
            await grpc_call(address, "Stats", expert_pb2.StatsRequest(), self.config.health_timeout_s, self.credentials)
            return True
        except grpc.aio.AioRpcError:
            return False
