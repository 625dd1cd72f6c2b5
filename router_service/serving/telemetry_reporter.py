"""A router's telemetry: every flush_s, routed load and a heartbeat to Redis.

    every flush_s (100 ms): observe  counts, touched = experts.take_load(), version = experts.version_in_use
                            apply    one pipelined write (cluster/state/telemetry.py)

At most one write per flush_s per router, whatever the request rate. When Redis is
unreachable the batch is dropped (counted in `dropped`, logged once per outage) and
serving goes on: telemetry must never slow or fail a request. Writing resumes on its
own when Redis comes back. Anything else that fails in a round is logged and counted by
the Ticker that runs it, and the next round runs anyway (ticker.py).
"""
from __future__ import annotations

import logging
import uuid

from cluster.state.telemetry import Telemetry
from router_service.serving.dispatch import RemoteExperts
from router_service.serving.ticker import Ticker

log = logging.getLogger(__name__)


class TelemetryReporter:
    def __init__(self, experts: RemoteExperts, telemetry: Telemetry, flush_s: float = 0.1,
                 router_id: str | None = None, metrics_address: str | None = None, on_flush=None, on_drop=None,
                 on_error=None):
        self.experts, self.telemetry, self.flush_s = experts, telemetry, flush_s
        self.router_id = router_id or f"router-{uuid.uuid4().hex[:8]}"
        self.metrics_address = metrics_address
        self.on_flush = on_flush  # called with each batch of counts (metrics), written or not
        self.on_drop = on_drop  # called once per batch lost to an unreachable Redis (metrics)
        self.flushes = 0  # batches written
        self.dropped = 0  # batches lost because Redis was unreachable
        self._failing = False
        self.ticker = Ticker("telemetry", flush_s, self.flush, on_error)

    def flush(self) -> bool:
        """Write what was routed since the last flush; False when the batch had to be dropped."""
        counts, touched = self.experts.take_load()
        if self.on_flush is not None:
            self.on_flush(counts)
        try:
            self.telemetry.record_router(self.router_id, counts, self.experts.version_in_use, self.metrics_address,
                                         touched=touched)
        except Exception as e:  # redis.ConnectionError, TimeoutError, ...: never let it reach serving
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            if not self._failing:
                log.warning("telemetry: cannot write to Redis (%s); dropping load counts until it is back",
                            self.telemetry.state.explain(e))  # what failed (password, TLS, down), no secret
            self._failing = True
            return False
        if self._failing:
            log.info("telemetry: Redis reachable again after %d dropped batch(es)", self.dropped)
        self._failing = False
        self.flushes += 1
        return True

    def close(self) -> None:
        self.ticker.close()
        try:
            self.telemetry.forget_router(self.router_id)  # the autoscaler need not wait for us any more
        except Exception:
            pass
