"""`moectl bench coalesce` without a cluster: its flags are parsed into settings, and bad values are
refused by name before anything starts (tests/integration/test_bench_coalesce_ray.py runs it)."""
from __future__ import annotations

import argparse

import pytest

from cluster.bench.coalesce import add_arguments, run, settings
from cluster.bench.local_cluster import LocalCluster


def parse(*flags):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--checkpoint", "nowhere", *flags])


def test_router_counts_and_windows_are_parsed_sorted_and_once_each():
    assert settings(parse()) == ([1, 2], [0.0, 0.002])
    assert settings(parse("--routers", "2,1,2", "--coalesce-window-s", "0.02,0")) == ([1, 2], [0.0, 0.02])


@pytest.mark.parametrize("flags, message", [
    (["--routers", "0"], r"--routers must be in \[1, 8\]"),
    (["--routers", "1,9"], r"--routers must be in \[1, 8\]"),
    (["--routers", "two"], "--routers must list ints"),
    (["--coalesce-window-s", "0.5"], r"--coalesce-window-s in \[0, 0.1\]"),
    (["--coalesce-window-s", "-0.001"], r"--coalesce-window-s in \[0, 0.1\]"),
    (["--coalesce-window-s", "2ms"], "--coalesce-window-s numbers"),
    (["--streams", "0"], "--streams must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--group-threads", "0"], "--group-threads must be >= 1"),
])
def test_bad_values_are_refused_before_anything_starts(flags, message):
    with pytest.raises(ValueError, match=message):
        run(parse(*flags))  # the checkpoint does not exist: refused before it is read


@pytest.mark.parametrize("routers", [0, True, 1.5])
def test_local_cluster_refuses_a_router_count_below_one(routers):
    with pytest.raises(ValueError, match="routers must be an int >= 1"):
        LocalCluster("nowhere", routers=routers)
