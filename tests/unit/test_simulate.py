"""`moectl simulate`: the trace, the cost model, and the real autoscaler on a modelled cluster.

Small shapes (64 GPUs, 64 experts, 2-3 layers) so every run takes about a second.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.bench.sim_config import SimConfig
from cluster.bench.sim_loop import simulate
from cluster.bench.sim_trace import Trace, zipf_weights
from cluster.cli.main import main


def small(**kw) -> SimConfig:
    base = dict(gpus=64, slots=2, layers=3, experts=64, duration_s=90.0, shift_s=30.0)
    return SimConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def skewed():
    return simulate(small())


# ---- trace and cost model -----------------------------------------------------------------


def test_zipf_weights_capped_at_one_over_top_k():
    w = zipf_weights(256, 1.2, 8)
    assert w.sum() == pytest.approx(1.0) and w.max() <= 1 / 8 + 1e-12
    assert (np.diff(w) <= 1e-15).all()  # still a ranking
    assert np.allclose(zipf_weights(16, 0.0, 4), 1 / 16)  # zipf 0 = uniform


def test_trace_is_seeded_and_shifts():
    a, b = Trace(small(seed=3)), Trace(small(seed=3))
    assert np.array_equal(a.p(0), b.p(0)) and np.array_equal(a.p(2), b.p(2))
    assert not np.array_equal(a.p(0), a.p(1))  # a shift changes the hot set
    assert not np.array_equal(a.p(0), Trace(small(seed=4)).p(0))
    assert np.allclose(a.p(1).sum(axis=1), 1.0)
    for trace in (a, Trace(small(shift_mode="rotate", rotate_by=5))):
        for epoch in (0, 1):  # p follows the ranking: rank r's expert gets the r-th Zipf weight
            assert np.array_equal(np.take_along_axis(trace.p(epoch), trace.ranking(epoch), axis=1),
                                  np.broadcast_to(trace.weights, (3, 64)))
    rotate = Trace(small(shift_mode="rotate", rotate_by=5))
    assert np.array_equal(rotate.ranking(1)[:, 0], rotate.ranking(0)[:, -5])  # the 5th coldest becomes the hottest
    assert np.array_equal(rotate.ranking(2), np.roll(rotate.ranking(0), 10, axis=1))


def test_capacity_matches_the_formula():
    c = small(layer_overhead_us=0.0, attention_us=0.0)
    # balanced: every GPU gets top_k / G pairs per token in every layer
    expected = c.pass_tokens / (c.layers * c.pass_tokens * c.top_k / c.gpus * c.pair_s)
    assert c.balanced_capacity == pytest.approx(expected)
    assert c.pair_s == pytest.approx(3 * 2 * 7168 * 2048 / (989e12 * 0.4))
    assert c.expert_bytes == 3 * 7168 * 2048 * 2
    assert c.capacity(np.full(c.layers, 2 * c.top_k / c.gpus)) == pytest.approx(expected / 2)  # imbalance 2: half


def test_two_micro_batches_hide_the_shorter_of_attention_and_experts():
    """A layer is attention then experts in sequence, or the larger of the two with the expert stage
    of one micro-batch overlapped with the other's attention."""
    c = small(layer_overhead_us=20.0, attention_us=100.0)
    peak = np.full(c.layers, c.top_k / c.gpus)
    experts_s = c.pass_tokens * peak[0] * c.pair_s + 20e-6
    assert c.capacity(peak) == pytest.approx(c.pass_tokens / (c.layers * (experts_s + 100e-6)))
    assert c.capacity(peak, overlap=True) == pytest.approx(c.pass_tokens / (c.layers * max(experts_s, 100e-6)))
    assert c.capacity(peak, overlap=True) > c.capacity(peak)


# ---- the autoscaler on the modelled cluster -------------------------------------------------


def test_deterministic_with_a_seed(skewed):
    again = simulate(small())
    assert again["series"] == skewed["series"]
    assert [r["weights"] for r in again["rebalances"]] == [r["weights"] for r in skewed["rebalances"]]
    assert simulate(small(seed=1))["series"] != skewed["series"]


def test_elastic_beats_static_under_skew(skewed):
    s = skewed["summary"]
    assert s["imbalance_elastic_mean"] < s["imbalance_static_mean"]
    assert s["capacity_ratio_mean"] > 1.0 and s["served_elastic"] > s["served_static"]
    # every shift is followed by a balanced placement within the shift
    assert all(b["seconds"] is not None and b["seconds"] < 30 for b in s["time_to_balance"])


def test_weights_move_after_each_shift(skewed):
    moved = {r["t"]: r["weights_moved"] for r in skewed["series"]}
    for shift in (30.0, 60.0):
        assert moved[shift + 29] > moved[shift - 1]
    assert skewed["summary"]["weights_moved"] == sum(r["weights"] for r in skewed["rebalances"]) > 0
    assert skewed["summary"]["gb_moved"] == pytest.approx(
        skewed["summary"]["weights_moved"] * small().expert_bytes / 1e9)


def test_uniform_trace_moves_nothing():
    result = simulate(small(zipf=0.0))
    assert result["summary"]["weights_moved"] == 0 and result["rebalances"] == []
    assert all(r["imbalance_elastic"] == pytest.approx(1.0) for r in result["series"])


def test_sustain_and_cooldown_come_from_decide():
    cooldown = 20.0
    result = simulate(small(shift_s=5.0, duration_s=80.0, autoscaler={"cooldown_s": cooldown, "sustain_s": 3.0}))
    starts = result["rebalances"]
    assert len(starts) >= 2
    assert starts[0]["t"] == 1.0 + 3.0  # the window has load from t=1; imbalanced held 3 s
    for prev, nxt in zip(starts, starts[1:]):
        assert nxt["t"] - prev["ready_at"] >= cooldown  # changed() at landing starts the cooldown
    eager = simulate(small(shift_s=5.0, duration_s=80.0, autoscaler={"cooldown_s": 0.0, "sustain_s": 3.0}))
    assert len(eager["rebalances"]) > len(starts)


def test_a_move_takes_effect_only_after_its_weights_load():
    c = small(link_gb_s=0.05, shift_s=0.0, duration_s=60.0)  # a slow link: seconds per replica
    result = simulate(c)
    first = result["rebalances"][0]
    assert first["ready_at"] - first["t"] == pytest.approx(first["max_per_gpu"] * c.expert_bytes / 0.05e9 + c.drain_s)
    assert first["ready_at"] - first["t"] > 2
    series = {r["t"]: r for r in result["series"]}
    t = first["t"] + 1
    while t + 1 <= first["ready_at"]:  # steps wholly inside the move: the old placement serves
        assert series[t]["imbalance_elastic"] == pytest.approx(series[0.0]["imbalance_static"])
        assert series[t]["in_flight"]
        t += 1
    later = series[float(int(first["ready_at"]) + 1)]
    assert later["imbalance_elastic"] < series[0.0]["imbalance_static"]


def test_initial_plan_baseline_starts_balanced():
    result = simulate(small(baseline="initial-plan"))
    assert result["series"][0]["imbalance_static"] < 1.2  # planned for the t=0 trace
    assert result["series"][-1]["imbalance_static"] > 2  # and stale after the shifts


@pytest.mark.parametrize("kw, message", [
    (dict(gpus=32), "--gpus must be an int in [64, 256], got 32"),
    (dict(gpus=300), "--gpus must be an int in [64, 256], got 300"),
    (dict(experts=256, slots=3), "--experts 256 do not fit in --gpus * --slots = 64 * 3"),
    (dict(top_k=65), "--top-k must be an int in [1, 64]"),
    (dict(mfu=1.5), "--mfu must be a number > 0 and <= 1"),
    (dict(shift_mode="swap"), "--shift-mode must be permute or rotate"),
    (dict(duration_s=0.0), "--duration-s must be a number > 0"),
    (dict(autoscaler={"cooldwn_s": 1}), "unknown AutoscalerConfig key 'cooldwn_s'"),
    (dict(autoscaler={"max_groups": 80}), "group scaling is not modelled"),
])
def test_bad_config_names_the_flag(kw, message):
    with pytest.raises(ValueError) as e:
        small(**kw)
    assert message in str(e.value)


# ---- CLI ----------------------------------------------------------------------------------

TINY = ["simulate", "--layers", "2", "--experts", "64", "--slots", "2", "--duration-s", "40", "--shift-s", "20",
        "--every", "10", "--quiet"]


def test_cli_smoke(tmp_path, capsys):
    path = tmp_path / "series.json"
    assert main(TINY + ["--json", str(path)]) == 0
    out = capsys.readouterr().out
    for line in ("a MODELLED cluster", "cluster     64 GPUs", "moves       88.1 MB per replica", "summary (40 s",
                 "imbalance        static mean", "weights moved", "time to balance"):
        assert line in out, line
    data = json.loads(path.read_text())
    assert len(data["series"]) == 40 and data["config"]["gpus"] == 64
    assert data["summary"]["rebalances"] == len(data["rebalances"]) > 0


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "16"], "--gpus must be an int in [64, 256], got 16"),
    (["--experts", "128", "--slots", "1"], "--experts 128 do not fit in --gpus * --slots = 64 * 1"),
    (["--autoscaler", "sustain_s=-1"], "sustain_s must be a number >= 0"),
    (["--every", "0"], "--every must be an int >= 1"),
])
def test_cli_bad_flags_are_one_line(argv, message, capsys):
    assert main(TINY + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
