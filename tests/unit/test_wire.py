"""The tensor wire format: round trips, byte overhead, and malformed messages."""
from __future__ import annotations

import pytest
import torch
from elasticmoe.v1 import expert_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from experts.wire import WIRE_DTYPES, WireError, decode, encode


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES.values()))
@pytest.mark.parametrize("shape", [(0, 8), (1, 5), (7, 3, 2), (16,)])
def test_round_trip(dtype, shape):
    t = (torch.randn(shape) * 100).to(dtype)
    assert torch.equal(decode(encode(t), "x"), t)


def test_non_contiguous_input():
    t = torch.randn(6, 4).T
    assert torch.equal(decode(encode(t), "x"), t)


def test_bytes_on_the_wire_within_5_percent_of_payload():
    """One decode step of a small model: 32 tokens, hidden 512, top-2."""
    req = expert_pb2.ForwardRequest(layer=3, hidden=encode(torch.randn(32, 512)),
                                    expert_ids=encode(torch.zeros(32, 2, dtype=torch.int32)),
                                    weights=encode(torch.rand(32, 2)), placement_version=7)
    payload = 32 * 512 * 4 + 32 * 2 * 4 * 2
    assert len(req.SerializeToString()) <= 1.05 * payload


@pytest.mark.parametrize(
    "msg, message",
    [
        (expert_pb2.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "hidden.dtype must be one of"),
        (expert_pb2.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 20), r"needs 24 bytes, got 20"),
        (expert_pb2.Tensor(dtype="float32", shape=[], data=b""), "1 to 4 non-negative dims"),
        (expert_pb2.Tensor(dtype="float32", shape=[-1, 4], data=b""), "non-negative dims"),
        (expert_pb2.Tensor(dtype="float32", shape=[2**40, 2**20], data=b""), r"needs \d+ bytes, got 0"),
    ],
)
def test_malformed_messages_name_the_field(msg, message):
    with pytest.raises(WireError, match=message):
        decode(msg, "hidden")


@settings(max_examples=300, deadline=None)
@given(dtype=st.text(max_size=10) | st.sampled_from(list(WIRE_DTYPES)),
       shape=st.lists(st.integers(-3, 2**31), max_size=6), data=st.binary(max_size=64))
def test_fuzzed_messages_decode_or_raise_wire_error(dtype, shape, data):
    """Bounded fuzz: any message either decodes to a tensor of its shape or raises WireError."""
    try:
        t = decode(expert_pb2.Tensor(dtype=dtype, shape=shape, data=data), "hidden")
    except WireError:
        return
    assert list(t.shape) == shape and t.numel() * t.element_size() == len(data)
