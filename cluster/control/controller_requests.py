"""Manual placement changes: `moectl scale` queues a request in Redis, the control loop serves it.

Served even while the autoscaler is paused: pausing stops the autoscaler's own decisions,
not an operator's. A mixin of Controller (cluster/control/controller.py), whose __init__
sets and documents the state used here.
"""
from __future__ import annotations

import asyncio
import logging

import numpy as np

from cluster.control.controller_errors import ControllerError
from cluster.placement.layout import Placement

log = logging.getLogger("cluster.control.controller")


class ManualRequests:
    """scale() and the queue of `moectl scale` requests."""

    async def _serve_requests(self) -> None:
        """Manual changes queued by `moectl scale` (served even while the autoscaler is paused)."""
        for request in await asyncio.to_thread(self.state.pop_requests):
            if request["id"] is None:  # nothing to answer it by: the log says why
                log.warning("controller %s: dropped a malformed request from Redis: %s", self.config.name,
                            request["invalid"])
                continue
            try:
                if "invalid" in request:
                    raise ControllerError(f"malformed request: {request['invalid']}")
                if request.get("kind") != "scale":
                    raise ControllerError(f"unknown request kind {request.get('kind')!r}")
                result = await self.scale(int(request["layer"]), int(request["expert"]), int(request["replicas"]))
                outcome = {"ok": result["result"] != "failed", **result}
            except (ControllerError, KeyError, ValueError, TypeError) as e:
                outcome = {"ok": False, "error": str(e)}
            await asyncio.to_thread(self.state.put_result, request["id"], outcome)

    async def scale(self, layer: int, expert: int, replicas: int) -> dict:
        """Give (layer, expert) exactly `replicas` replicas: new ones on the groups with the least
        load that have room, removed ones from the busiest; shares even. Returns the rebalance."""
        async with self._lock:
            table, spec = self._started(), self.spec
            G = len(table.groups)
            if layer not in spec.sparse_layers:
                raise ControllerError(f"layer {layer} is not an MoE layer (sparse layers: {list(spec.sparse_layers)})")
            if not 0 <= expert < spec.num_experts:
                raise ControllerError(f"expert must be in [0, {spec.num_experts - 1}], got {expert}")
            if not 1 <= replicas <= G:
                raise ControllerError(f"replicas must be in [1, {G}] (one per group at most), got {replicas}")
            S = self.autoscaler.slots_per_group(G)
            placement = table.to_placement(spec, S)
            l = list(spec.sparse_layers).index(layer)
            loads = self._loads()
            group_load = placement.group_loads(loads)[l]
            slots, shares = placement.slots.copy(), placement.shares.copy()
            holders = [g for g in range(G) if (slots[l, g] == expert).any()]
            if replicas > len(holders):
                room = [g for g in range(G) if g not in holders and (slots[l, g] < 0).any()]
                if len(room) < replicas - len(holders):
                    raise ControllerError(f"only {len(holders) + len(room)} group(s) have room for expert {expert} "
                                          f"of layer {layer} ({S} slots per layer per group)")
                for g in sorted(room, key=lambda g: (group_load[g], g))[:replicas - len(holders)]:
                    slots[l, g, int(np.argmax(slots[l, g] < 0))] = expert
            else:
                for g in sorted(holders, key=lambda g: (-group_load[g], g))[:len(holders) - replicas]:
                    slots[l, g][slots[l, g] == expert] = -1
            mine = slots[l] == expert
            shares[l][mine] = 1.0 / replicas
            shares[l][slots[l] < 0] = 0.0
            new = Placement(slots=slots, shares=shares, weight_loads=max(0, replicas - len(holders)),
                            expected_imbalance=float("nan"))
            if replicas == len(holders):
                return {"result": "unchanged", "version": table.version}
            result = await self._rebalance(new, f"moectl scale --layer {layer} --expert {expert} "
                                                f"--replicas {replicas}")
            return result.as_dict()
