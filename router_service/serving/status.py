"""The Status reply, built from the health snapshots (health.py) and the engine's figures.

Pure: no I/O here, so Status answers in microseconds whatever the groups and Redis do. It says
how old its snapshots are (age_s) and what did not answer at the last look (unreachable).
"""
from __future__ import annotations

import time

from elasticmoe.v1 import serving_pb2

from router_service.serving.health import GroupsSnapshot, RedisSnapshot


def build_status(model: str, groups: GroupsSnapshot, redis: RedisSnapshot | None, engine) -> serving_pb2.StatusResponse:
    """serving: every expert has a replica on a group that answered. load: (token, expert) pairs each
    expert has served, summed over its replicas."""
    table, live, now = groups.table, groups.live, time.monotonic()
    load: dict[tuple[int, int], int] = {}
    for reply in groups.stats.values():
        for s in reply.slots if reply is not None else ():
            key = (s.slot.layer, s.slot.expert)
            load[key] = load.get(key, 0) + s.tokens
    unreachable = [f"group-{g} {a}" for g, a in enumerate(table.groups) if g not in live]
    ages = [now - groups.at]
    if redis is not None:
        ages.append(now - redis.at)
        if redis.error is not None:
            unreachable.append(f"redis: {redis.error}")
    return serving_pb2.StatusResponse(
        serving=groups.every_expert_live(), placement_version=table.version, model=model,
        groups=[serving_pb2.GroupStatus(name=f"group-{g}", address=a, health="SERVING" if g in live else "NOT_SERVING",
                                        experts=[serving_pb2.ExpertRef(layer=l, expert=e) for l, e in table.slots_of(g)])
                for g, a in enumerate(table.groups)],
        placement=[serving_pb2.PlacementEntry(layer=l, expert=e, groups=[f"group-{g}" for g in gs],
                                              shares=table.shares_of((l, e)))
                   for (l, e), gs in sorted(table.replicas.items())],
        load=[serving_pb2.ExpertLoad(layer=l, expert=e, tokens=n) for (l, e), n in sorted(load.items())],
        autoscaler=_autoscaler(redis), kv=_kv(engine), age_s=max(ages), unreachable=unreachable)


def _kv(s) -> serving_pb2.KVCacheStatus:
    return serving_pb2.KVCacheStatus(block_size=s.block_size, blocks_total=s.blocks_total, blocks_used=s.blocks_used,
                                     preemptions=s.preemptions, pool_bytes=s.pool_bytes, running=s.running,
                                     waiting=s.waiting)


def _autoscaler(redis: RedisSnapshot | None) -> serving_pb2.AutoscalerStatus | None:
    """What the controller last wrote to Redis (as of the snapshot); None without Redis or a status."""
    if redis is None or redis.autoscaler is None:
        return None
    s = redis.autoscaler
    decision, last = s.get("decision") or {}, s.get("last_rebalance") or {}
    return serving_pb2.AutoscalerStatus(
        enabled=bool(s.get("enabled")), paused=redis.paused, imbalance=float(s.get("imbalance") or 0.0),
        decision=decision.get("action", ""), reason=decision.get("reason", ""),
        last_rebalance=last.get("result", ""), last_rebalance_error=last.get("error", ""),
        last_rebalance_version=int(last.get("to_version", 0)), last_rebalance_seconds=float(last.get("seconds", 0.0)),
        groups=int(s.get("groups", 0)))
