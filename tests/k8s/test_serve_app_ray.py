"""The dev-cpu overlay's serveConfigV2, deployed for real on a local Ray the way `serve deploy`
and KubeRay deploy it, so the manifest cannot drift from the code.

    k8s/overlays/dev-cpu --render--> serveConfigV2 (as the RayService carries it)
      swapped: checkpoint -> tiny, Redis -> EmbeddedRedis (through ELASTICMOE_REDIS_URL, as the
               Secret sets it), metrics ports -> 0, gRPC/HTTP ports -> free ones
      serve.start(the config's grpc/http options) -> deploy_apps(config): Serve's own build task
      imports cluster.deploy.serve_app:app_builder -> finds or creates the detached controller
      -> expert-group actors -> placement in Redis -> RouterDeployment
      -> one Generate through the SDK; then an in-place update finds the same controller.

The local Ray has the pods' shape: a head node with 0 CPUs labelled elasticmoe.io/role=head
(where the controller must land) and one worker node labelled role=router with 4 CPUs (the
router replica, the build task and the CPU expert groups), both on this machine.
"""
from __future__ import annotations

import os
import time
import uuid

import pytest
import ray
from ray import serve

from cluster.deploy.serve_app import RAY_NAMESPACE
from cluster.state.redis_server import EmbeddedRedis, free_port
from cluster.state.store import ClusterState
from helpers.manifests import K8S, render, serve_config
from router_service.client import MoEClient

ROLE = "elasticmoe.io/role"


def deploy_like_serve_deploy(config: dict) -> None:
    """What `serve deploy` (the dashboard's PUT /api/serve/applications/) runs for a config."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    serve.start(http_options=schema.http_options.model_dump(), grpc_options=schema.grpc_options.model_dump(),
                proxy_location=schema.proxy_location)
    _get_global_client().deploy_apps(schema)


def wait_running(app: str, deployed_after_s: float = 0.0, timeout_s: float = 120.0) -> None:
    """Until `app` is RUNNING on a config deployed after `deployed_after_s` (Serve's clock)."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING" and status.last_deployed_time_s > deployed_after_s:
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            pytest.fail(f"application {app} failed to deploy: {status.message}")
        time.sleep(0.5)
    pytest.fail(f"application {app} not RUNNING after {timeout_s} s: {status}")


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    config = serve_config(render(K8S / "overlays" / "dev-cpu"))
    (app,) = config["applications"]
    args = app["args"]
    args["checkpoint"] = str(tiny_checkpoint)
    args["router"].update(metrics_port=0, metrics_host="127.0.0.1")
    args["controller"]["autoscaler"].update(metrics_port=0, metrics_host="127.0.0.1")
    port = free_port()
    config["grpc_options"]["port"] = port
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}

    redis = EmbeddedRedis()
    ray_cluster = f"test-{uuid.uuid4().hex[:8]}"
    pod_env = {"ELASTICMOE_REDIS_URL": redis.url, "ELASTICMOE_RAY_CLUSTER": ray_cluster}
    saved = {k: os.environ.get(k) for k in pod_env}
    os.environ.update(pod_env)  # the local raylet, and so the build task, inherits them like a pod's env
    if ray.is_initialized():
        ray.shutdown()
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "labels": {ROLE: "head"},
                                                          "include_dashboard": False})
    nodes.add_node(num_cpus=4, labels={ROLE: "router"})
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        deploy_like_serve_deploy(config)
        wait_running(app["name"])
        yield {"address": f"127.0.0.1:{port}", "config": config, "redis_url": redis.url,
               "namespace": args["redis_namespace"].replace("{ray_cluster}", ray_cluster)}
    finally:
        try:
            serve.shutdown()
        finally:
            try:
                controller = ray.get_actor("elasticmoe-controller", namespace=RAY_NAMESPACE)
                try:
                    ray.get(controller.shutdown.remote(), timeout=60)
                finally:
                    ray.kill(controller)
            except ValueError:
                pass  # never created: the deploy failed before the builder got that far
            finally:
                ray.shutdown()
                nodes.shutdown()
                redis.stop()
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value


def test_the_manifest_application_serves_and_redeploys_in_place(cluster):
    state = ClusterState(cluster["redis_url"], cluster["namespace"])
    try:
        # the builder resolved {ray_cluster} in its own process, from the environment
        table = state.load_placement()
        assert table is not None and table.version >= 1 and len(table.groups) == 2
        # each actor where the manifest's label selectors put it
        nodes = {n["NodeID"]: n["Labels"].get(ROLE) for n in ray.nodes() if n["Alive"]}
        controller = ray.get_actor("elasticmoe-controller", namespace=RAY_NAMESPACE)
        controller_node = ray.get(controller.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
        assert nodes[controller_node] == "head"
        with MoEClient(cluster["address"], timeout_s=60) as client:
            completion = client.generate([5, 17, 42, 99], max_tokens=4)
            assert 1 <= len(completion.token_ids) <= 4
            assert client.status().serving

        # A serveConfigV2 change KubeRay applies in place: Serve runs the builder again, which
        # must find the running controller (same groups, same placement), not start another.
        config = cluster["config"]
        name = config["applications"][0]["name"]
        before = serve.status().applications[name].last_deployed_time_s
        config["applications"][0]["args"]["router"]["max_running"] = 32
        deploy_like_serve_deploy(config)
        wait_running(name, deployed_after_s=before)
        again = state.load_placement()
        assert (again.version, again.groups) == (table.version, table.groups)
        with MoEClient(cluster["address"], timeout_s=60) as client:
            assert client.generate([5, 17, 42, 99], max_tokens=4).token_ids == completion.token_ids
    finally:
        state.close()
