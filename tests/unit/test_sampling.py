"""router_service.model.sampling against an obvious per-token reference; all draws use fixed seeds."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from router_service.model.sampling import (
    MAX_SEED,
    MAX_TOP_LOGPROBS,
    SamplingError,
    SamplingParams,
    make_generator,
    sample,
)


def reference_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The filtered sampling distribution, one token at a time in plain Python."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = order[:top_k] if top_k else order
    z = sum(math.exp(scaled[i]) for i in kept)
    probs = {i: math.exp(scaled[i]) / z for i in kept}
    nucleus, mass = [], 0.0
    for i in kept:
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += probs[i]
    out = [0.0] * len(logits)
    total = sum(probs[i] for i in nucleus)
    for i in nucleus:
        out[i] = probs[i] / total
    return out


def draw(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n draws from one row; the rows share one generator, so each draw advances it."""
    gen = make_generator(seed)
    tokens, _ = sample(logits_row.expand(n, -1), [params] * n, [gen] * n)
    return tokens  # [n]


def test_greedy_is_argmax_whatever_the_other_knobs():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0, top_p=[1.0, 0.3][b % 2], top_k=b % 4) for b in range(16)]
    gens = [make_generator(b) for b in range(16)]
    tokens, logprobs = sample(logits, params, gens)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).max(-1).values)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 100.0])
def test_top_k_1_and_tiny_top_p_are_greedy(temperature):
    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(1))
    argmax = logits.argmax(-1)
    for params in (SamplingParams(temperature=temperature, top_k=1),
                   SamplingParams(temperature=temperature, top_p=1e-6)):
        tokens, _ = sample(logits, [params] * 32, [make_generator(b) for b in range(32)])
        assert torch.equal(tokens, argmax), params


def test_logprobs_are_the_unmodified_model_distribution():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(2)) * 3
    params = [SamplingParams(temperature=2.5, top_k=5, top_p=0.8, seed=b) for b in range(8)]
    tokens, logprobs = sample(logits, params, [make_generator(p.seed) for p in params])
    expected = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    assert logprobs.dtype == torch.float32 and torch.allclose(logprobs, expected)


def test_same_seed_same_tokens_whatever_shares_the_batch():
    V, steps = 64, 20
    step_logits = torch.randn(steps, V, generator=torch.Generator().manual_seed(3))
    mine = SamplingParams(temperature=1.3, top_p=0.95, top_k=40, seed=1234)
    others = [SamplingParams(), SamplingParams(temperature=0.7, seed=9), SamplingParams(temperature=2.0, top_k=3),
              SamplingParams(temperature=1.0, top_p=0.5, seed=1234)]

    def run(batch: list[SamplingParams], row: int) -> list[int]:
        gens = [make_generator(p.seed) for p in batch]
        out = []
        for t in range(steps):
            noise = torch.randn(len(batch), V, generator=torch.Generator().manual_seed(100 + t))
            logits = noise.clone()
            logits[row] = step_logits[t]  # my row sees the same logits in every batch
            out.append(int(sample(logits, batch, gens)[0][row]))
        return out

    alone = run([mine], 0)
    assert run([mine], 0) == alone  # across calls
    assert run([others[0], mine, others[1]], 1) == alone
    assert run([*others, mine], 4) == alone
    assert run([mine, *others[::-1]], 0) == alone
    other_seed = SamplingParams(temperature=1.3, top_p=0.95, top_k=40, seed=4321)
    assert run([other_seed], 0) != alone  # the seed matters (20 draws over ~40 tokens)


def test_unseeded_generators_differ():
    assert make_generator(None).initial_seed() != make_generator(None).initial_seed()
    assert make_generator(7).initial_seed() == 7


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 3, 1.0), (0.5, 0, 0.6), (2.0, 4, 0.7), (1.0, 0, 0.9), (3.0, 6, 0.3), (1.0, 2, 0.999),
])
def test_filters_never_leave_the_allowed_set_and_match_the_reference(temperature, top_k, top_p):
    logits = torch.tensor([1.5, -0.3, 0.8, 2.1, 0.0, -1.2, 1.1, 0.4])
    expected = reference_distribution(logits.tolist(), temperature, top_k, top_p)
    allowed = {i for i, p in enumerate(expected) if p > 0}
    n = 4000
    tokens = draw(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), n, seed=11)
    assert set(tokens.tolist()) <= allowed
    counts = torch.bincount(tokens, minlength=len(expected)).double() / n
    # 4000 draws: one standard deviation is at most 0.008; 0.04 is 5 of them.
    assert torch.allclose(counts, torch.tensor(expected, dtype=torch.float64), atol=0.04), (counts, expected)


def test_temperature_1_matches_softmax():
    logits = torch.tensor([0.5, -1.0, 1.2, 0.0, 0.3])
    n = 20000
    tokens = draw(logits, SamplingParams(temperature=1.0), n, seed=5)
    empirical = torch.bincount(tokens, minlength=5).double() / n
    # 20000 draws: one standard deviation is at most 0.0036; 0.015 is about 4 of them.
    assert torch.allclose(empirical, torch.softmax(logits.double(), -1), atol=0.015), empirical


def test_low_temperature_sharpens():
    logits = torch.tensor([1.0, 0.9, 0.0])
    cold = torch.bincount(draw(logits, SamplingParams(temperature=0.05), 2000), minlength=3)
    hot = torch.bincount(draw(logits, SamplingParams(temperature=5.0), 2000), minlength=3)
    assert cold[0] > 0.8 * 2000 and hot[2] > 0.2 * 2000


# --- validation -----------------------------------------------------------------------------------

numbers = st.floats(allow_nan=False, allow_infinity=False)
junk = st.sampled_from([None, "1", float("nan"), float("inf"), True, [1]])
VALID = {
    "temperature": st.one_of(st.floats(0, 1e6), st.integers(0, 100)),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(0, 10**6),
    "max_tokens": st.integers(1, 4096),
    "seed": st.one_of(st.none(), st.integers(0, MAX_SEED)),
    "stop_token_ids": st.one_of(st.lists(st.integers(0, 10**6), max_size=4), st.tuples(st.integers(0, 9))),
    "logprobs": st.booleans(),
}
INVALID = {
    # `x != 0`: hypothesis rewrites `x < 0` into a bound that can yield -0.0, which is a valid 0
    "temperature": st.one_of(numbers.filter(lambda x: x < 0 and x != 0), junk),
    "top_p": st.one_of(numbers.filter(lambda x: x <= 0 or x > 1), junk),  # -0.0 <= 0: invalid, as it should be
    "top_k": st.one_of(st.integers(max_value=-1), st.floats(0.5, 10), junk),
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(4097, 10**9), st.just(2.0), junk),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(MAX_SEED + 1, 2**70), st.just(1.0), st.just(False)),
    "stop_token_ids": st.one_of(st.lists(st.integers(max_value=-1), min_size=1), st.just(5), st.just("ab"),
                                st.just((1, None)), st.just((True,))),
    "logprobs": st.sampled_from([0, 1, "yes", None]),
}


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries(VALID), st.data())
def test_invalid_fields_raise_naming_the_field(valid, data):
    field = data.draw(st.sampled_from(sorted(INVALID)))
    bad = data.draw(INVALID[field])
    with pytest.raises(SamplingError) as info:
        SamplingParams(**{**valid, field: bad}, max_tokens_limit=4096)
    assert info.value.field == field and field in str(info.value)
    assert isinstance(info.value, ValueError)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries(VALID))
def test_valid_fields_construct(valid):
    params = SamplingParams(**valid, max_tokens_limit=4096)
    assert params.stop_token_ids == tuple(valid["stop_token_ids"])
    assert params.greedy == (valid["temperature"] == 0)


def test_max_tokens_limit_is_optional_and_named():
    assert SamplingParams(max_tokens=10**6).max_tokens == 10**6
    with pytest.raises(SamplingError, match=r"max_tokens must be an integer >= 1, <= 100, got 101"):
        SamplingParams(max_tokens=101, max_tokens_limit=100)


def test_top_logprobs_is_bounded_and_needs_logprobs():
    assert SamplingParams(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS).top_logprobs == MAX_TOP_LOGPROBS
    for bad in (-1, MAX_TOP_LOGPROBS + 1, 2.0, True, None):
        with pytest.raises(SamplingError, match=r"top_logprobs must be an integer in \[0, 20\]") as info:
            SamplingParams(logprobs=True, top_logprobs=bad)
        assert info.value.field == "top_logprobs"
    with pytest.raises(SamplingError, match="top_logprobs needs logprobs"):
        SamplingParams(top_logprobs=3)
