"""End to end: SDK -> Serve gRPC ingress -> router replica -> expert-group actors, real Ray."""
from __future__ import annotations

import socket

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from cluster.checkpoint import Checkpoint
from cluster.placement_table import PlacementTable
from experts.config import ExpertGroupConfig
from experts.group import ExpertGroupActor
from router_service.client import InvalidArgument, MoEClient
from router_service.deployment import GRPC_SERVICER_FUNCTIONS, build_app
from router_service.model import ReferenceModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    spec = Checkpoint(tiny_checkpoint).spec
    table = PlacementTable.round_robin(spec, ["pending:0", "pending:1"])
    groups = [ExpertGroupActor.remote(ExpertGroupConfig(str(tiny_checkpoint), table.slots_of(g), device="cpu",
                                                        name=f"group-{g}")) for g in range(2)]
    addresses = ray.get([g.start.remote() for g in groups], timeout=120)
    table = PlacementTable(1, tuple(addresses), table.replicas)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
    serve.run(build_app({"checkpoint": str(tiny_checkpoint), "placement": table.to_json()}), name="moe")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        serve.shutdown()
        for g in groups:
            ray.kill(g)
        ray.shutdown()


def test_generate_score_status_health(service, tiny_checkpoint):
    reference = ReferenceModel.from_pretrained(tiny_checkpoint)
    prompt = [5, 17, 42, 99, 3]
    with MoEClient(service, timeout_s=120) as client:
        completion = client.generate(prompt, max_tokens=6)
        expected = reference.generate_greedy(prompt, 6)
        cut = expected.index(1) if 1 in expected else 6  # </s> = 1 stops generation
        assert completion.token_ids == expected[:cut]
        assert completion.finish_reason == ("stop" if cut < 6 else "length")

        import torch

        logp = torch.log_softmax(reference(torch.tensor([prompt]))[0], dim=-1)
        scores = client.score(prompt)
        assert max(abs(s - float(logp[i, prompt[i + 1]])) for i, s in enumerate(scores)) <= 1e-4

        status = client.status()
        assert status.placement_version == 1 and len(status.groups) == 2
        assert {e.layer for e in status.placement} == set(reference.spec.sparse_layers)

        with pytest.raises(InvalidArgument, match="top_p must be"):
            client.generate(prompt, max_tokens=2, top_p=1.5)
        assert client.generate("route every token", max_tokens=3).text  # tokenizer path

    with grpc.insecure_channel(service) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
