"""A 75-second soak with faults (cluster/bench/soak.py): real Ray, Redis and gRPC, mixed traffic from
three clients while a group is killed, Redis restarted, a rebalance forced, a group slowed and a burst
sent. Every expert has a live replica throughout, so no request may fail; every greedy output must
equal the reference; resident memory must not grow after warm-up beyond 64 MiB per process."""
from __future__ import annotations

from cluster.bench.soak import soak, summary

MARGIN_BYTES = 64 * 2**20


def test_soak_of_traffic_and_five_kinds_of_fault(tiny_checkpoint):
    # 75 s, a fault 10 s after the last one recovered: all five kinds, inside CI's time budget (the
    # 10-minute run the README reports is `moectl bench soak --minutes 10`)
    report = soak(tiny_checkpoint, duration_s=75, fault_every_s=10, workers=3)
    print("\n" + summary(report))
    assert report["failed"] == 0, report["errors"]
    assert report["mismatched"] == 0 and report["greedy_checked"] >= 20, report["errors"]
    assert report["completed"] >= 20 and report["cancelled"] >= 1
    assert [f["kind"] for f in report["faults"]][:5] == ["kill_group", "restart_redis", "rebalance", "slow_group",
                                                         "burst"]
    assert all(f["recovered_s"] is not None for f in report["faults"]), report["faults"]
    for name, grown in report["growth_bytes"].items():
        assert grown is None or grown < MARGIN_BYTES, f"{name} grew {grown / 2**20:.0f} MiB after warm-up"
