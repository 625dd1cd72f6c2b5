"""`moectl bench coalesce` end to end on a tiny model: two routers, the second a Ray actor of its own
(LocalCluster(routers=2)), share the groups, and the groups' Stats count what coalescing merged.
No timing is asserted: benchmarks report."""
from __future__ import annotations

import argparse
import json

from cluster.bench.coalesce import add_arguments, run


def test_two_router_replicas_share_the_groups_with_the_same_greedy_tokens(tiny_checkpoint, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "coalesce.json"
    args = p.parse_args(["--checkpoint", str(tiny_checkpoint), "--routers", "1,2", "--coalesce-window-s", "0.02",
                         "--streams", "4", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1",
                         "--json", str(out)])
    assert run(args) == 0  # 0: every stream of every router made the first setting's greedy tokens
    assert "kernel calls" in capsys.readouterr().out
    one, two = json.loads(out.read_text())["results"]
    assert (one["routers"], two["routers"]) == (1, 2) and len(two["per_router_tokens_per_s"]) == 2
    assert one["same_tokens"] == two["same_tokens"] == 1
    # the replica's calls reached the groups: about twice the Forwards of one router (the same prompts; how
    # the engine batches them into steps may differ a little between runs), and a 20 ms window merged some
    assert two["forward_calls"] >= 1.5 * one["forward_calls"] > 0
    assert two["merged_calls"] > 0
    for r in (one, two):  # each merged Forward shares its kernel call with at least one other
        assert 0 < r["kernel_calls"] <= r["forward_calls"] - r["merged_calls"] / 2
