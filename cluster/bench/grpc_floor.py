"""The floor under one Forward: a bare gRPC unary call over loopback, to a process of its own, carrying
the same bytes, with nothing of ours on either side (no routing, codec, checks or compute).

    start_echo()            -> an Echo actor (its own process) serving bytes back on a free port
    floor_s(address, bytes) -> median round trip of grpc.aio unary calls from this process, after warm-up

`moectl bench transport` subtracts it from what is left of a Forward's round trip, so the rest splits
into what gRPC costs at all and the Python around it on both sides.
"""
from __future__ import annotations

import asyncio
import statistics
import time

METHOD = "/elasticmoe.bench.Echo/Echo"


def start_echo():
    """(actor, "127.0.0.1:port"); the caller kills the actor."""
    import ray

    actor = ray.remote(num_cpus=0)(_Echo).remote()
    return actor, ray.get(actor.start.remote(), timeout=120)


class _Echo:
    async def start(self) -> str:
        import grpc
        from grpc import aio

        async def echo(request: bytes, context) -> bytes:
            return request

        self.server = aio.server()  # bytes in, bytes out: no (de)serializer on either side
        handler = grpc.unary_unary_rpc_method_handler(echo)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("elasticmoe.bench.Echo",
                                                                                    {"Echo": handler}),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"


def floor_s(address: str, payload: bytes, calls: int, warmup: int = 10) -> float:
    from grpc import aio

    async def main() -> float:
        async with aio.insecure_channel(address) as channel:
            call = channel.unary_unary(METHOD)
            for _ in range(warmup):
                await call(payload)
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                await call(payload)
                times.append(time.perf_counter() - start)
            return statistics.median(times)

    return asyncio.run(main())
