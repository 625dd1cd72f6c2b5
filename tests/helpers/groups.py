"""Test helper: expert-group gRPC servers in this process, on a private event loop."""
from __future__ import annotations

import asyncio
import threading

import grpc
import torch
from elasticmoe.v1 import expert_pb2, expert_pb2_grpc

from cluster.checkpoint.reader import Checkpoint
from cluster.placement.table import PlacementTable
from experts.config import ExpertGroupConfig
from experts.credentials import call_metadata
from experts.group import serve_group
from experts.servicer import ExpertServicer
from router_service.model.dense import DenseModel
from router_service.model.reference import ReferenceModel
from router_service.serving.dispatch import RemoteExperts


class Groups:
    """G expert-group servers on a private event loop in a background thread."""

    def __init__(self, checkpoint, table_slots: list[list[tuple[int, int]]], device: str = "cpu",
                 dtype: str | None = None, coalesce_window_s: float = 0.0):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        configs = [ExpertGroupConfig(str(checkpoint), slots, device=device, dtype=dtype, name=f"g{i}",
                                     coalesce_window_s=coalesce_window_s) for i, slots in enumerate(table_slots)]
        self.servicers = [self._run(ExpertServicer.create(c)) for c in configs]  # for fault injection
        started = [self._run(serve_group(c, s)) for c, s in zip(configs, self.servicers)]
        self.servers = [s for s, _ in started]
        self.addresses = [a for _, a in started]

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self):
        for server in self.servers:
            self._run(server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def distributed_model(path, num_groups: int, coalesce_window_s: float = 0.0):
    ckpt = Checkpoint(path)
    table = PlacementTable.round_robin(ckpt.spec, [f"pending:{g}" for g in range(num_groups)])
    groups = Groups(path, [table.slots_of(g) for g in range(num_groups)], coalesce_window_s=coalesce_window_s)
    table = PlacementTable(table.version, tuple(groups.addresses), table.replicas)
    remote = RemoteExperts(ckpt.spec, table)
    dense = DenseModel(ckpt.spec, ckpt.load_dense(torch.float32))
    return ReferenceModel(dense, remote), remote, groups, ckpt


def group_stats(address: str, credentials=None, timeout_s: float = 10) -> expert_pb2.StatsResponse:
    """One Stats call to the group at address, with the cluster secret when credentials are given."""
    with grpc.insecure_channel(address) as channel:
        return expert_pb2_grpc.ExpertServiceStub(channel).Stats(expert_pb2.StatsRequest(), timeout=timeout_s,
                                                                metadata=call_metadata(credentials))
