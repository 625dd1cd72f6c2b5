"""Test helper: expert-group actors on a local Ray and one router replica behind Serve's gRPC and HTTP
ingress, on loopback ports (round-robin placement over the groups)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import ray
from ray import serve

from cluster.checkpoint.reader import Checkpoint
from cluster.placement.table import PlacementTable
from cluster.state.redis_server import free_port
from experts.config import ExpertGroupConfig
from experts.group import ExpertGroupActor
from router_service.serving.deployment import GRPC_SERVICER_FUNCTIONS, build_app, limit_client_messages


@dataclass
class Served:
    grpc: str  # "127.0.0.1:PORT"
    http_port: int
    groups: list  # the ExpertGroupActor handles, for fault tests


@contextlib.contextmanager
def served(checkpoint, router: dict | None = None, num_groups: int = 2):
    limit_client_messages()  # as moectl serve does: Serve's proxy, started below, inherits it
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    table = PlacementTable.round_robin(Checkpoint(checkpoint).spec, [f"pending:{g}" for g in range(num_groups)])
    groups = [ExpertGroupActor.remote(ExpertGroupConfig(str(checkpoint), table.slots_of(g), device="cpu",
                                                        name=f"group-{g}")) for g in range(num_groups)]
    try:
        table = PlacementTable(1, tuple(ray.get([g.start.remote() for g in groups], timeout=120)), table.replicas)
        grpc_port, http_port = free_port(), free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        # unauthenticated unless `router` says otherwise (a token source with allow_unauthenticated: false)
        serve.run(build_app({"allow_unauthenticated": True, **(router or {}), "checkpoint": str(checkpoint),
                             "placement": table.to_json()}), name="moe")
        yield Served(f"127.0.0.1:{grpc_port}", http_port, groups)
    finally:
        with contextlib.suppress(Exception):  # best effort on the way out; ray.shutdown follows regardless
            serve.shutdown()
        for g in groups:
            ray.kill(g)
        ray.shutdown()
