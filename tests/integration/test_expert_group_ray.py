"""Two expert-group actors on a real local Ray, called over real gRPC; one is killed and comes back.

Integration test: no fakes. The partial outputs of two groups holding disjoint experts
must sum to moe_forward over all experts, and a restarted group must serve again from
the address its start() publishes.
"""
from __future__ import annotations

import time

import grpc
import pytest
import ray
import torch
from elasticmoe.v1 import expert_pb2, expert_pb2_grpc
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.checkpoint.reader import Checkpoint
from experts.config import ExpertGroupConfig
from experts.group import ExpertGroupActor
from experts.kernels.forward import moe_forward
from experts.kernels.weights import load_slots
from experts.wire import decode, encode

LAYER, H, E, T, K = 0, 64, 8, 16, 2
RESTART_TIMEOUT_S = 40


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def forward(address: str, hidden, ids, weights) -> torch.Tensor:
    """Ask one group for its part: ids of experts it does not hold are masked to -1."""
    with grpc.insecure_channel(address) as channel:
        reply = expert_pb2_grpc.ExpertServiceStub(channel).Forward(
            expert_pb2.ForwardRequest(layer=LAYER, hidden=encode(hidden), expert_ids=encode(ids),
                                      weights=encode(weights), placement_version=1), timeout=30)
    return decode(reply.output, "output")


def start_after_restart(actor, old_address: str) -> str:
    """start() on a killed actor, once Ray has restarted it.

    ray.kill returns before the process dies, and until then the old process still
    answers (start() would return the old address). A restarted process answers
    address() with None: it serves nothing until start() is called."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if ray.get(actor.address.remote(), timeout=RESTART_TIMEOUT_S) != old_address:
                return ray.get(actor.start.remote(), timeout=RESTART_TIMEOUT_S)
        except (RayActorError, GetTimeoutError):  # dead or restarting: Ray answers again once it is back
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the killed actor did not come back within {RESTART_TIMEOUT_S} s")


def test_two_groups_sum_to_all_experts_and_survive_restart(local_ray, tiny_checkpoint):
    halves = {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}
    actors = {
        name: ExpertGroupActor.options(max_restarts=1, num_cpus=0).remote(
            ExpertGroupConfig(checkpoint=str(tiny_checkpoint), slots=[(LAYER, e) for e in experts], device="cpu",
                              backend="torch", name=name))
        for name, experts in halves.items()
    }
    addresses = dict(zip(actors, ray.get([a.start.remote() for a in actors.values()], timeout=60)))
    assert ray.get(actors["a"].start.remote()) == addresses["a"]  # idempotent
    assert ray.get(actors["a"].address.remote()) == addresses["a"]

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=gen)
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].to(torch.int32)  # [T, K] distinct experts
    weights = torch.rand(T, K, generator=gen)
    every = load_slots(Checkpoint(tiny_checkpoint), [(LAYER, e) for e in range(E)], torch.float32)
    expected = moe_forward(hidden, ids, weights, every, backend="torch")

    def part(name: str, address: str) -> torch.Tensor:
        mine = torch.isin(ids, torch.tensor(halves[name], dtype=torch.int32))
        return forward(address, hidden, torch.where(mine, ids, -1), weights)

    parts = {name: part(name, address) for name, address in addresses.items()}
    assert not torch.equal(parts["a"], torch.zeros_like(parts["a"]))
    torch.testing.assert_close(parts["a"] + parts["b"], expected, atol=1e-5, rtol=1e-5)

    ray.kill(actors["a"], no_restart=False)  # Ray restarts it (max_restarts=1): new process, no server yet
    new_address = start_after_restart(actors["a"], addresses["a"])
    assert new_address.startswith("127.0.0.1:")  # the port may differ: the controller records what start() says
    torch.testing.assert_close(part("a", new_address), parts["a"], atol=1e-6, rtol=1e-6)
