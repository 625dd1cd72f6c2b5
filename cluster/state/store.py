"""Cluster state in Redis: the placement table and the expert-group registry.

    controller --publish_placement(v)--> MULTI  SET {ns}:placement <json v>
                                                SET {ns}:placement:mac HMAC(placement key, ns + json)
                                                SET {ns}:placement:version v
                                                PUBLISH {ns}:placement:changes v   EXEC
    router     --placement_version() > its own?--> load_placement(): MAC verified, form checked
                                                -> switch at a step boundary
    controller --register_group()------> HSET {ns}:groups name {"address", "slots", "updated_at"}

Keys ({ns} is the namespace, "elasticmoe" by default; clusters can share one Redis under different ones):

| key | type | meaning |
|---|---|---|
| `{ns}:placement` | string | the current PlacementTable as JSON (`PlacementTable.to_json`): version, group addresses, (layer, expert) -> group ids |
| `{ns}:placement:mac` | string (hex) | HMAC-SHA256 of `{ns}` + newline + `{ns}:placement`, keyed by a key derived from the cluster secret; routers adopt no table without it |
| `{ns}:placement:version` | string (int) | the version of `{ns}:placement`, in [0, 2**53]; only ever increases. A hint for polls: publishes compare with the signed table's version |
| `{ns}:placement:changes` | pub/sub channel | one message per published placement; the payload is the new version as a decimal string |
| `{ns}:groups` | hash | expert group name -> JSON `{"address": "host:port", "slots": [[layer, expert], ...], "updated_at": unix seconds}` |
| `{ns}:autoscaler:paused` | string | "1" while `moectl autoscaler pause` holds; absent otherwise |
| `{ns}:autoscaler:status` | string | JSON written by the controller every round: last decision, last rebalance, imbalance, groups |
| `{ns}:autoscaler:requests` | list | manual changes (`moectl scale`) waiting for the controller, JSON each |
| `{ns}:autoscaler:results` | hash | request id -> JSON outcome, kept an hour |

Telemetry (load per expert, group utilisation, router heartbeats) has its own keys: cluster/state/telemetry.py.

Why a MAC: anyone who can write to Redis could otherwise publish a table whose addresses are their own,
and every router would send it the data-plane secret and users' hidden states. A ClusterState given
`signing_key` signs what it publishes and refuses (PlacementAuthError) a table without this cluster's
MAC; one without the key (moectl, tests) reads unverified. Everything else read back is checked against
its schema (cluster/state/schema.py) and skipped with a log line when it fails.

Why the version has its own key: a router polls it with one cheap GET (and compares
an int) instead of fetching and parsing the whole table. Why the write is one MULTI
with the PUBLISH last: a reader never sees a table without its version or a version
without its table, and a subscriber woken by the message always finds that table
(or a newer one) in place; the controller cannot die between the write and the
notification. Pub/sub is fire-and-forget: a router that was disconnected misses
messages, so routers also poll `{ns}:placement:version` now and then.

Credentials travel in the URL (`redis://:password@host:6379/0`, `rediss://...?ssl_ca_certs=/ca.pem`
for TLS; cluster/state/redis_url.py lists the forms). Log the URL only through redact_url(), and a
connection error only through ClusterState.explain().
"""
from __future__ import annotations

import json
import logging
import time

import redis

from cluster.placement.table import PlacementTable
from cluster.state import schema
from cluster.state.redis_url import URL_SCHEMES, check_tls_files, check_url, explain_error, redact_url, tls_unverified

__all__ = ["ClusterState", "ClusterStateError", "PlacementAuthError", "RedisAccessError", "StaleVersionError",
           "URL_SCHEMES", "check_url", "redact_url"]

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 5.0  # a control-plane call that hangs longer than this means Redis is gone, not slow
PUBSUB_HEALTH_CHECK_S = 10  # redis-py pings an idle subscription this often, so a dead connection is noticed


class ClusterStateError(RuntimeError):
    """Redis holds something this code cannot read, or refused a write; the message names the key."""


class StaleVersionError(ClusterStateError):
    """publish_placement got a version not greater than the one in Redis (another writer is ahead)."""


class PlacementAuthError(ClusterStateError):
    """The placement in Redis does not carry this cluster's MAC: forged, or another cluster's."""


class RedisAccessError(ClusterStateError):
    """Redis is unreachable or refused us (password, TLS); the message says which and what to change,
    and holds no secret (cluster/state/redis_url.py: explain_error)."""


class ClusterState:
    """The Redis schema above, over a synchronous redis-py client. Not shared across processes."""

    def __init__(self, redis_url: str, namespace: str = "elasticmoe", signing_key: bytes | None = None):
        """signing_key: sign published placements and verify loaded ones (the cluster's
        placement_signing_key, experts/credentials.py); None reads them unverified, publishes them unsigned."""
        check_url(redis_url)
        if signing_key is not None and (not isinstance(signing_key, bytes) or len(signing_key) < 16):
            raise ValueError("signing_key must be None or at least 16 bytes (placement_signing_key)")
        self._signing_key = signing_key
        check_tls_files(redis_url)  # here, where the connection is made: a missing CA file named now, not at a PING
        if not isinstance(namespace, str) or not namespace or ":" in namespace:
            raise ValueError(f"namespace must be a non-empty string without ':', got {namespace!r}")
        self.namespace = namespace
        self.url_for_logs = redact_url(redis_url)
        self._url = redis_url  # for explain() only; never logged
        if tls_unverified(redis_url):
            log.warning("TLS to %s without checking the server's certificate (ssl_cert_reqs=none)", self.url_for_logs)
        self.client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT_S,
                                           socket_connect_timeout=SOCKET_TIMEOUT_S,
                                           health_check_interval=PUBSUB_HEALTH_CHECK_S)
        self.placement_key = f"{namespace}:placement"
        self.version_key = f"{namespace}:placement:version"
        self.mac_key = f"{namespace}:placement:mac"
        self.changes_channel = f"{namespace}:placement:changes"
        self.groups_key = f"{namespace}:groups"
        self.paused_key = f"{namespace}:autoscaler:paused"
        self.autoscaler_status_key = f"{namespace}:autoscaler:status"
        self.requests_key = f"{namespace}:autoscaler:requests"
        self.results_key = f"{namespace}:autoscaler:results"

    def close(self) -> None:
        self.client.close()

    def ping(self) -> None:
        """One round trip; raise RedisAccessError saying what failed (nothing listening, password,
        TLS certificate, plaintext against a TLS port) when Redis does not answer PONG."""
        try:
            self.client.ping()
        except redis.RedisError as e:
            raise RedisAccessError(self.explain(e)) from None  # the message carries the cause, scrubbed

    def explain(self, error: BaseException) -> str:
        """A log-safe sentence for an error this state's client raised (cluster/state/redis_url.py)."""
        return explain_error(error, self._url)

    def __repr__(self) -> str:
        return f"ClusterState({self.url_for_logs!r}, {self.namespace!r})"

    # ---- placement ------------------------------------------------------------------

    def placement_version(self) -> int:
        """The version key (a hint for polls: the table is what is verified); 0 when none was ever published."""
        raw = self.client.get(self.version_key)
        version = 0 if raw is None else schema.version(raw)
        if version is None:
            raise ClusterStateError(f"{self.version_key} in {self.url_for_logs} holds {raw!r:.40}, not an int in "
                                    f"[0, 2**53]: forged or corrupt; the controller's next publish replaces it")
        return version

    def published_version(self) -> int:
        """The version of the placement in Redis that this cluster signed (without signing_key: the version
        key); 0 when there is none, or when what is there is not ours or not a version (publish over it)."""
        return self._stored_version(self.client)

    def _stored_version(self, client) -> int:  # client: self.client, or publish's WATCHing pipeline
        if self._signing_key is None:
            return schema.version(client.get(self.version_key) or "0") or 0
        text, mac = client.mget(self.placement_key, self.mac_key)
        try:
            return 0 if text is None else self._parse(text, mac).version
        except ClusterStateError as e:
            log.warning("%s; publishing over it", e)
            return 0

    def publish_placement(self, table: PlacementTable) -> None:
        """Store table (signed, with signing_key) and notify subscribers, atomically. Raises
        StaleVersionError unless table.version is greater than the version of the table in Redis."""
        table.check_form()  # never write what every reader would refuse
        text = table.to_json()
        with self.client.pipeline(transaction=True) as pipe:
            # WATCH makes compare-then-write atomic: if another writer changes the table between
            # our read and EXEC, EXEC fails and we compare again against its version.
            while True:
                try:
                    pipe.watch(self.placement_key, self.mac_key, self.version_key)
                    stored = self._stored_version(pipe)
                    if table.version <= stored:
                        raise StaleVersionError(
                            f"placement version {table.version} is not greater than version {stored} already in "
                            f"{self.placement_key} ({self.url_for_logs}); publish version {stored + 1} or later")
                    pipe.multi()
                    pipe.set(self.placement_key, text)
                    if self._signing_key is None:
                        pipe.delete(self.mac_key)
                    else:
                        pipe.set(self.mac_key, self._mac(text))
                    pipe.set(self.version_key, table.version)
                    pipe.publish(self.changes_channel, str(table.version))
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        log.info("published placement version %d (%d groups, %s) to %s", table.version, len(table.groups),
                 "signed" if self._signing_key else "unsigned", self.url_for_logs)

    def load_placement(self) -> PlacementTable | None:
        """The current table, or None. With signing_key, PlacementAuthError unless it carries this cluster's
        MAC; ClusterStateError when it is not a well-formed table."""
        text, mac = self.client.mget(self.placement_key, self.mac_key)
        return None if text is None else self._parse(text, mac)

    def _mac(self, text: str) -> str:
        return schema.placement_mac(self._signing_key, self.namespace, text)

    def _parse(self, text: str, mac: str | None) -> PlacementTable:
        where = f"{self.placement_key} in {self.url_for_logs}"
        if self._signing_key is not None and not schema.mac_matches(mac, self._mac(text)):
            raise PlacementAuthError(f"{where} {'has a wrong' if mac else 'has no'} MAC in {self.mac_key}: not "
                                     f"published by this cluster's controller (forged, or signed with another "
                                     f"cluster secret); refused")
        try:
            return schema.placement(text)
        except (ValueError, KeyError, TypeError) as e:
            raise ClusterStateError(f"{where} is not a placement table: {e}") from e

    def subscribe_placement(self) -> redis.client.PubSub:
        """A PubSub subscribed to {ns}:placement:changes, for a router to poll:

            sub = state.subscribe_placement()
            msg = sub.get_message(timeout=1.0)   # None, or {"type": "message", "data": "<version>", ...}
            if msg is not None and int(msg["data"]) > my_version:
                table = state.load_placement()   # may be newer than msg["data"]: use table.version
            ...
            sub.close()

        Returns once Redis has confirmed the subscription, so every placement published after this call
        is delivered. Use get_message(timeout=...), not listen(): the socket timeout would end a blocking
        listen() on a quiet channel. Messages sent while disconnected are lost; poll placement_version()."""
        sub = self.client.pubsub()
        sub.subscribe(self.changes_channel)
        # Read the confirmation here: left queued, it would make the caller's first
        # get_message() return None at once, which reads as "nothing published".
        confirmed = sub.get_message(timeout=SOCKET_TIMEOUT_S)
        if confirmed is None or confirmed["type"] != "subscribe":
            sub.close()
            raise ClusterStateError(f"{self.url_for_logs} did not confirm SUBSCRIBE {self.changes_channel} "
                                    f"within {SOCKET_TIMEOUT_S} s (got {confirmed!r})")
        sub.ignore_subscribe_messages = True
        return sub

    # ---- expert groups --------------------------------------------------------------

    def register_group(self, name: str, address: str, slots) -> None:
        """Record (or overwrite) where group `name` serves and which (layer, expert) slots it holds."""
        entry = {"address": address, "slots": [[int(l), int(e)] for l, e in slots], "updated_at": time.time()}
        self.client.hset(self.groups_key, name, json.dumps(entry))

    def unregister_group(self, name: str) -> None:
        self.client.hdel(self.groups_key, name)

    def groups(self) -> dict[str, dict]:
        """name -> {"address", "slots": [(layer, expert), ...], "updated_at"}; a malformed entry skipped, logged."""
        out = {}
        for name, text in self.client.hgetall(self.groups_key).items():
            try:
                out[name] = schema.group_entry(text)
            except ValueError as e:
                schema.skipped(f"{self.groups_key}[{name!r:.80}] in {self.url_for_logs}", e)
        return out

    # ---- autoscaler control ---------------------------------------------------------

    def set_paused(self, paused: bool) -> None:
        if paused:
            self.client.set(self.paused_key, "1")
        else:
            self.client.delete(self.paused_key)

    def paused(self) -> bool:
        return self.client.get(self.paused_key) == "1"

    def put_autoscaler_status(self, status: dict) -> None:
        self.client.set(self.autoscaler_status_key, json.dumps(status))

    def autoscaler_status(self) -> dict | None:
        """What the controller last wrote; None when nothing is, or it is not of the controller's form (logged)."""
        text = self.client.get(self.autoscaler_status_key)
        try:
            return schema.autoscaler_status(text) if text else None
        except ValueError as e:
            schema.skipped(f"{self.autoscaler_status_key} in {self.url_for_logs}", e)
            return None

    def push_request(self, request: dict) -> str:
        """Queue a manual change for the controller; returns its id (wait with result())."""
        request_id = f"req-{time.time_ns()}"
        self.client.rpush(self.requests_key, json.dumps({**request, "id": request_id}))
        return request_id

    def pop_requests(self) -> list[dict]:
        """Every queued request, parsed one by one (schema.request): a malformed one costs no other its place."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.lrange(self.requests_key, 0, -1)
            pipe.delete(self.requests_key)
            texts, _ = pipe.execute()
        return [schema.request(t) for t in texts]

    def put_result(self, request_id: str, result: dict) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(self.results_key, request_id, json.dumps(result))
            pipe.expire(self.results_key, 3600)
            pipe.execute()

    def result(self, request_id: str) -> dict | None:
        text = self.client.hget(self.results_key, request_id)
        return json.loads(text) if text else None
