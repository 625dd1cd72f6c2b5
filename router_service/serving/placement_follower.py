"""Keep a router's placement current: poll the version in Redis, switch when it grows.

    every poll_s: observe  v = GET {ns}:placement:version        (one cheap GET)
                  decide   v > the table the router uses?
                  apply    load the table, experts.set_table()   (adopted at the next step)

Polling rather than pub/sub alone: pub/sub drops messages while a router is
disconnected, and one GET every half second costs nothing. `refresh_soon()` polls at once:
dispatch calls it when a group answers that the router's placement is stale. If Redis is unreachable the
router keeps serving on the placement it has; the failure is logged once per outage
and counted.
"""
from __future__ import annotations

import logging
import threading

from cluster.state.store import ClusterState
from router_service.serving.dispatch import RemoteExperts

log = logging.getLogger(__name__)


class PlacementFollower:
    def __init__(self, experts: RemoteExperts, state: ClusterState, poll_s: float = 0.5):
        self.experts, self.state, self.poll_s = experts, state, poll_s
        self.failures = 0  # polls that could not reach Redis or load a table
        self._stop = threading.Event()
        self._wake = threading.Event()  # set: poll now rather than at the end of poll_s
        self._thread = threading.Thread(target=self._loop, name="placement-follower", daemon=True)
        self._thread.start()

    def poll_once(self) -> bool:
        """One observe-decide-apply round; True when a new placement was handed to the experts."""
        version = self.state.placement_version()
        if version <= self.experts.pending_version:
            return False
        table = self.state.load_placement()
        if table is None or table.version <= self.experts.pending_version:
            return False
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
