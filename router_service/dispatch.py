"""The router's remote expert stage: dispatch -> experts (on groups, over gRPC) -> combine.

T = tokens in the step, k = experts per token, H = hidden, E = experts per layer.

  ids [T, k] --placement--> group of every (token, j) pair [T, k]
  for each group g with work, concurrently:
      rows = tokens with a pair on g
      Forward(hidden[rows], ids[rows] with other groups' pairs set to -1, weights[rows])
  combine: out[rows] += partial_g                     -> [T, H]

An expert with several replicas gets its tokens spread over them by token index.
The dense model calls this synchronously; the gRPC calls run on one asyncio loop in
a background thread that owns the persistent channels (grpc.aio objects belong to
the loop that made them).
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import grpc
import torch
from elasticmoe.v1 import expert_pb2, expert_pb2_grpc

from cluster.model_spec import ModelSpec
from cluster.placement_table import PlacementTable
from experts.wire import GRPC_OPTIONS, decode, encode


class DispatchError(RuntimeError):
    """A group failed its part of a layer; carries the group's address and the gRPC status."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str):
        super().__init__(f"expert group {address} failed Forward: {code.name}: {details}")
        self.address, self.code, self.details = address, code, details


@dataclass(frozen=True)
class _Routes:
    """A placement table compiled for lookups in the hot path."""

    table: PlacementTable
    replica_groups: dict[int, torch.Tensor]  # layer -> [E, R] group ids, padded by repeating
    replica_count: dict[int, torch.Tensor]  # layer -> [E] replicas per expert


class RemoteExperts:
    def __init__(self, spec: ModelSpec, table: PlacementTable, timeout_s: float = 30.0):
        table.validate(spec)
        self.spec, self.timeout_s = spec, timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="expert-dispatch", daemon=True)
        self._thread.start()
        self._stubs: dict[str, expert_pb2_grpc.ExpertServiceStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.set_table(table)

    def set_table(self, table: PlacementTable) -> None:
        """Switch to a new placement at the next step boundary (any thread may call this).

        The new routes are adopted when a step reaches its first MoE layer, so the layers
        of one step never mix two placements; the old replicas stay loaded until drained.
        """
        table.validate(self.spec)
        groups, counts = {}, {}
        for layer in self.spec.sparse_layers:
            reps = [table.replicas[(layer, e)] for e in range(self.spec.num_experts)]
            width = max(len(r) for r in reps)
            groups[layer] = torch.tensor([[r[i % len(r)] for i in range(width)] for r in reps])
            counts[layer] = torch.tensor([len(r) for r in reps])
        self._run(self._connect(table.groups))
        self._pending = _Routes(table, groups, counts)
        if not hasattr(self, "_routes"):
            self._routes = self._pending

    @property
    def table(self) -> PlacementTable:
        """The placement steps use now."""
        return self._routes.table

    @property
    def pending_version(self) -> int:
        """The newest placement handed over (in use, or waiting for the next step)."""
        return self._pending.table.version

    async def _connect(self, addresses) -> None:
        for address in addresses:
            if address not in self._channels:
                self._channels[address] = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
                self._stubs[address] = expert_pb2_grpc.ExpertServiceStub(self._channels[address])

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids [T, k], weights [T, k] -> sum of weighted expert outputs [T, H]."""
        if layer == self.spec.sparse_layers[0]:
            self._routes = self._pending  # a step boundary
        return self._run(self._forward(self._routes, layer, x, ids, weights))

    async def _forward(self, routes: _Routes, layer, x, ids, weights) -> torch.Tensor:
        num_tokens = ids.shape[0]
        token = torch.arange(num_tokens)[:, None].expand_as(ids)
        group_of_pair = routes.replica_groups[layer][ids, token % routes.replica_count[layer][ids]]  # [T, k]
        calls, row_sets = [], []
        for g in torch.unique(group_of_pair).tolist():
            mine = group_of_pair == g  # [T, k]
            rows = mine.any(dim=1).nonzero().squeeze(1)  # tokens with at least one pair on g
            sub_ids = torch.where(mine[rows], ids[rows], -1).to(torch.int32)
            request = expert_pb2.ForwardRequest(layer=layer, hidden=encode(x[rows]), expert_ids=encode(sub_ids),
                                                weights=encode(weights[rows].to(torch.float32)),
                                                placement_version=routes.table.version)
            calls.append(self._call(routes.table.groups[g], request))
            row_sets.append(rows)
        partials = await asyncio.gather(*calls)
        out = torch.zeros_like(x)
        for rows, partial in zip(row_sets, partials):
            out.index_add_(0, rows, partial.to(x.dtype))
        return out

    async def _call(self, address: str, request) -> torch.Tensor:
        try:
            response = await self._stubs[address].Forward(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise DispatchError(address, e.code(), e.details()) from None
        return decode(response.output, "output")

    def group_stats(self, timeout_s: float = 1.0) -> dict[str, expert_pb2.StatsResponse | None]:
        """Stats of every group in the current placement; None for a group that did not answer in time."""
        addresses = list(self.table.groups)

        async def ask(address):
            try:
                return await self._stubs[address].Stats(expert_pb2.StatsRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError:
                return None

        async def ask_all():
            return await asyncio.gather(*(ask(a) for a in addresses))

        return dict(zip(addresses, self._run(ask_all())))

    def close(self) -> None:
        async def _close():
            for channel in self._channels.values():
                await channel.close()

        self._run(_close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
