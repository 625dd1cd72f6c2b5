"""Overload through the real path: SDK -> Serve gRPC ingress -> router replica -> expert-group actors.

A burst of 10x what the router holds (max_running + max_queue): the excess is refused with
RESOURCE_EXHAUSTED as it arrives, every accepted request completes, and the service answers
the next request normally. Times are compared with each other, never with constants.
"""
from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys

import pytest

from cluster.bench.overload import burst, check_loopback, local_service

MAX_RUNNING, MAX_QUEUE = 2, 2
BURST = 10 * (MAX_RUNNING + MAX_QUEUE)
PROMPT = [5, 17, 42, 99, 3, 8, 13, 21]


@pytest.fixture(scope="module")
def address(tiny_checkpoint):
    router = {"max_running": MAX_RUNNING, "max_queue": MAX_QUEUE, "max_step_tokens": 64}
    with local_service(str(tiny_checkpoint), 2, router, num_cpus=2) as address:
        yield address


def test_burst_is_refused_fast_accepted_complete_and_service_recovers(address):
    report = asyncio.run(burst(address, BURST, PROMPT, max_tokens=48, timeout_s=120))
    print("\n".join(report.lines()))
    assert report.failed == {}, report.failed  # nothing but RESOURCE_EXHAUSTED, and no accepted call lost
    assert report.refused >= BURST // 2, report.lines()  # the bounded queue turned most of the burst away
    assert report.accepted >= MAX_RUNNING and report.completed == report.accepted
    # a refusal costs a round trip; a completion waits for its place and then 48 decode steps
    assert statistics.median(report.refused_s) < statistics.median(report.completed_s)
    assert max(report.refused_s) < max(report.completed_s)
    assert report.recovered


def test_moectl_bench_overload_against_a_running_service(address):
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "overload", "--address", address,
                        "--requests", "12", "--max-tokens", "24", "--timeout-s", "120"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "burst of 12 Generate calls" in r.stdout and "refused latency:" in r.stdout
    assert "after the burst: completed" in r.stdout, r.stdout


def test_bench_overload_aims_at_loopback_only():
    for ok in ("127.0.0.1:9000", "localhost:9000", "[::1]:9000"):
        check_loopback(ok)
    for bad in ("10.1.2.3:9000", "8.8.8.8:53", "[2001:db8::1]:9000"):
        with pytest.raises(ValueError, match="loopback addresses only"):
            check_loopback(bad)
