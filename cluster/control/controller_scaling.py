"""The control loop and scaling: telemetry, one autoscaler round, rebalances, groups added and removed.

    every interval_s: check_groups() (every repair_interval_s), group Stats -> Redis deltas,
                      `moectl scale` requests, then autoscale_once(): observe -> decide -> apply

A mixin of Controller (cluster/control/controller.py), whose __init__ sets and documents
the state used here. The autoscaler's observe and decide are cluster/control/autoscaler.py,
the rebalance itself cluster/control/rebalance.py; this part applies their decisions.
"""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from elasticmoe.v1 import expert_pb2

from cluster.control.autoscaler import ADD_GROUP, REBALANCE, REMOVE_GROUP, Decision, Observation
from cluster.control.rebalance import RebalanceResult, grpc_call
from cluster.control.retiring import RETIRE_WAIT_S, Retiring, ready_to_kill
from cluster.placement.table import PlacementTable

log = logging.getLogger("cluster.control.controller")  # one logger for the whole controller, named as before the split


class Scaling:
    """The control loop (_run), autoscale_once(), status() and the rebalances it applies."""

    async def _run(self) -> None:
        """Every interval_s: groups Ray restarted are repaired (every repair_interval_s), group
        counters go to Redis, manual requests are served, then one autoscaler round."""
        loop = asyncio.get_running_loop()
        repair_s = self.config.repair_interval_s
        next_check = loop.time() + (repair_s or 0)
        while True:
            await asyncio.sleep(self.config.autoscaler.interval_s)
            try:
                if repair_s is not None and loop.time() >= next_check:
                    next_check = loop.time() + repair_s
                    result = await self.check_groups()
                    if result["refreshed"] or result["failed"]:
                        log.warning("controller %s: group check: %s", self.config.name, result)
                await self._collect_group_stats()
                await self._serve_requests()
                await self.autoscale_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis down, a group mid-restart: log, keep the loop, try next round
                log.exception("controller %s: control round failed; next in %.1f s", self.config.name,
                              self.config.autoscaler.interval_s)

    async def _collect_group_stats(self) -> None:
        """Groups count what they serve (Stats); the controller turns counts into per-round
        deltas in Redis, so groups need no Redis of their own (experts/ knows nothing of it)."""
        table = self._started()
        names, addresses = list(self.names), list(table.groups)
        replies = await asyncio.gather(*(grpc_call(a, "Stats", expert_pb2.StatsRequest(),
                                                   self.config.health_timeout_s, self.credentials) for a in addresses),
                                       return_exceptions=True)
        self._answering = {a for a, reply in zip(addresses, replies) if not isinstance(reply, BaseException)}
        for name, reply in zip(names, replies):
            if isinstance(reply, BaseException):
                continue  # a group that does not answer adds nothing; check_groups repairs it
            tokens = {(s.slot.layer, s.slot.expert): s.tokens for s in reply.slots}
            counts = (reply.forward_calls, reply.kernel_calls, reply.merged_calls)
            last_tokens, last_busy, last_counts = self._last_stats.get(name, ({}, 0.0, (0, 0, 0)))
            if reply.busy_s < last_busy or any(n < last for n, last in zip(counts, last_counts)):  # restarted
                last_tokens, last_busy, last_counts = {}, 0.0, (0, 0, 0)
            delta = {slot: n - last_tokens.get(slot, 0) for slot, n in tokens.items() if n > last_tokens.get(slot, 0)}
            self._last_stats[name] = (tokens, reply.busy_s, counts)
            m = self.metrics
            for counter, n, last in zip((m.group_forwards, m.group_kernel_calls, m.group_coalesced), counts, last_counts):
                counter.labels(name).inc(n - last)  # Prometheus: how much coalescing happens, per group
            await asyncio.to_thread(self.telemetry.record_group, name, delta, reply.busy_s - last_busy,
                                    counts[0] - last_counts[0], reply.queue_depth)  # bucket by Redis' clock

    async def autoscale_once(self) -> Decision:
        """One observe -> decide -> apply round (the loop calls it; tests may too)."""
        async with self._lock:
            table = self._started()
            if not table.groups:  # every group lost (logged when it happened): nothing to observe or plan
                self.last_decision = Decision("hold", "no expert group left")
                return self.last_decision
            await asyncio.to_thread(self._ensure_published, self._published)
            obs = await asyncio.to_thread(self.autoscaler.observe, table, list(self.names))
            self._last_obs = obs
            self._export(obs, table)
            self.paused = await asyncio.to_thread(self.state.paused)
            await self._finish_retiring()
            if not self.config.autoscaler.enabled:
                decision = Decision("hold", "autoscaler disabled (autoscaler.enabled: false)")
            elif self.paused:
                decision = Decision("hold", "paused (moectl autoscaler resume)")
            elif self._adding is not None:
                decision = Decision("hold", "a new group is starting")
            else:
                # planning can take a second or more on a big model: off the actor's event loop
                decision = await asyncio.to_thread(self.autoscaler.decide, obs, table)
            self.last_decision = decision
            if decision.action == REBALANCE:
                await self._rebalance(decision.placement, decision.reason)
            elif decision.action == REMOVE_GROUP:
                await self._remove_last_group(decision)
            elif decision.action == ADD_GROUP:
                self.autoscaler.changed()
                self._adding = asyncio.get_running_loop().create_task(self._add_group(decision.reason))
            await asyncio.to_thread(self.state.put_autoscaler_status, self.status())
            return decision

    def _ensure_published(self, table: PlacementTable) -> None:
        """A Redis that restarted empty (no persistence) forgot the placement, or holds one this cluster did
        not sign: publish ours again, so new routers and `moectl` find it. Running routers kept serving on
        theirs meanwhile."""
        if self.state.published_version() < table.version:
            for i, name in enumerate(self.names[:len(table.groups)]):
                self.state.register_group(name, table.groups[i], table.slots_of(i))
            self.state.publish_placement(table)
            log.warning("controller %s: Redis had lost placement v%d; published it again", self.config.name,
                        table.version)

    def status(self) -> dict:
        """What the autoscaler did last, for `moectl` and the router's Status (JSON-able, no secrets)."""
        obs, d = self._last_obs, self.last_decision
        return {"version": self._published.version if self._published else 0, "groups": len(self.names),
                "enabled": self.config.autoscaler.enabled, "paused": self.paused,
                "imbalance": obs.imbalance if obs else None, "pairs_per_s": float(obs.loads.sum()) if obs else None,
                "utilization": obs.utilization if obs else {},
                "decision": {"action": d.action, "reason": d.reason} if d else None,
                "last_rebalance": self.last_rebalance, "metrics": self.metrics_address,
                "updated_at": time.time()}

    def _export(self, obs: Observation, table: PlacementTable) -> None:
        m, counts = self.metrics, obs.current.replica_counts()
        m.imbalance.set(obs.imbalance)
        m.groups.set(len(table.groups))
        m.placement_version.set(table.version)
        m.replicas.set(int(counts.sum()))
        m.replicated.set(int((counts > 1).sum()))
        for name, u in obs.utilization.items():
            m.utilization.labels(name).set(u)
        if self._answering is not None:
            live = {g for g, address in enumerate(table.groups) if address in self._answering}
            m.unserved.set(sum(1 for groups in table.replicas.values() if not live.intersection(groups)))
        for l, layer in enumerate(self.spec.sparse_layers):
            m.layer_max_load.labels(str(layer)).set(float(obs.loads[l].max()) if obs.loads.size else 0.0)
            if m.per_expert:
                for e in range(self.spec.num_experts):
                    m.expert_load.labels(str(layer), str(e)).set(float(obs.loads[l, e]))
                    m.expert_replicas.labels(str(layer), str(e)).set(int(counts[l, e]))

    async def _rebalance(self, placement, reason: str, groups=None, keep: int | None = None) -> RebalanceResult:
        """Apply a planner placement (call with self._lock held)."""
        old = self._table
        new = PlacementTable.from_placement(placement, self.spec, groups or old.groups, old.version + 1)
        self.metrics.rebalances.labels("started").inc()
        result = await self.rebalancer.apply(old, new, self._held, reason, keep)
        self.metrics.rebalances.labels(result.result).inc()
        self.metrics.rebalance_seconds.observe(result.seconds)
        self.metrics.weights_moved.inc(result.weights_loaded)
        self.metrics.weight_bytes_moved.inc(result.weights_loaded * self._expert_bytes())
        if placement is not None and placement.expected_imbalance == placement.expected_imbalance:  # not NaN
            self.metrics.planned_imbalance.set(placement.expected_imbalance)
        if result.result != "failed":
            self._table = self._published = new
            await self._register_and_publish(new, range(min(len(self.names), len(new.groups))), publish=False)
        self.autoscaler.changed()  # a failure cools down too: no retry storm
        self.last_rebalance = result.as_dict()
        return result

    def _loads(self) -> np.ndarray:
        """What the planner balances [L, E], from the last observation (zeros before the first)."""
        if self._last_obs is not None:
            return self._last_obs.cost
        return np.zeros((len(self.spec.sparse_layers), self.spec.num_experts))

    def _current_placement(self):
        """The planner's view of the table, with the slots per group its group count gets."""
        return self._table.to_placement(self.spec, self.autoscaler.slots_per_group(len(self._table.groups)))

    def _expert_bytes(self) -> int:
        spec = self.spec
        itemsize = 4 if self.model_dtype() == "float32" else 2
        return 3 * spec.hidden_size * spec.moe_intermediate_size * itemsize

    async def _add_group(self, reason: str) -> None:
        """Scale up: start one more group (outside the lock: waiting for a GPU node may take
        minutes), then rebalance onto it."""
        cfg = self.config
        name = f"{cfg.name}-group-{self._next_name}"  # never a name in use: lost groups leave gaps in the ids
        self._next_name += 1
        num_gpus = self._num_gpus()
        actor = None
        try:
            try:
                # lets the Ray (KubeRay) autoscaler start a node ahead of time; cleared below, whatever happens
                self.gpu_requests.ask(len(self.names) + 1, num_gpus)
                actor = self._create_group(name, [], num_gpus)
                log.info("controller %s: adding group %s (%s)", cfg.name, name, reason)
                address = await asyncio.wait_for(actor.start.remote(), cfg.group_start_timeout_s)
            except Exception as e:
                log.error("controller %s: could not add group %s: %s", cfg.name, name, e)
                self.metrics.group_changes.labels("up_failed").inc()
                if actor is not None:  # started too slowly or failed: it must not hold a GPU request
                    await self._kill([(name, actor, None)])
                return
            async with self._lock:
                self.names.append(name)
                self._actors.append(actor)
                self._held.append(set())
                old = self._table
                widened = PlacementTable(old.version, old.groups + (address,), old.replicas, old.shares)
                current = widened.to_placement(self.spec, self.autoscaler.slots_per_group(len(old.groups)))
                placement = await asyncio.to_thread(self.autoscaler.plan, self._loads(), current, len(widened.groups))
                self._table = widened  # not published: rebalance publishes v+1 with the new group in it
                result = await self._rebalance(placement, f"scale up: {reason}", groups=widened.groups)
                if result.result == "failed":  # (a success registered the new group with its slots)
                    self._table = old
                    self.names.pop(), self._actors.pop(), self._held.pop()
                    await self._kill([(name, actor, address)])
                    self.metrics.group_changes.labels("up_failed").inc()
                else:
                    self.metrics.group_changes.labels("up").inc()
        except Exception:  # never silent: the task's exception would otherwise go unread
            log.exception("controller %s: adding group %s failed", cfg.name, name)
            self.metrics.group_changes.labels("up_failed").inc()
        finally:
            if num_gpus:  # the group holds its GPU or is gone: a standing request would pin idle GPU pods
                self.gpu_requests.clear()
            self._adding = None

    async def _remove_last_group(self, decision: Decision) -> None:
        """Scale down: move the last group's replicas to the others, then stop it once drained."""
        old = self._table
        keep = len(old.groups) - 1
        result = await self._rebalance(decision.placement, f"scale down: {decision.reason}", groups=old.groups[:keep],
                                       keep=keep)
        if result.result == "failed":
            return
        name, actor, address = self.names.pop(), self._actors.pop(), old.groups[keep]
        self._held.pop()
        self._retiring.append(Retiring(name, actor, address, self._table.version, time.monotonic()))
        self.metrics.group_changes.labels("down").inc()
        if self._num_gpus():  # nothing may keep the Ray autoscaler from removing the GPU pod once it idles
            self.gpu_requests.clear()
        await self._finish_retiring()

    async def _finish_retiring(self) -> None:
        """Kill removed groups once no router can still route by a placement that named them
        (cluster/control/retiring.py: silence waits up to RETIRE_WAIT_S)."""
        if not self._retiring:
            return
        routers = await asyncio.to_thread(self.telemetry.routers, RETIRE_WAIT_S)
        done = ready_to_kill(self._retiring, [r["version"] for r in routers.values()], time.monotonic())
        if done:
            await self._kill([(g.name, g.actor, g.address) for g in done])
            self._retiring = [g for g in self._retiring if g not in done]
