"""What may be read back from Redis: every record's form, checked before anyone uses it.

    store.py      {ns}:placement (+ its MAC)   -> placement()        PlacementTable, form checked
                  {ns}:placement:version       -> version()          int in [0, 2**53] or None
                  {ns}:groups[name]            -> group_entry()      address, slots, updated_at
                  {ns}:autoscaler:status       -> autoscaler_status() the fields readers use, typed
                  {ns}:autoscaler:requests     -> request()          one by one; a bad one answered, not fatal
    telemetry.py  {ns}:routers[id]             -> heartbeat()        version, updated_at, metrics

Why: anyone who can write to Redis can put anything there, and a bad record must cost its reader
one skipped entry and a log line (skipped()), never a crash each round (a heartbeat whose version
was a string made every drain raise), a wait that never ends (a heartbeat from the future never
expires, so every rebalance ended "partial"), or a dial to an address nobody published. Each check
raises ValueError with one sentence naming the field; the caller says where.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math

from cluster.config import is_int
from cluster.placement.table import MAX_VERSION, PlacementTable, address_problem

log = logging.getLogger("cluster.state.store")

MAX_PLACEMENT_BYTES = 64 * 2**20  # DeepSeek-V3 with 8 replicas of every expert is ~2 MB: refused before parsing
MAX_RECORD_BYTES = 2**20  # a group registration, a heartbeat, the autoscaler status: a few KB each
_logged: set[str] = set()  # what skipped() has said, so a record that stays bad is logged once, not every round


def skipped(where: str, error: Exception) -> None:
    """Log that the record at `where` was skipped, once per (where, reason)."""
    line = f"{where} skipped: {error}"
    if line not in _logged and len(_logged) < 10_000:
        _logged.add(line)
        log.warning("%s", line)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _object(text: str, limit: int = MAX_RECORD_BYTES) -> dict:
    if len(text) > limit:
        raise ValueError(f"{len(text)} bytes, more than {limit}")
    d = json.loads(text)  # a JSONDecodeError is a ValueError
    if not isinstance(d, dict):
        raise ValueError(f"a JSON object is expected, got {type(d).__name__}")
    return d


def version(raw: str) -> int | None:
    """raw as a placement version, or None when it is not a decimal int in [0, MAX_VERSION]."""
    ok = isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 17
    return int(raw) if ok and int(raw) <= MAX_VERSION else None


def placement_mac(key: bytes, namespace: str, text: str) -> str:
    # The namespace is signed too: a table another cluster signed with the same secret is not valid here.
    return hmac.new(key, f"{namespace}\n{text}".encode(), hashlib.sha256).hexdigest()


def mac_matches(mac: str | None, expected: str) -> bool:
    return hmac.compare_digest(str(mac or "").encode(), expected.encode())


def placement(text: str) -> PlacementTable:
    if len(text) > MAX_PLACEMENT_BYTES:
        raise ValueError(f"{len(text)} bytes, more than {MAX_PLACEMENT_BYTES}")
    return PlacementTable.from_json(text)


def group_entry(text: str) -> dict:
    """{"address": "host:port", "slots": [(layer, expert), ...], "updated_at": unix s}."""
    d = _object(text)
    if (problem := address_problem(d.get("address"))) is not None:
        raise ValueError(f"address {problem}")
    slots = d.get("slots")
    if not isinstance(slots, list) or not all(isinstance(s, list) and len(s) == 2
                                              and all(is_int(v) and v >= 0 for v in s) for s in slots):
        raise ValueError("slots must be a list of [layer, expert] pairs of ints >= 0")
    if not _number(d.get("updated_at")):
        raise ValueError("updated_at must be a finite number of unix seconds")
    return {"address": d["address"], "slots": [tuple(s) for s in slots], "updated_at": float(d["updated_at"])}


def heartbeat(text: str, now: float, max_age_s: float) -> dict:
    """{"version": placement version in use, "updated_at": unix s, "metrics": "host:port" or None}. A time
    more than max_age_s ahead of `now` is refused: it would count as fresh for ever."""
    d = _object(text)
    if not is_int(d.get("version")) or not 0 <= d["version"] <= MAX_VERSION:
        raise ValueError(f"version must be an int in [0, 2**53], got {d.get('version')!r:.40}")
    if not _number(d.get("updated_at")):
        raise ValueError("updated_at must be a finite number of unix seconds")
    if d["updated_at"] > now + max_age_s:
        raise ValueError(f"updated_at is {d['updated_at'] - now:.0f} s in the future (clock or forgery)")
    if d.get("metrics") is not None and address_problem(d["metrics"]) is not None:
        raise ValueError(f"metrics must be null or host:port, got {d['metrics']!r:.80}")
    return {"version": d["version"], "updated_at": float(d["updated_at"]), "metrics": d.get("metrics")}


# autoscaler status: field -> what its value must be (None allowed for every one); others pass unread
_STATUS = {"version": is_int, "groups": is_int, "enabled": lambda v: isinstance(v, bool),
           "paused": lambda v: isinstance(v, bool), "imbalance": _number, "pairs_per_s": _number,
           "updated_at": _number, "metrics": lambda v: address_problem(v) is None,
           "utilization": lambda v: isinstance(v, dict) and all(_number(u) for u in v.values()),
           "decision": lambda v: isinstance(v, dict) and all(isinstance(v.get(k, ""), str)
                                                             for k in ("action", "reason")),
           "last_rebalance": lambda v: isinstance(v, dict) and all(isinstance(v.get(k, ""), str) for k in
                                                                   ("result", "reason", "error"))
           and all(_number(v.get(k, 0)) for k in ("from_version", "to_version", "seconds", "weights_loaded",
                                                  "unloaded", "started_at"))
           and is_int(v.get("to_version", 0))}


def autoscaler_status(text: str) -> dict:
    """The controller's status() (cluster/control/controller_scaling.py), each field it has of its type."""
    d = _object(text)
    for key, ok in _STATUS.items():
        if d.get(key) is not None and not ok(d[key]):
            raise ValueError(f"field {key} is not of the controller's form, got {d[key]!r:.80}")
    return d


def request(text) -> dict:
    """A `moectl scale` request from {ns}:autoscaler:requests, or {"id": its id or None, "invalid": why}."""
    try:
        parsed = json.loads(text)
    except (TypeError, ValueError) as e:
        return {"id": None, "invalid": f"not JSON ({e})"}
    if not isinstance(parsed, dict):
        return {"id": None, "invalid": f"not a JSON object: {type(parsed).__name__}"}
    if not isinstance(parsed.get("id"), str) or not parsed["id"]:
        return {"id": None, "invalid": "no request id"}
    return parsed
