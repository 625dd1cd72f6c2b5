"""The controller's queue of manual requests, alone: a malformed request is answered (when it has an
id) or logged (when it has none), and never stops the requests after it."""
from __future__ import annotations

import asyncio
import logging

from cluster.control.controller_errors import ControllerError
from cluster.control.controller_requests import ManualRequests


class _State:
    def __init__(self, requests):
        self.requests, self.results = requests, {}

    def pop_requests(self):
        out, self.requests = self.requests, []
        return out

    def put_result(self, request_id, result):
        self.results[request_id] = result


class _Controller(ManualRequests):
    def __init__(self, requests):
        self.state = _State(requests)
        self.config = type("Config", (), {"name": "test"})()
        self.scaled = []

    async def scale(self, layer, expert, replicas):
        if expert > 7:
            raise ControllerError(f"expert must be in [0, 7], got {expert}")
        self.scaled.append((layer, expert, replicas))
        return {"result": "finished", "version": 2}


def test_malformed_requests_are_answered_or_logged_and_the_rest_is_served(caplog):
    c = _Controller([{"id": None, "invalid": "not JSON (x)"},
                     {"id": "a", "invalid": "no request id"},
                     {"id": "b", "kind": "resize"},
                     {"id": "c", "kind": "scale", "layer": 0, "expert": 9, "replicas": 2},
                     {"id": "d", "kind": "scale", "layer": "zero"},
                     {"id": "e", "kind": "scale", "layer": 1, "expert": 3, "replicas": 2}])
    with caplog.at_level(logging.WARNING, logger="cluster.control.controller"):
        asyncio.run(c._serve_requests())
    assert "dropped a malformed request from Redis: not JSON (x)" in caplog.text
    r = c.state.results
    assert r["a"] == {"ok": False, "error": "malformed request: no request id"}
    assert "unknown request kind 'resize'" in r["b"]["error"] and "expert must be in [0, 7]" in r["c"]["error"]
    assert not r["d"]["ok"] and r["e"]["ok"] and c.scaled == [(1, 3, 2)]
