"""Telemetry in Redis: expert load from routers, utilisation from groups, router heartbeats.

    router (every <= 100 ms) --record_router()--> one pipelined write:
        HINCRBY {ns}:load:{b} "layer:expert" n      (each pair routed since the last flush)
        HINCRBY {ns}:touched:{b} "layer:expert" c   (calls that sent that expert one pair or more)
        EXPIRE  {ns}:load:{b}, {ns}:touched:{b} TTL
        HSET    {ns}:routers router_id {"version": v in use, "updated_at": t, ...}
    group (every second) --record_group()-------> one pipelined write:
        HINCRBY      {ns}:group-load:{b} "group|layer:expert" n   tokens served per slot
        HINCRBYFLOAT {ns}:group-load:{b} "group|busy_s" s         seconds computing
        HINCRBY      {ns}:group-load:{b} "group|calls" n          Forward calls
        HSET         {ns}:group-load:{b} "group|queue_depth" d    Forward calls in flight, sampled
        EXPIRE       {ns}:group-load:{b} TTL
    autoscaler --expert_load(window)/expert_touches(window)/group_load(window)/routers()--> sums of the
               buckets in the window

Keys ({ns} as in cluster/state/store.py; b = int(unix time // BUCKET_S), times from Redis' own clock (TIME)):

| key | type | meaning |
|---|---|---|
| `{ns}:load:{b}` | hash, TTL | field `"{layer}:{expert}"`: (token, expert) pairs routers sent to that expert during bucket b |
| `{ns}:touched:{b}` | hash, TTL | field `"{layer}:{expert}"`: routers' expert calls (one per layer per micro-batch) that sent that expert at least one pair during bucket b: how often its weights were read (the autoscaler's `touch_cost`) |
| `{ns}:group-load:{b}` | hash, TTL | per group: `"{group}\\|{layer}:{expert}"` tokens served, `"{group}\\|busy_s"`, `"{group}\\|calls"`, `"{group}\\|queue_depth"` |
| `{ns}:routers` | hash | router id -> JSON `{"version": placement version in use, "updated_at": unix s, "metrics": "host:port" or null}`; an entry of another form, or more than a TTL in the future, is skipped with a log line and deleted |

Why time buckets with a TTL: Redis memory stays bounded (at most TTL_S / BUCKET_S
buckets of at most L*E fields each), every router adds into the same bucket
without coordination (HINCRBY is atomic), and a window is a handful of HGETALLs.
Why a heartbeat with the version in use: the autoscaler unloads a dropped replica
only once every live router has left the placement that used it.

Telemetry is best-effort: a caller whose write fails drops that batch and counts it.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict

from cluster.state import schema
from cluster.state.store import ClusterState

BUCKET_S = 1.0  # the resolution of a load window
TTL_S = 300  # buckets older than this are gone: the longest window anyone can read
ROUTER_TTL_S = 5.0  # a router silent this long is not waited for (dead, or Redis-less)

Slot = tuple[int, int]


class Telemetry:
    """The key schema above over a ClusterState's Redis client."""

    def __init__(self, state: ClusterState):
        self.state = state
        self.client = state.client
        ns = state.namespace
        self._load_prefix = f"{ns}:load:"
        self._touched_prefix = f"{ns}:touched:"
        self._group_prefix = f"{ns}:group-load:"
        self.routers_key = f"{ns}:routers"

    def server_time(self) -> float:
        """Redis' clock (TIME), not this host's: routers, groups and the controller run on different
        machines, and heartbeat ages and load buckets must not depend on how well their clocks agree."""
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    # ---- write ----------------------------------------------------------------------

    def record_router(self, router_id: str, counts: dict[Slot, int], version: int, metrics: str | None = None,
                      now: float | None = None, touched: dict[Slot, int] | None = None) -> None:
        """Add a router's routed pairs (and the calls that touched each expert) to the current bucket
        and refresh its heartbeat."""
        now = self.server_time() if now is None else now
        bucket = str(_bucket(now))
        with self.client.pipeline(transaction=False) as pipe:
            for prefix, slots in ((self._load_prefix, counts), (self._touched_prefix, touched or {})):
                for (layer, expert), n in slots.items():
                    if n:
                        pipe.hincrby(prefix + bucket, f"{layer}:{expert}", int(n))
                pipe.expire(prefix + bucket, TTL_S)
            pipe.hset(self.routers_key, router_id,
                      json.dumps({"version": int(version), "updated_at": now, "metrics": metrics}))
            pipe.execute()

    def record_group(self, group: str, slot_tokens: dict[Slot, int], busy_s: float, calls: int, queue_depth: int,
                     now: float | None = None) -> None:
        """Add a group's work since its last record to the current bucket."""
        now = self.server_time() if now is None else now
        key = self._group_prefix + str(_bucket(now))
        with self.client.pipeline(transaction=False) as pipe:
            for (layer, expert), n in slot_tokens.items():
                if n:
                    pipe.hincrby(key, f"{group}|{layer}:{expert}", int(n))
            pipe.hincrbyfloat(key, f"{group}|busy_s", float(busy_s))
            pipe.hincrby(key, f"{group}|calls", int(calls))
            pipe.hset(key, f"{group}|queue_depth", int(queue_depth))
            pipe.expire(key, TTL_S)
            pipe.execute()

    def forget_router(self, router_id: str) -> None:
        self.client.hdel(self.routers_key, router_id)

    # ---- read -----------------------------------------------------------------------

    def expert_load(self, window_s: float, now: float | None = None) -> dict[Slot, int]:
        """(layer, expert) -> pairs routed in the last window_s seconds (summed over routers)."""
        return self._slots(self._load_prefix, window_s, now)

    def expert_touches(self, window_s: float, now: float | None = None) -> dict[Slot, int]:
        """(layer, expert) -> expert calls that sent it a pair or more in the last window_s seconds."""
        return self._slots(self._touched_prefix, window_s, now)

    def _slots(self, prefix: str, window_s: float, now: float | None) -> dict[Slot, int]:
        out: dict[Slot, int] = defaultdict(int)
        for bucket in self._read(prefix, window_s, now):
            for field, n in bucket.items():
                layer, expert = field.split(":")
                out[(int(layer), int(expert))] += int(n)
        return dict(out)

    def group_load(self, window_s: float, now: float | None = None) -> dict[str, dict]:
        """group -> {"busy_s", "calls", "queue_depth" (max sampled), "tokens": {(layer, expert): n}}
        over the last window_s seconds."""
        out: dict[str, dict] = {}
        for bucket in self._read(self._group_prefix, window_s, now):
            for field, value in bucket.items():
                group, _, what = field.rpartition("|")
                g = out.setdefault(group, {"busy_s": 0.0, "calls": 0, "queue_depth": 0, "tokens": defaultdict(int)})
                if what == "busy_s":
                    g["busy_s"] += float(value)
                elif what == "calls":
                    g["calls"] += int(value)
                elif what == "queue_depth":
                    g["queue_depth"] = max(g["queue_depth"], int(value))
                else:
                    layer, expert = what.split(":")
                    g["tokens"][(int(layer), int(expert))] += int(value)
        for g in out.values():
            g["tokens"] = dict(g["tokens"])
        return out

    def routers(self, max_age_s: float = ROUTER_TTL_S, now: float | None = None) -> dict[str, dict]:
        """Routers heard from in the last max_age_s seconds: id -> {"version", "updated_at", "metrics"}.
        Entries much older than that are deleted (a router that died without saying so)."""
        now = self.server_time() if now is None else now
        live, dead = {}, []
        for router_id, text in self.client.hgetall(self.routers_key).items():
            try:  # a malformed entry, or one from the future (it would never expire), is no live router
                entry = schema.heartbeat(text, now, max_age_s)
            except ValueError as e:
                schema.skipped(f"{self.routers_key}[{router_id!r:.80}]", e)
                dead.append(router_id)
                continue
            age = now - entry["updated_at"]
            if age <= max_age_s:
                live[router_id] = entry
            elif age > 12 * max_age_s:
                dead.append(router_id)
        if dead:
            self.client.hdel(self.routers_key, *dead)
        return live

    def _read(self, prefix: str, window_s: float, now: float | None) -> list[dict]:
        now = self.server_time() if now is None else now
        last = _bucket(now)
        first = _bucket(now - window_s) + 1 if window_s > 0 else last
        first = min(first, last)
        with self.client.pipeline(transaction=False) as pipe:
            for b in range(first, last + 1):
                pipe.hgetall(prefix + str(b))
            return pipe.execute()


def _bucket(t: float) -> int:
    return int(math.floor(t / BUCKET_S))
