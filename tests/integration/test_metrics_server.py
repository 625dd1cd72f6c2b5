"""The Prometheus /metrics server on loopback: bounded connections, a socket timeout, loopback by default."""
from __future__ import annotations

import socket
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from cluster.control.autoscaler_config import AutoscalerConfig
from cluster.state.metrics import serve_metrics
from router_service.serving.router_config import RouterConfig


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """True when the server closes sock (recv returns b"") within within_s."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_slow_connections_are_bounded_and_timed_out():
    registry = CollectorRegistry()
    Counter("probe", "a series to find in the scrape", registry=registry).inc()
    server, address = serve_metrics(registry, 0, max_connections=2, timeout_s=1.0)
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1"  # loopback unless told otherwise
    idle = []
    try:
        for _ in range(2):  # connect and say nothing: each holds a slot
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        time.sleep(0.2)  # let the server accept both
        extra = socket.create_connection((host, int(port)), timeout=5)
        idle.append(extra)
        assert closed_by_server(extra, 0.5), "a connection past max_connections must be closed at once"
        assert server.refused == 1
        start = time.monotonic()
        assert all(closed_by_server(s, 5.0) for s in idle[:2]), "idle connections must be dropped after timeout_s"
        assert time.monotonic() - start < 3.0
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:  # slots are free again
            assert b"probe_total 1.0" in reply.read()
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


def test_metrics_bind_loopback_by_default():
    placement = '{"version": 0, "groups": [], "replicas": []}'
    assert RouterConfig(checkpoint="c", placement=placement).metrics_host == "127.0.0.1"
    assert AutoscalerConfig().metrics_host == "127.0.0.1"
