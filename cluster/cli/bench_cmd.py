"""`moectl simulate` and `moectl bench kernel|serving|skew|overload|soak|coalesce|transport`: wiring only, each
benchmark's flags (add_arguments) and code (run) live in its module under cluster/bench."""
from __future__ import annotations

import importlib

# name: (module under cluster/bench, one-line help)
BENCHES = {
    "kernel": ("kernel", "expert kernel: triton vs torch on given shapes (needs CUDA for triton)"),
    "serving": ("serving", "cluster vs in-process: prefill, decode per MoE layer, throughput"),
    "skew": ("skew", "the autoscaler under skewed traffic: before/after throughput, time to balance"),
    "overload": ("overload", "a burst beyond capacity: accepted, refused (RESOURCE_EXHAUSTED), completed, latency; "
                             "then one request to show recovery"),
    "soak": ("soak", "mixed traffic for --minutes while faults strike (group kill -9, Redis restart, rebalance, "
                     "slow group, burst): failures, greedy checks, memory"),
    "coalesce": ("coalesce", "1 and 2 router replicas sharing one pool of groups, coalescing window off and on: "
                             "tokens/s, the groups' Forwards vs kernel calls, greedy parity"),
    "transport": ("transport", "one MoE layer's round trip to a group, split: compute, codec, secret check, the "
                               "gRPC floor (a bare call, same bytes) and the Python around it"),
}


def _add(sub, name: str, module: str, summary: str) -> None:
    mod = importlib.import_module(f"cluster.bench.{module}")
    p = sub.add_parser(name, help=summary)
    mod.add_arguments(p)
    p.set_defaults(fn=mod.run)


def add_commands(sub) -> None:
    _add(sub, "simulate", "simulate", "replay a shifting-skew trace through the planner and autoscaler on a "
                                      "modelled 64-256 GPU cluster: imbalance, weights moved, vs static")
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (module, summary) in BENCHES.items():
        _add(bench, name, module, summary)
