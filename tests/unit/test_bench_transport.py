"""`moectl bench transport` without a cluster: the codec timings are of the real wire functions on
the given tensors, and bad arguments are refused before anything starts."""
from __future__ import annotations

import argparse

import pytest
import torch

from cluster.bench.transport import add_arguments, codec_s, run


def test_codec_timings_cover_both_directions_and_grow_with_the_payload():
    small = codec_s(torch.randn(1, 64), torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, 2), repeats=20)
    large = codec_s(torch.randn(4096, 512), torch.zeros(4096, 2, dtype=torch.int32), torch.ones(4096, 2), repeats=20)
    assert set(small) == {"encode_request_s", "decode_request_s", "encode_result_s", "decode_result_s",
                          "secret_check_s"}
    assert all(v > 0 for v in small.values())
    assert large["encode_request_s"] > small["encode_request_s"]  # 8 MiB against 256 bytes of hidden state


@pytest.mark.parametrize("flags", [["--tokens", "0"], ["--tokens", "5000"], ["--calls", "5"]])
def test_out_of_range_arguments_are_refused_before_anything_starts(flags, tmp_path):
    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(ValueError, match="--tokens must be in \\[1, 4096\\] and --calls in \\[20, 10000\\]"):
        run(p.parse_args(["--checkpoint", str(tmp_path), *flags]))


def test_the_grpc_floor_echoes_the_bytes_back_and_times_a_bare_call():
    """The floor's server answers with the very bytes it got (so the call carries them both ways), and
    floor_s times real calls to it. Here the server runs on a loop in a thread of this process; the
    benchmark starts it as a Ray actor, a process of its own."""
    import asyncio
    import threading

    from grpc import aio

    from cluster.bench.grpc_floor import METHOD, _Echo, floor_s

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    echo = _Echo()
    try:
        address = asyncio.run_coroutine_threadsafe(echo.start(), loop).result(timeout=30)

        async def once(payload: bytes) -> bytes:
            async with aio.insecure_channel(address) as channel:
                return await channel.unary_unary(METHOD)(payload)

        payload = bytes(range(256)) * 64
        assert asyncio.run(once(payload)) == payload
        assert floor_s(address, payload, calls=20) > 0
    finally:
        asyncio.run_coroutine_threadsafe(echo.server.stop(0), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
