"""Keep a router's placement current: poll the version in Redis, switch when it grows.

    every poll_s: observe  v = GET {ns}:placement:version        (one cheap GET)
                  decide   v > the table the router uses?
                  verify   load the table: its MAC (this cluster's controller signed it), its form,
                           this model's shape; refused -> log line, elasticmoe_placement_refused_total
                  apply    experts.set_table()                    (adopted at the next step)

Polling rather than pub/sub alone: pub/sub drops messages while a router is
disconnected, and one GET every half second costs nothing. `refresh_soon()` polls at once:
dispatch calls it when a group answers that the router's placement is stale. If Redis is unreachable the
router keeps serving on the placement it has; the failure is logged once per outage
and counted. A refused table is never adopted either: whoever can write to Redis cannot point
routers at their own address (the router would send it the data-plane secret and hidden states).
"""
from __future__ import annotations

import logging
import threading

from cluster.placement.table import PlacementError
from cluster.state.store import ClusterState, ClusterStateError
from router_service.serving.dispatch import RemoteExperts

log = logging.getLogger(__name__)


class PlacementFollower:
    def __init__(self, experts: RemoteExperts, state: ClusterState, poll_s: float = 0.5, on_refused=None):
        """state: built with the cluster's signing key (RouterCredentials.placement_signing_key), else
        tables are adopted unverified (routers without credentials: tests). on_refused(): a metric."""
        self.experts, self.state, self.poll_s, self.on_refused = experts, state, poll_s, on_refused
        self.failures = 0  # polls that could not reach Redis
        self.refused = 0  # distinct placements (or version keys) refused: unsigned, forged, malformed
        self._last_refusal: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set: poll now rather than at the end of poll_s
        self._thread = threading.Thread(target=self._loop, name="placement-follower", daemon=True)
        self._thread.start()

    def poll_once(self) -> bool:
        """One observe-decide-verify-apply round; True when a new placement was handed to the experts."""
        try:
            version = self.state.placement_version()
            if version <= self.experts.pending_version:
                return False
            table = self.state.load_placement()
            if table is None or table.version <= self.experts.pending_version:
                return False
            table.validate(self.experts.spec)
        except (ClusterStateError, PlacementError) as e:  # unsigned, forged or malformed: never adopted
            if str(e) != self._last_refusal:  # one line and one count per refusal, not one per poll
                self._last_refusal = str(e)
                self.refused += 1
                if self.on_refused is not None:
                    self.on_refused()
                log.error("placement refused: %s; serving on placement v%d", e, self.experts.table.version)
            return False
        self._last_refusal = None
        self.experts.set_table(table)
        log.info("placement v%d received (%d groups); switching at the next step", table.version, len(table.groups))
        return True

    def _loop(self) -> None:
        failing = False
        while True:
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.poll_once()
                if failing:
                    log.info("placement follower reaches Redis again")
                failing = False
            except Exception as e:  # Redis down or a bad table: keep serving on the current placement
                self.failures += 1
                if not failing:
                    # explain(): says what failed (password, TLS, down) and holds no secret
                    log.warning("placement follower cannot refresh (%s); serving on placement v%d",
                                self.state.explain(e), self.experts.table.version)
                failing = True

    def refresh_soon(self) -> None:
        """Poll Redis now (any thread): a group said this router's placement is out of date."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
