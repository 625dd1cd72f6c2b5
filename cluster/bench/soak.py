"""`moectl bench soak --minutes N`: mixed traffic against an in-process cluster while faults strike.

    LocalCluster: private Redis, local Ray, the controller with 2 groups, every expert on both (so no
        fault below leaves an expert without a live replica), a router in this process
    Traffic (soak_traffic.py): greedy short and long prompts checked against the reference, seeded
        sampled ones, streams cancelled midway, from a few threads; bursts refused at the bound
    FaultSchedule (soak_faults.py): every --fault-every-s in turn: a group kill -9, a Redis restart,
        a forced rebalance, a slow group, a burst; the router's and groups' resident memory sampled

Loopback only, bounded in time (--minutes, at most 60), stops by itself. The report: requests sent /
completed / cancelled / refused (by code) / failed, greedy outputs checked and mismatched, each fault
and how long the router took to serve every expert again, and resident memory over time with its
growth after warm-up. Exit 1 when a request failed or a greedy output differed.
"""
from __future__ import annotations

import json
import time

WARMUP_FRACTION = 1 / 3  # memory growth: the last samples against the samples after this much of the run


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", default="checkpoints/demo-small", help="checkpoint (default: the demo one)")
    p.add_argument("--minutes", type=float, default=2.0, help="how long to run (default 2, at most 60)")
    p.add_argument("--fault-every-s", type=float, default=15.0, help="seconds between faults (default 15)")
    p.add_argument("--workers", type=int, default=3, help="client threads sending requests (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="write the report there as JSON")


def run(args) -> int:
    if not 0 < args.minutes <= 60:
        raise ValueError(f"--minutes must be in (0, 60], got {args.minutes}")
    if not 1 <= args.fault_every_s <= 600 or not 1 <= args.workers <= 32:
        raise ValueError(f"--fault-every-s must be in [1, 600] and --workers in [1, 32], got {args.fault_every_s}, "
                         f"{args.workers}")
    report = soak(args.checkpoint, args.minutes * 60, args.fault_every_s, args.workers, args.seed)
    print(summary(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["ok"] else 1


def soak(checkpoint, duration_s: float, fault_every_s: float, workers: int = 3, seed: int = 0) -> dict:
    import ray

    from cluster.bench.local_cluster import LocalCluster
    from cluster.bench.soak_faults import FaultSchedule
    from cluster.bench.soak_traffic import Traffic
    from router_service.model.reference import ReferenceModel

    reference = ReferenceModel.from_pretrained(checkpoint)
    router = {"forward_slow_s": 0.5, "max_running": 8, "max_queue": 16, "max_step_tokens": 128,
              "placement_poll_s": 0.1}
    with LocalCluster(checkpoint, 2, autoscaler={"enabled": False, "spare_slots": 1.0}, router=router,
                      group_threads=1, name=f"soak-{int(time.time())}") as cluster:
        for layer in cluster.spec.sparse_layers:  # every expert on both groups
            for expert in range(cluster.spec.num_experts):
                ray.get(cluster.controller.scale.remote(layer, expert, 2), timeout=120)
        _wait(lambda: cluster.router.experts.pending_version == cluster.state.placement_version(), 30)
        traffic = Traffic(cluster.router.api, reference, workers, seed)
        faults = FaultSchedule(cluster, traffic, fault_every_s)
        try:
            time.sleep(duration_s)
        finally:
            faults.stop()
            traffic.stop()
    outcomes = traffic.outcomes.as_dict()
    growth = {name: _growth(samples) for name, samples in faults.memory.items()}
    return {"duration_s": duration_s, "fault_every_s": fault_every_s, "workers": workers, **outcomes,
            "faults": faults.faults, "memory": faults.memory, "growth_bytes": growth,
            "ok": outcomes["failed"] == 0 and outcomes["mismatched"] == 0}


def _wait(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)


def _growth(samples: list[tuple[float, int]]) -> int | None:
    """Resident memory at the end over what it was after warm-up: the largest of the last third of
    the samples minus the largest of the middle third (None with too few samples)."""
    if len(samples) < 3:
        return None
    third = max(1, int(len(samples) * WARMUP_FRACTION))
    middle, last = samples[third:2 * third] or samples[third:], samples[-third:]
    return max(v for _, v in last) - max(v for _, v in middle)


def summary(r: dict) -> str:
    refused = ", ".join(f"{n} {code}" for code, n in r["refused"].items()) or "none"
    lines = [f"soak {r['duration_s'] / 60:.1f} min, a fault every {r['fault_every_s']:.0f} s, {r['workers']} clients:",
             f"  requests: {r['sent']} sent, {r['completed']} completed, {r['cancelled']} cancelled midway, "
             f"refused: {refused}, failed: {r['failed']}",
             f"  greedy outputs checked against the reference: {r['greedy_checked']}, mismatched: {r['mismatched']}"]
    for f in r["faults"]:
        back = f"every expert served again after {f['recovered_s']} s" if f["recovered_s"] is not None else \
            "NOT serving again within 60 s"
        lines.append(f"  {f['at_s']:>6.1f} s  {f['kind']:<14} {f['detail']}: {back}")
    for name, samples in sorted(r["memory"].items()):
        mib = [v / 2**20 for _, v in samples]
        grown = r["growth_bytes"].get(name)
        lines.append(f"  memory {name}: {min(mib):.0f}-{max(mib):.0f} MiB resident over {len(mib)} samples; "
                     f"growth after warm-up {grown / 2**20:+.1f} MiB" if grown is not None else
                     f"  memory {name}: {len(mib)} samples")
    lines += [f"  first errors: {e}" for e in r["errors"]]
    lines.append("  OK" if r["ok"] else "  FAILED: a request failed or a greedy output differed from the reference")
    return "\n".join(lines)
