"""The dev-cpu overlay deployed for real on a local Ray whose nodes are its pods, each with only
what its pod template gives it, the way `serve deploy` (KubeRay) deploys serveConfigV2.

    k8s/overlays/dev-cpu --render--> RayService: head and `routers` pod templates, serveConfigV2
      each pod -> a `ray start` node (tests/helpers/pods.py): its own root directory (the checkpoint
                  only under its weights mount), its template's variables and nothing else (the
                  Redis URL only where the template sets it: the head), its labels and CPUs
      serveConfigV2 as rendered; swapped: paths relative to each pod's root, metrics ports -> 0,
                  gRPC/HTTP ports -> free ones on 127.0.0.1
      serve.start + deploy_apps -> Serve's build task (wherever Ray puts it) -> the controller on
      the head (label selector) reads its env and the checkpoint there -> groups and the router
      replica on the router pod -> Generate through the SDK; an in-place update finds the same
      controller; the expert pods' readiness probe path answers on the node's dashboard agent.

Local stand-ins: an EmbeddedRedis with the Secret's password (URL -> 127.0.0.1), the tiny
checkpoint where the overlay's init container writes `small`, 100 MB object stores.
"""
from __future__ import annotations

import os
import time
import urllib.request
import uuid

import pytest
import ray
import yaml
from ray import serve

from cluster.control.controller_config import RAY_CLUSTER_ENV, REDIS_URL_ENV
from cluster.deploy.serve_app import RAY_NAMESPACE
from cluster.state.redis_server import EmbeddedRedis, free_port
from cluster.state.store import ClusterState
from helpers.manifests import K8S, find, pod_groups, ray_container, render, serve_config
from helpers.pods import SimulatedPod, wait_for_nodes
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


def wait_running(app: str, deployed_after_s: float = 0.0, timeout_s: float = 180.0) -> None:
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


def local_config(objects) -> dict:
    """The rendered serveConfigV2 with paths relative to each pod's root and ports free here."""
    config = serve_config(objects)
    (app,) = config["applications"]
    args = app["args"]
    args["checkpoint"] = args["checkpoint"].lstrip("/")  # resolved in each pod's own root
    args["router"].update(metrics_port=0, metrics_host="127.0.0.1")
    args["controller"]["autoscaler"].update(metrics_port=0, metrics_host="127.0.0.1")
    config["grpc_options"]["port"] = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    return config


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):
    assert REDIS_URL_ENV not in os.environ and RAY_CLUSTER_ENV not in os.environ, "the test process must not lend them"
    objects = render(K8S / "overlays" / "dev-cpu")
    config = local_config(objects)
    (secret,) = find(objects, "Secret", "elasticmoe-redis")
    password = secret["stringData"]["password"]
    redis = EmbeddedRedis(password=password)
    secrets = {("elasticmoe-redis", "password"): password, ("elasticmoe-redis", "url"): redis.url}
    ray_cluster = f"elasticmoe-{uuid.uuid4().hex[:5]}"
    root = tmp_path_factory.mktemp("pods")
    checkpoint = (serve_config(objects)["applications"][0]["args"]["checkpoint"], tiny_checkpoint)
    pods = {name: SimulatedPod(name, group, root / name, secrets, ray_cluster, checkpoint)
            for name, group in pod_groups(objects).items()}
    if ray.is_initialized():
        ray.shutdown()
    try:
        address = pods["head"].start()
        for name, pod in pods.items():
            if name != "head":
                pod.start(address)
        ray.init(address=address, log_to_driver=False)
        wait_for_nodes(len(pods))
        deploy_like_serve_deploy(config)
        wait_running(config["applications"][0]["name"])
        yield {"address": f"127.0.0.1:{config['grpc_options']['port']}", "config": config, "redis_url": redis.url,
               "namespace": f"elasticmoe-{ray_cluster}", "pods": pods, "objects": objects}
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                try:
                    controller = ray.get_actor("elasticmoe-controller", namespace=RAY_NAMESPACE)
                    ray.get(controller.shutdown.remote(), timeout=60)
                    ray.kill(controller)
                except ValueError:
                    pass  # never created: the deploy failed before the builder got that far
        finally:
            ray.shutdown()
            for name in [n for n in pods if n != "head"] + ["head"]:
                pods[name].stop()
            redis.stop()


def test_the_manifest_application_serves_from_pods_that_hold_only_their_own(cluster):
    state = ClusterState(cluster["redis_url"], cluster["namespace"])
    try:
        # the controller resolved {ray_cluster} and the Redis URL from the head's variables: no other pod has them
        table = state.load_placement()
        assert table is not None and table.version >= 1 and len(table.groups) == 2
        pods = cluster["pods"]
        assert [n for n, p in pods.items() if REDIS_URL_ENV in p.env] == ["head"]
        # each actor where the manifest's label selectors and resources put it
        nodes = {n["NodeID"]: n["Labels"].get(ROLE) for n in ray.nodes() if n["Alive"]}
        controller = ray.get_actor("elasticmoe-controller", namespace=RAY_NAMESPACE)
        controller_node = ray.get(controller.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
        assert nodes[controller_node] == "head"
        with MoEClient(cluster["address"], timeout_s=60) as client:
            completion = client.generate([5, 17, 42, 99], max_tokens=4)
            assert 1 <= len(completion.token_ids) <= 4
            assert client.status().serving

        # A serveConfigV2 change KubeRay applies in place: Serve runs the builder again, which
        # must find the running controller (same actor, same groups), not start another. (The idle
        # cluster may scale down meanwhile: min_groups 1, so placement versions may move on.)
        groups = set(state.groups())
        config = cluster["config"]
        name = config["applications"][0]["name"]
        before = serve.status().applications[name].last_deployed_time_s
        config["applications"][0]["args"]["router"]["max_running"] = 32
        deploy_like_serve_deploy(config)
        wait_running(name, deployed_after_s=before)
        assert ray.get_actor("elasticmoe-controller", namespace=RAY_NAMESPACE)._actor_id == controller._actor_id
        assert set(state.groups()) <= groups and state.load_placement().version >= table.version
        with MoEClient(cluster["address"], timeout_s=60) as client:
            assert client.generate([5, 17, 42, 99], max_tokens=4).token_ids == completion.token_ids
    finally:
        state.close()


def test_expert_pods_readiness_probe_path_answers_on_the_dashboard_agent(cluster):
    """K4: the probe the gpu overlay gives expert pods asks the node's dashboard agent, not a Serve proxy;
    here against a real agent of this Ray (the port is the pod's; KubeRay's default is the probe's)."""
    (experts,) = [g for g in pod_groups(render(K8S / "overlays" / "gpu")).values()
                  if g["template"]["metadata"]["labels"][ROLE] == "expert"]
    path = ray_container(experts)["readinessProbe"]["httpGet"]["path"]
    pod = cluster["pods"]["routers"]
    with urllib.request.urlopen(f"http://127.0.0.1:{pod.agent_port}{path}", timeout=10) as reply:
        assert reply.status == 200 and "raylet: success" in reply.read().decode()


def test_no_pod_wrote_outside_its_writable_mounts(cluster):
    """readOnlyRootFilesystem: nothing the pods ran wrote to their HOME, working directory or weights."""
    for name, pod in cluster["pods"].items():
        assert pod.written() == [], name


def test_the_rendered_config_is_what_was_deployed(cluster):
    """Only the documented swaps separate the deployed config from the manifest's."""
    manifest = serve_config(cluster["objects"])
    deployed = yaml.safe_load(yaml.safe_dump(cluster["config"]))
    (m_app,), (d_app,) = manifest["applications"], deployed["applications"]
    assert d_app["import_path"] == m_app["import_path"] and d_app["deployments"] == m_app["deployments"]
    assert d_app["args"]["controller_label_selector"] == m_app["args"]["controller_label_selector"]
    assert "/" + d_app["args"]["checkpoint"] == m_app["args"]["checkpoint"]
