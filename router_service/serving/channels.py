"""The router's persistent gRPC channels to the expert groups, one per group address, and what the
router has seen of each group's health: its last failed and last answered Forward.

All of it runs on dispatch's own asyncio loop (grpc.aio objects belong to the loop that made
them): channels are opened when a placement names a new group, and closed once neither the
placement in use nor the next one names it (a removed group, or one restarted on a new port),
so they do not pile up over a cluster's life.
"""
from __future__ import annotations

import asyncio
import time

import grpc
from elasticmoe.v1 import expert_pb2, expert_pb2_grpc

from experts.credentials import ExpertCredentials, RouterCredentials, call_metadata, channel
from experts.wire import GRPC_OPTIONS

DOWN_S = 2.0  # after a failed Forward, a group gets no traffic for this long when another replica exists


class GroupChannels:
    def __init__(self, credentials: ExpertCredentials | RouterCredentials | None):
        self._credentials = credentials
        self.metadata = call_metadata(credentials)  # the data-plane secret, on every call
        self.stubs: dict[str, expert_pb2_grpc.ExpertServiceStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._failed_at: dict[str, float] = {}  # address -> its last failed Forward (monotonic)
        self._ok_at: dict[str, float] = {}  # address -> its last answered Forward

    def failed(self, address: str) -> None:
        self._failed_at[address] = time.monotonic()

    def answered(self, address: str) -> None:
        self._ok_at[address] = time.monotonic()

    def down(self, address: str) -> bool:
        """Failed within DOWN_S: its pairs go to another replica where there is one."""
        return self._failed_at.get(address, float("-inf")) + DOWN_S > time.monotonic()

    def unproven(self, address: str) -> bool:
        """Has not answered since it last failed (down, or back from a restart still under way): it may
        not take a slow group's pairs, since slow beats failed."""
        return self._failed_at.get(address, -1.0) >= self._ok_at.get(address, 0.0)

    @property
    def addresses(self) -> set[str]:
        return set(self._channels)

    async def connect(self, addresses) -> None:
        for address in addresses:
            if address not in self._channels:
                self._channels[address] = channel(address, self._credentials, GRPC_OPTIONS)
                self.stubs[address] = expert_pb2_grpc.ExpertServiceStub(self._channels[address])

    async def close_unused(self, keep: set[str]) -> list[str]:
        """Close every channel not in keep; returns the addresses closed."""
        gone = [a for a in self._channels if a not in keep]
        for address in gone:
            self.stubs.pop(address)
            self._failed_at.pop(address, None)
            self._ok_at.pop(address, None)
            await self._channels.pop(address).close()
        return gone

    async def stats(self, addresses, timeout_s: float) -> dict[str, expert_pb2.StatsResponse | None]:
        """Stats of each group, concurrently; None for one that did not answer in time."""
        async def ask(address):
            try:
                return await self.stubs[address].Stats(expert_pb2.StatsRequest(), timeout=timeout_s,
                                                       metadata=self.metadata)
            except grpc.aio.AioRpcError:
                return None

        return dict(zip(addresses, await asyncio.gather(*(ask(a) for a in addresses))))

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
