"""A background task that cannot die silently: run `fn` every interval_s on its own thread.

    every interval_s (or at once after wake()):  fn()
        raised?  log it (the traceback the first time, then one line per outage), call
                 on_error(name) (a metric), and run again next interval: the thread never ends
                 until close()

Routers run their telemetry and health checks this way: a router whose telemetry thread
died would stop heartbeating, and the controller would kill groups the router still uses.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class Ticker:
    def __init__(self, name: str, interval_s: float, fn: Callable[[], object],
                 on_error: Callable[[str], None] | None = None):
        self.name, self.interval_s, self.fn, self.on_error = name, interval_s, fn, on_error
        self.errors = 0  # rounds that raised
        self._failing = False
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by close(): stop without waiting out the interval
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.run_once()

    def run_once(self) -> None:
        try:
            self.fn()
        except Exception as e:  # a bug or a dead dependency: logged and counted, the loop lives on
            self.errors += 1
            if self.on_error is not None:
                self.on_error(self.name)
            if not self._failing:
                log.error("%s failed (%s); retrying every %.1f s", self.name, e, self.interval_s,
                          exc_info=self.errors == 1)
            self._failing = True
            return
        if self._failing:
            log.info("%s works again after %d failed round(s)", self.name, self.errors)
        self._failing = False

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout_s)
