"""End to end: SDK -> Serve gRPC ingress -> router replica -> expert-group actors, real Ray."""
from __future__ import annotations

import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers.serve import served
from helpers.traffic import wait_for
from router_service.client import InvalidArgument, MoEClient
from router_service.model.reference import ReferenceModel


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    with served(tiny_checkpoint) as s:
        yield s.grpc, s.groups


@pytest.fixture(scope="module")
def group_actors(service):
    return service[1]


@pytest.fixture(scope="module")
def address(service):
    return service[0]


def test_generate_score_status_health(address, tiny_checkpoint):
    service = address
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

        # Status answers from snapshots refreshed every second: wait for one taken after the traffic above
        def served_load():
            s = client.status()
            return s if sum(e.tokens for e in s.load) > 0 else None

        status = wait_for(served_load, 10, what="a Status snapshot with the load served")
        assert status.serving and status.placement_version == 1 and len(status.groups) == 2
        assert all(g.health == "SERVING" for g in status.groups)
        served = {(e.layer, e.expert): e.tokens for e in status.load}
        assert sum(served.values()) > 0 and set(served) <= {(l, e) for l in reference.spec.sparse_layers
                                                              for e in range(reference.spec.num_experts)}
        assert {e.layer for e in status.placement} == set(reference.spec.sparse_layers)

        with pytest.raises(InvalidArgument, match="top_p must be"):
            client.generate(prompt, max_tokens=2, top_p=1.5)
        assert client.generate("route every token", max_tokens=3).text  # tokenizer path

    with grpc.insecure_channel(service) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # server reflection (Serve's gRPC proxy provides it): grpcurl-style discovery works
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

        assert "elasticmoe.v1.MoEService" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_unknown_fields_and_oversized_messages_get_clear_codes(address):
    """Through Serve's proxy: a field this server does not know is INVALID_ARGUMENT naming it; a
    message over gRPC's receive limit is RESOURCE_EXHAUSTED before anything reads it; then the
    service still answers."""
    from elasticmoe.v1 import serving_pb2, serving_pb2_grpc

    from router_service.serving.deployment import MAX_CLIENT_MESSAGE_BYTES

    request = serving_pb2.GenerateRequest(token_ids=[3, 4], max_tokens=2)
    newer = request.SerializeToString() + bytes([0xF8, 0x07, 0x01])  # field 127 = 1, as a newer client sends it
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_stream("/elasticmoe.v1.MoEService/Generate", request_serializer=None,
                                   response_deserializer=serving_pb2.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            list(raw(newer, timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "numbers [127]" in err.value.details()
        stub = serving_pb2_grpc.MoEServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(serving_pb2.GenerateRequest(prompt="x" * (MAX_CLIENT_MESSAGE_BYTES + 1)), timeout=60))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert len([r for r in stub.Generate(request, timeout=60) if r.token_ids]) >= 1


def test_health_follows_the_groups(address, group_actors):
    service = address
    """A group gone and not restarted: its experts have no live replica, health says NOT_SERVING."""
    ray.kill(group_actors[1], no_restart=True)
    with grpc.insecure_channel(service) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(60):  # ray.kill returns before the process is gone
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=60).status != \
                    health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.5)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=60).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    with MoEClient(service, timeout_s=60) as client:
        status = client.status()
    assert not status.serving and [g.health for g in status.groups] == ["SERVING", "NOT_SERVING"]
