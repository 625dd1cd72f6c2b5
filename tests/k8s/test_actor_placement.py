"""Which pod can run each actor, derived from the rendered manifests, and whether that pod has
what the actor reads there (K1: the controller read a checkpoint its pod did not mount; K2: the
builder needed variables only router pods had).

    pod template  -> the Ray node KubeRay starts from it: node labels (`labels:`), CPUs
                     (rayStartParams num-cpus, else the container's CPU limit), GPUs (its
                     nvidia.com/gpu limit); the variables its template sets, the paths it mounts
    actor         -> what Ray needs to place it (label selector, CPUs, GPUs, from the code's own
                     ray.remote options and the serveConfigV2), and what it reads on its node
    candidates    -> every pod whose node can place it; each one must have what the actor reads

The same placement rules are exercised for real in tests/k8s/test_serve_app_ray.py, where each
simulated pod gets only its own template's variables and mounts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cluster.control.controller import ControllerActor
from cluster.control.controller_config import RAY_CLUSTER_ENV, RAY_CLUSTER_FIELD, REDIS_URL_ENV
from experts.group import ExpertGroupActor
from helpers.manifests import K8S, OVERLAYS, env, pod_groups, ray_container, render, serve_config


@dataclass
class Node:
    """A pod as Ray sees it, and what it gives the processes in it."""
    name: str
    labels: dict
    cpus: float
    gpus: float
    env: set = field(default_factory=set)
    mounts: set = field(default_factory=set)


@dataclass
class Actor:
    name: str
    label_selector: dict  # empty: any node
    cpus: float  # needed on the node to place it
    gpus: float
    env: set  # variables it reads on its node
    paths: set  # files or directories it reads on its node


def nodes(objects) -> list[Node]:
    out = []
    for name, group in pod_groups(objects).items():
        container = ray_container(group)
        limits = container["resources"]["limits"]
        cpus = float(group["rayStartParams"].get("num-cpus", limits.get("cpu", 0)))
        out.append(Node(name, dict(group.get("labels", {})), cpus, float(limits.get("nvidia.com/gpu", 0)),
                        set(env(container)), {m["mountPath"] for m in container.get("volumeMounts", [])}))
    return out


def actors(objects) -> list[Actor]:
    from ray.serve._private.application_state import _get_shared_build_app_label_selector
    from ray.serve.schema import ServeApplicationSchema

    (app,) = serve_config(objects)["applications"]
    args, controller = app["args"], app["args"]["controller"]
    checkpoint = {args["checkpoint"] + "/config.json"}
    tls = set((controller.get("expert_tls") or {}).get(k) for k in ("ca_file", "cert_file", "key_file")) - {None}
    # What the controller resolves in its own process (ControllerConfig.redis_target, expert_credentials)
    controller_env = ({REDIS_URL_ENV} if not args.get("redis_url") else set()) \
        | ({RAY_CLUSTER_ENV} if RAY_CLUSTER_FIELD in args.get("redis_namespace", "") else set()) \
        | ({controller["expert_secret_env"]} if controller.get("expert_secret_env") else set())
    (router,) = [d for d in app["deployments"] if d["name"] == "router"]
    options = router["ray_actor_options"]
    gpus = float(controller.get("num_gpus_per_group") or 0)
    # Serve's build task: num_cpus 0, on the deployments' shared hard label_selector, else anywhere (Ray 2.60)
    build_selector = _get_shared_build_app_label_selector(ServeApplicationSchema.model_validate(app)) or {}
    return [
        Actor("controller", args.get("controller_label_selector", {}), ControllerActor._default_options["num_cpus"],
              0, controller_env, checkpoint | tls),
        Actor("build task", build_selector, 0, 0, set(), set()),  # reads nothing on its node (serve_app.py)
        # the router reads its API tokens from its own node's environment (RouterConfig.client_auth)
        Actor("router replica", options.get("label_selector", {}), options.get("num_cpus", 1), 0,
              {args["router"]["api_tokens_env"]} if args["router"].get("api_tokens_env") else set(),
              {args["checkpoint"] + "/config.json", args["checkpoint"] + "/tokenizer.json"} | tls),
        # a Ray actor with resources holds them and needs >= 1 CPU to be placed (ray/actor.py); ours set none
        # but num_gpus, so it needs a CPU either way
        Actor("expert group", {}, max(1, ExpertGroupActor._default_options.get("num_cpus", 1)), gpus, set(),
              checkpoint | tls),
    ]


def candidates(actor: Actor, cluster: list[Node]) -> list[Node]:
    return [n for n in cluster if actor.label_selector.items() <= n.labels.items()
            and n.cpus >= actor.cpus and n.gpus >= actor.gpus]


def mounted(path: str, node: Node) -> bool:
    return any(path.startswith(m.rstrip("/") + "/") for m in node.mounts)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_that_can_run_an_actor_has_what_it_reads(overlay):
    objects = render(K8S / "overlays" / overlay)
    cluster = nodes(objects)
    for actor in actors(objects):
        where = candidates(actor, cluster)
        assert where, f"{overlay}: no pod can run the {actor.name}"
        for node in where:
            assert actor.env <= node.env, (overlay, actor.name, node.name, actor.env - node.env)
            assert all(mounted(p, node) for p in actor.paths), \
                (overlay, actor.name, node.name, [p for p in actor.paths if not mounted(p, node)])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_actors_land_where_the_design_says(overlay):
    """The controller on the head only (it shares the cluster's failure domain), routers and groups
    never on the head; expert groups on GPU pods in the gpu overlay."""
    objects = render(K8S / "overlays" / overlay)
    cluster = nodes(objects)
    where = {a.name: {n.name for n in candidates(a, cluster)} for a in actors(objects)}
    assert where["controller"] == {"head"}
    assert "head" not in where["router replica"] | where["expert group"]
    if overlay == "gpu":
        assert where["expert group"] == {"experts"} and where["router replica"] == {"routers"}


def test_the_build_task_placement_rule_is_the_installed_rays():
    """serve_app.py's docstring says where Ray 2.60 runs the builder; nothing depends on it (the
    builder reads nothing on its node), but the claim is checked against the installed Ray."""
    from ray.serve._private.application_state import _get_shared_build_app_label_selector
    from ray.serve.schema import ServeApplicationSchema

    (app,) = serve_config(render(K8S / "overlays" / "gpu"))["applications"]
    assert _get_shared_build_app_label_selector(ServeApplicationSchema.model_validate(app)) == \
        {"elasticmoe.io/role": "router"}
    app["deployments"][0]["ray_actor_options"].pop("label_selector")
    assert _get_shared_build_app_label_selector(ServeApplicationSchema.model_validate(app)) is None  # anywhere


def test_a_pod_without_the_env_or_the_mount_is_caught():
    """The check can fail: the head as it was before K1/K2 (no weights, no Redis URL)."""
    objects = render(K8S / "overlays" / "gpu")
    cluster = nodes(objects)
    (head,) = [n for n in cluster if n.name == "head"]
    head.env.discard(REDIS_URL_ENV)
    head.mounts.discard("/models")
    (controller,) = [a for a in actors(objects) if a.name == "controller"]
    (node,) = candidates(controller, cluster)
    assert not controller.env <= node.env
    assert not all(mounted(p, node) for p in controller.paths)
