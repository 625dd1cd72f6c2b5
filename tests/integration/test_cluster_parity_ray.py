"""Through the real cluster: controller + expert-group actors on Ray, placement from Redis.

For each family on 1, 2 and 3 groups, greedy tokens equal ReferenceModel token for token.
"""
from __future__ import annotations

import pytest
import ray
import torch

from cluster.checkpoint.reader import Checkpoint
from cluster.control.controller import ControllerActor, ControllerConfig
from cluster.state.redis_server import EmbeddedRedis
from cluster.state.store import ClusterState
from router_service.model.dense import DenseModel
from router_service.model.reference import ReferenceModel
from router_service.serving.dispatch import RemoteExperts


@pytest.fixture(scope="module")
def cluster_env():
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    redis = EmbeddedRedis()
    yield redis
    redis.stop()
    ray.shutdown()


# 1, 2 and 3 groups (3: an uneven split), one count per family to keep the suite short; every family
# over every count runs without Ray in test_distributed_path
GROUPS = {"mixtral": 3, "qwen2_moe": 1, "qwen3_moe": 2}


def test_greedy_through_the_cluster_equals_reference(cluster_env, hf_checkpoint):
    family, path, _ = hf_checkpoint
    num_groups = GROUPS[family]
    namespace = f"parity-{family}-{num_groups}"
    config = ControllerConfig(checkpoint=str(path), num_groups=num_groups, redis_url=cluster_env.url,
                              redis_namespace=namespace, name=namespace)
    controller = ControllerActor.remote(config)
    remote = None
    try:
        ray.get(controller.start.remote(), timeout=120)
        table = ClusterState(cluster_env.url, namespace).load_placement()  # what a router reads
        assert table.version == 1 and len(table.groups) == num_groups
        ckpt = Checkpoint(path)
        remote = RemoteExperts(ckpt.spec, table, credentials=ray.get(controller.router_credentials.remote()))
        model = ReferenceModel(DenseModel(ckpt.spec, ckpt.load_dense()), remote)
        reference = ReferenceModel.from_pretrained(path)
        prompt = torch.randint(0, ckpt.spec.vocab_size, (7,), generator=torch.Generator().manual_seed(11)).tolist()
        assert model.generate_greedy(prompt, 8) == reference.generate_greedy(prompt, 8)
    finally:
        if remote is not None:
            remote.close()
        ray.get(controller.shutdown.remote(), timeout=60)
        ray.kill(controller)
