"""GPU pods that come and go (K3), in a real local Ray as far as Ray allows without an autoscaler.

The controller's request_resources calls go through Ray's own SDK into the GCS, with autoscaler
v2 on as KubeRay runs it, and the test reads the standing request back from there (what the
autoscaler would act on). A spy wrapped around the SDK call inside the controller records each
call. GPUs are resource counts here: the groups compute on CPU.

    head: 2 CPUs, 1 GPU; a request left standing by "a controller that died mid-add"
    controller start (1 group, 1 GPU each)        -> the leftover request is cleared
    add a group, no GPU free                       -> standing: 2 x {GPU: 1}; the group waits
    its pod never comes (the waiting actor dies)   -> the add fails -> cleared
    a node with a GPU joins; add again             -> the group starts there -> cleared
    the autoscaler removes the idle group          -> cleared; once a router left the placement
                                                      naming it, it is killed and its GPU is free

The adds are started the way the autoscaler's ADD_GROUP decision starts them (without the
traffic it takes to make that decision); everything after that is the controller's own code.
"""
from __future__ import annotations

import sys

import pytest
import ray

from cluster.control.controller import ControllerActor, ControllerConfig
from cluster.control.gpu_requests import _ray_request_resources
from cluster.state.redis_server import EmbeddedRedis
from cluster.state.store import ClusterState
from cluster.state.telemetry import Telemetry
from helpers.cluster import FAST
from helpers.traffic import wait_for

GPU = {"GPU": 1}
# The spy and the helpers run inside the controller's process, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Spy:
    """request_resources as Ray's SDK takes it, recording each call before making it."""

    def __init__(self):
        self.calls = []

    def __call__(self, bundles):
        self.calls.append(list(bundles))
        _ray_request_resources(bundles)


def standing_gpus() -> int:
    """GPU bundles the Ray autoscaler is asked to make room for (the GCS' cluster resource constraints)."""
    from ray._private.worker import global_worker
    from ray.autoscaler.v2.sdk import get_cluster_resource_state

    state = get_cluster_resource_state(global_worker.gcs_client)
    return sum(r.count for c in state.cluster_resource_constraints for r in c.resource_requests
               if r.request.resources_bundle.get("GPU"))


def begin_add(controller) -> None:
    """Start one scale-up as autoscale_once does for ADD_GROUP (on the controller's event loop)."""
    def go(self):
        loop = self._loop_task.get_loop()

        def start():
            self.autoscaler.changed()
            self._adding = loop.create_task(self._add_group("test: one more group"))
        loop.call_soon_threadsafe(start)
    ray.get(controller.__ray_call__.remote(go), timeout=30)


@pytest.fixture
def gpu_cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "include_dashboard": False,
        "_system_config": {"enable_autoscaler_v2": True}})  # KubeRay's autoscaler v2 (autoscalerOptions.version)
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_gpu_requests_exist_only_while_a_group_waits(gpu_cluster, tiny_checkpoint):
    with EmbeddedRedis() as redis:
        ray.get(ray.remote(num_cpus=0)(_ray_request_resources).remote([GPU] * 3))  # a dead controller's leftover
        assert standing_gpus() == 3
        autoscaler = {**FAST, "min_groups": 1, "max_groups": 2, "scale_up_utilization": 0.99,
                      "scale_down_utilization": 0.5, "scale_sustain_s": 1.0, "cooldown_s": 1.0}
        config = ControllerConfig(checkpoint=str(tiny_checkpoint), num_groups=1, redis_url=redis.url,
                                  redis_namespace="gpu-requests", group_device="cpu", num_gpus_per_group=1,
                                  name="gpu-requests", autoscaler=autoscaler)
        controller = ControllerActor.options(name=config.name).remote(config)
        state = ClusterState(redis.url, config.redis_namespace)
        try:
            ray.get(controller.start.remote(), timeout=120)
            assert standing_gpus() == 0, "start clears a request a previous controller left standing"
            ray.get(controller.__ray_call__.remote(lambda self: setattr(self.gpu_requests, "_request", Spy())))

            # 1. no GPU free: the new group waits, and the autoscaler is asked for room for both groups
            begin_add(controller)
            wait_for(lambda: standing_gpus() == 2, 20, what="the GPU request of the add")
            waiting = wait_for(lambda: _actor("gpu-requests-group-1"), 20, what="the waiting group")
            assert ray.available_resources().get("GPU", 0) == 0
            ray.kill(waiting)  # its GPU pod never came up
            wait_for(lambda: standing_gpus() == 0 and not _adding(controller), 30, what="the failed add to clear it")

            # 2. a GPU node joins: the next add starts there, and the request goes once it holds its GPU
            gpu_cluster.add_node(num_cpus=1, num_gpus=1)
            begin_add(controller)
            wait_for(lambda: len(state.load_placement().groups) == 2, 60, what="the added group in the placement")
            wait_for(lambda: not _adding(controller), 30, what="the add to end")
            assert standing_gpus() == 0

            # 3. idle: the autoscaler removes it; the request stays clear and, once a router reports the
            # placement without it, the group is killed and its GPU (its pod) is free for the autoscaler
            wait_for(lambda: len(state.load_placement().groups) == 1, 60, what="the idle group removed")
            assert standing_gpus() == 0
            version = state.load_placement().version
            Telemetry(state).record_router("router-test", {}, version, None)
            wait_for(lambda: ray.available_resources().get("GPU", 0) == 1, 30, what="the removed group's GPU free")
            calls = ray.get(controller.__ray_call__.remote(lambda self: self.gpu_requests._request.calls))
            assert calls == [[GPU] * 2, [], [GPU] * 2, [], []], calls
            bundles = ray.get(controller.__ray_call__.remote(lambda self: self.gpu_requests.bundles))
            assert bundles == 0
        finally:
            try:
                ray.get(controller.shutdown.remote(), timeout=60)
            finally:
                ray.kill(controller)
                state.close()


def _actor(name: str):
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


def _adding(controller) -> bool:
    return ray.get(controller.__ray_call__.remote(lambda self: self._adding is not None), timeout=30)
