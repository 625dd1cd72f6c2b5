"""Offline validation of k8s/, the Dockerfile and the Serve config they deploy (no cluster).

    k8s/overlays/<name> --kubectl kustomize, else render_fallback()--> objects
      RayService     -> the KubeRay CRD schema (../shared/kuberay-crds/), closed to unknown keys
      built-in kinds -> small closed shape schemas; pod templates -> the CRD's PodTemplateSpec
      serveConfigV2  -> Ray's ServeDeploySchema (closed as well), import paths, AppArgs and the
                        typed ControllerConfig / AutoscalerConfig / RouterConfig it builds
      cross-checks   -> ports, labels, weights, secrets, NetworkPolicy reachability
    Dockerfile       -> Ray and Python versions, pins against pyproject.toml, proto generation

The fallback renderer (used when kubectl is not on PATH) implements exactly the kustomize
features k8s/ uses and refuses any other, so k8s/ cannot outgrow it unnoticed; when kubectl
is present a test checks both render the same objects. tests/k8s/test_serve_app_ray.py deploys
the dev-cpu overlay's serveConfigV2 for real through render() below.
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest
import yaml

from helpers.manifests import (  # noqa: F401
    CRD_DIR,
    EXTERNAL_SECRETS,
    K8S,
    KUBECTL,
    NAMESPACE,
    OBSERVABILITY,
    OVERLAYS,
    ROLE,
    ROOT,
    build_fallback,
    env,
    find,
    groups_with_role,
    pod_groups,
    ports,
    ray_container,
    rayservice,
    render,
    serve_config,
    walk,
)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(K8S / "overlays" / request.param)


def test_every_overlay_renders_and_the_fallback_matches_kubectl():
    assert {"dev-cpu", "gpu"} <= set(OVERLAYS)
    for path in [K8S / "overlays" / name for name in OVERLAYS] + [OBSERVABILITY]:
        objects = render(path, use_kubectl=False)
        assert len(find(objects, "RayService")) == (0 if path == OBSERVABILITY else 1)
        assert all(o["metadata"].get("namespace") == NAMESPACE for o in objects), path
        if KUBECTL:  # the fallback must be faithful wherever it can be compared
            key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
            assert sorted(objects, key=key) == sorted(render(path, use_kubectl=True), key=key), path


def test_fallback_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(NotImplementedError, match="namePrefix"):
        build_fallback(tmp_path)


# ---- KubeRay CRD schemas --------------------------------------------------------------------

def close_schema(node):
    """The CRD schema with x-kubernetes-* keys dropped and every object that lists properties
    closed to other keys (the API server would prune them silently: a misspelling must fail)."""
    if isinstance(node, list):
        return [close_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: close_schema(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = close_schema(value)
        else:
            out[key] = value
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_schema(filename: str) -> dict:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (../shared/kuberay-crds/, see its README): "
                    "CRD validation skipped")
    crd = yaml.safe_load((CRD_DIR / filename).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return close_schema(v1["schema"]["openAPIV3Schema"])


def schema_errors(schema: dict, instance) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance))


def pod_template_schema() -> dict:
    """core/v1 PodTemplateSpec as KubeRay's CRD embeds it (closed): used for built-in kinds too."""
    spec = crd_schema("ray.io_rayclusters.yaml")["properties"]["spec"]
    return spec["properties"]["headGroupSpec"]["properties"]["template"]


def test_rayservice_matches_the_kuberay_crd(overlay):
    name, objects = overlay
    rs = rayservice(objects)
    assert rs["apiVersion"] == "ray.io/v1"
    assert schema_errors(crd_schema("ray.io_rayservices.yaml"), rs) == [], name
    # spec.rayClusterConfig is a RayCluster spec: the RayCluster CRD must accept it as well
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"},
               "spec": rs["spec"]["rayClusterConfig"]}
    assert schema_errors(crd_schema("ray.io_rayclusters.yaml"), cluster) == [], name


@pytest.mark.parametrize("path, bad", [
    (("spec", "rayClusterConfig"), {"enableInTreeAutoScaling": True}),  # misspelled key
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0),
     {"imagePullPolicey": "Always"}),  # misspelled deep inside the pod template
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0), {"minReplicas": "1"}),  # wrong type
])
def test_a_misspelled_or_mistyped_key_fails_crd_validation(path, bad):
    rs = rayservice(render(K8S / "overlays" / "dev-cpu"))
    node = rs
    for p in path:
        node = node[p]
    node.update(bad)
    errors = schema_errors(crd_schema("ray.io_rayservices.yaml"), rs)
    assert errors and any(next(iter(bad)) in e or "is not of type" in e for e in errors), errors


# ---- built-in kinds: small closed shapes -----------------------------------------------------

def obj(*required, **props) -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


STR, INT = {"type": "string"}, {"type": "integer"}
STRMAP = {"type": "object", "additionalProperties": STR}
INT_OR_STR = {"anyOf": [INT, STR]}
DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
METADATA = obj("name", name={"type": "string", "pattern": DNS1123, "maxLength": 63}, namespace=STR,
               labels=STRMAP, annotations=STRMAP)
SELECTOR = obj(matchLabels=STRMAP, matchExpressions={"type": "array", "items": obj(
    "key", "operator", key=STR, operator={"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
    values={"type": "array", "items": STR})})
PEER = obj(podSelector=SELECTOR, namespaceSelector=SELECTOR,
           ipBlock={"type": "object", "required": ["cidr"], "additionalProperties": False,
                    "properties": {"cidr": STR, "except": {"type": "array", "items": STR}}})
NP_PORTS = {"type": "array", "items": obj(protocol={"enum": ["TCP", "UDP", "SCTP"]}, port=INT_OR_STR, endPort=INT)}
ANY_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"], "properties": {"containers": {
        "type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "image"]}}}}}}


def _top(api: str, kind: str, spec: dict | None = None, **extra) -> dict:
    props = dict(apiVersion={"const": api}, kind={"const": kind}, metadata=METADATA, **extra)
    if spec is not None:
        props["spec"] = spec
    return obj("apiVersion", "kind", "metadata", *(["spec"] if spec is not None else []), **props)


def shape(kind: str, pod_template: dict) -> dict:
    return {
        "Service": _top("v1", "Service", obj("ports", type={"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                             clusterIP=STR, selector=STRMAP, ports={
            "type": "array", "minItems": 1, "items": obj("port", name=STR, port=INT, targetPort=INT_OR_STR,
                                                         protocol={"enum": ["TCP", "UDP", "SCTP"]},
                                                         appProtocol=STR)})),
        "Secret": _top("v1", "Secret", type=STR, data=STRMAP, stringData=STRMAP),
        "PersistentVolumeClaim": _top("v1", "PersistentVolumeClaim", obj(
            "accessModes", "resources", storageClassName=STR, volumeMode={"enum": ["Filesystem", "Block"]},
            accessModes={"type": "array", "minItems": 1, "items": {
                "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
            resources=obj("requests", requests=obj("storage", storage=STR)), dataSource={"type": "object"})),
        "Deployment": _top("apps/v1", "Deployment", obj(
            "selector", "template", replicas=INT, selector=SELECTOR, template=pod_template,
            strategy=obj("type", type={"enum": ["Recreate", "RollingUpdate"]}))),
        "NetworkPolicy": _top("networking.k8s.io/v1", "NetworkPolicy", obj(
            "podSelector", podSelector=SELECTOR,
            policyTypes={"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            ingress={"type": "array", "items": obj(**{"from": {"type": "array", "items": PEER}, "ports": NP_PORTS})},
            egress={"type": "array", "items": obj(to={"type": "array", "items": PEER}, ports=NP_PORTS)})),
        "Pod": _top("v1", "Pod", {"type": "object"}),
    }[kind]


def check_builtin(o: dict, pod_template: dict) -> list[str]:
    errors = schema_errors(shape(o["kind"], pod_template), o)
    if o["kind"] == "Pod":
        errors += schema_errors(pod_template, {"metadata": o["metadata"], "spec": o["spec"]})
    return errors


def _pod_template_or_minimal() -> dict:
    return pod_template_schema() if CRD_DIR.is_dir() else ANY_POD_TEMPLATE


def test_builtin_kinds_have_their_shape(overlay):
    name, objects = overlay
    template = _pod_template_or_minimal()
    kinds = set()
    for o in objects:
        if o["kind"] == "RayService":
            continue
        kinds.add(o["kind"])
        assert check_builtin(o, template) == [], (name, o["kind"], o["metadata"]["name"])
    assert {"Service", "Deployment", "NetworkPolicy"} <= kinds
    for d in find(objects, "Deployment"):  # the selector must select the Deployment's own pods
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    bad = copy.deepcopy(find(objects, "NetworkPolicy")[0])
    bad["spec"]["podSelecter"] = bad["spec"].pop("podSelector")
    assert check_builtin(bad, template), "a misspelled NetworkPolicy key must fail"


def test_weights_loader_tool_fits_the_gpu_overlay():
    (pod,) = [d for d in yaml.safe_load_all((K8S / "tools" / "weights-loader.yaml").read_text()) if d]
    assert check_builtin(pod, _pod_template_or_minimal()) == []
    gpu = render(K8S / "overlays" / "gpu")
    (pvc,) = find(gpu, "PersistentVolumeClaim")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]] and pod["metadata"]["namespace"] == NAMESPACE
    assert pod["spec"]["containers"][0]["image"] == ray_container(pod_groups(gpu)["head"])["image"]


# ---- serveConfigV2: Ray's schema, import paths, the typed args ------------------------------

def unknown_serve_keys(model, data, path: str = "") -> list[str]:
    """Keys Ray's (permissive) pydantic schemas would silently ignore, recursively."""
    from pydantic import BaseModel

    out = []
    for key, value in data.items():
        if key not in model.model_fields:
            out.append(f"{path}{key}")
            continue
        annotation = model.model_fields[key].annotation
        candidates = [annotation, *typing.get_args(annotation)]
        for arg in list(candidates):
            candidates += typing.get_args(arg)
        sub = next((c for c in candidates if inspect.isclass(c) and issubclass(c, BaseModel)), None)
        if sub is None:
            continue
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, dict):
                out += unknown_serve_keys(sub, item, f"{path}{key}[{i}].")
    return out


def import_attr(path: str):
    module, _, attr = path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), attr)


def the_app(objects) -> dict:
    (app,) = serve_config(objects)["applications"]
    return app


def router_deployment(objects) -> dict:
    (d,) = [d for d in the_app(objects).get("deployments", []) if d["name"] == "router"]
    return d


def test_serve_config_is_a_valid_serve_deploy_schema(overlay):
    from ray.serve.schema import ServeDeploySchema

    from router_service.serving.deployment import GRPC_SERVICER_FUNCTIONS

    name, objects = overlay
    config = serve_config(objects)
    ServeDeploySchema.model_validate(config)
    assert unknown_serve_keys(ServeDeploySchema, config) == [], name
    assert unknown_serve_keys(ServeDeploySchema, {**config, "grpc_option": {}}) == ["grpc_option"]
    misspelled = copy.deepcopy(config)  # Ray's schemas ignore unknown keys; this check does not
    misspelled["applications"][0]["deployments"][0]["ray_actor_options"]["label_selectr"] = {}
    assert [k.rsplit(".", 1)[-1] for k in unknown_serve_keys(ServeDeploySchema, misspelled)] == ["label_selectr"]
    grpc = config["grpc_options"]
    assert grpc["port"] == 9000 and grpc["grpc_servicer_functions"] == GRPC_SERVICER_FUNCTIONS
    for path in grpc["grpc_servicer_functions"]:  # the proxy imports these: they must exist in the image
        assert callable(import_attr(path)), path
    app = the_app(objects)
    assert app["route_prefix"] == "/"


def test_import_path_is_the_application_builder(overlay):
    from cluster.deploy.serve_app import app_builder

    _, objects = overlay
    builder = import_attr(the_app(objects)["import_path"])
    assert builder is app_builder
    assert inspect.isfunction(builder) and len(inspect.signature(builder).parameters) == 1  # Serve's rule


def test_args_parse_into_the_typed_configs(overlay):
    from cluster.deploy.serve_app import _EMPTY_PLACEMENT, AppArgs

    name, objects = overlay
    args = the_app(objects)["args"]
    assert "redis_url" not in args, "Serve logs args: the Redis URL (password) comes from ELASTICMOE_REDIS_URL"
    parsed = AppArgs.from_dict(args)
    controller = parsed.controller_config()
    # resolved by the controller, on its own pod, from what the head's template sets
    url, namespace = controller.redis_target({"ELASTICMOE_REDIS_URL": "redis://:pw@elasticmoe-redis:6379/0",
                                              "ELASTICMOE_RAY_CLUSTER": "elasticmoe-x7k2p"})
    assert namespace == "elasticmoe-elasticmoe-x7k2p", "one Redis namespace per RayCluster (blue/green)"
    parsed.router_config(_EMPTY_PLACEMENT, url, namespace)
    assert controller.group_host in ("0.0.0.0", "::"), "routers dial expert groups from other pods"
    with pytest.raises(ValueError, match="max_grups"):
        AppArgs.from_dict({**args, "controller": {**args["controller"], "autoscaler": {"max_grups": 4}}}) \
            .controller_config()
    with pytest.raises(ValueError, match="num_group"):
        AppArgs.from_dict({**args, "num_group": 2})


def test_app_args_errors_say_what_to_fix():
    from cluster.deploy.serve_app import AppArgs, AppArgsError, _differing_keys

    config = AppArgs.from_dict({"checkpoint": "/models/checkpoint", "num_groups": 2,
                                "redis_namespace": "elasticmoe-{ray_cluster}"}).controller_config()
    cluster = {"ELASTICMOE_RAY_CLUSTER": "c1"}
    with pytest.raises(ValueError, match=r"redis_url is not set and \$ELASTICMOE_REDIS_URL .* the head pod"):
        config.redis_target(cluster)
    assert config.redis_target({"ELASTICMOE_REDIS_URL": "redis://r:6379/0", **cluster}) == \
        ("redis://r:6379/0", "elasticmoe-c1")
    with pytest.raises(ValueError, match=r"\$ELASTICMOE_RAY_CLUSTER is unset"):
        config.redis_target({"ELASTICMOE_REDIS_URL": "redis://r:6379/0"})
    with pytest.raises(ValueError, match="redis_url must start with") as e:  # from the environment: checked, redacted
        config.redis_target({"ELASTICMOE_REDIS_URL": "http://:hunter2@r:6379/0", **cluster})
    assert "hunter2" not in str(e.value)
    with pytest.raises(AppArgsError, match=r"redis_namespace .* only placeholder is \{ray_cluster\}"):
        AppArgs.from_dict({"checkpoint": "/c", "num_groups": 1, "redis_namespace": "x-{pod}"}).controller_config()
    with pytest.raises(AppArgsError, match="router.placement"):
        AppArgs.from_dict({"checkpoint": "/c", "num_groups": 1, "router": {"placement": "{}"}})
    with pytest.raises(AppArgsError, match="num_groups"):
        AppArgs.from_dict({"checkpoint": "/c"})
    with pytest.raises(AppArgsError) as e:  # a bad URL is reported without its password
        AppArgs.from_dict({"checkpoint": "/c", "num_groups": 1, "redis_url": "http://:hunter2@redis:6379/0"}) \
            .controller_config()
    assert "hunter2" not in str(e.value)
    assert _differing_keys({"a": 1, "s": {"x": 1, "y": 2}}, {"a": 1, "s": {"x": 1, "y": 3}}) == ["s.y"]
    with pytest.raises(AppArgsError, match="controller.expert_secret: Serve logs these args") as e:
        AppArgs.from_dict({"checkpoint": "/c", "num_groups": 1, "controller": {"expert_secret": "s3cret-s3cret-s3cret"}})
    assert "s3cret" not in str(e.value)


def test_the_image_caps_client_messages_like_the_code():
    """The Dockerfile's cap on Serve's gRPC messages is the one the code and tests use."""
    from router_service.serving.deployment import MAX_CLIENT_MESSAGE_BYTES, SERVE_MESSAGE_SIZE_ENV

    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    assert f"ENV {SERVE_MESSAGE_SIZE_ENV}={MAX_CLIENT_MESSAGE_BYTES}\n" in dockerfile

# ---- the manifest agrees with the serve config ----------------------------------------------

def test_label_selectors_name_the_right_pods(overlay):
    name, objects = overlay
    app = the_app(objects)
    # the controller on the head: never scaled away, and it fails only with the whole cluster
    assert app["args"]["controller_label_selector"] == pod_groups(objects)["head"]["labels"] == {ROLE: "head"}
    selector = router_deployment(objects)["ray_actor_options"]["label_selector"]
    (routers,) = groups_with_role(objects, "router")
    assert routers["labels"] == selector == {ROLE: "router"}  # Ray node labels (ray start --labels)
    # the controller reads the Redis URL and the cluster name on its own pod: the head's template sets them
    head = ray_container(pod_groups(objects)["head"])
    assert env(head)["ELASTICMOE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "elasticmoe-redis", "key": "url"}
    assert "metadata.labels['ray.io/cluster']" in str(env(head)["ELASTICMOE_RAY_CLUSTER"])
    for group_name, group in pod_groups(objects).items():
        if group_name != "head":
            assert "ELASTICMOE_REDIS_URL" not in env(ray_container(group)), "only the head holds the Redis secret"


def test_expert_pods_get_ready_without_a_serve_proxy_and_clients_reach_routers_only(overlay):
    """K4: KubeRay gives a RayService worker pod without a readiness probe one that also asks the
    local Serve proxy, and Serve runs proxies only where replicas run: expert pods would stay
    NotReady. They carry their own (the raylet, via the dashboard agent); router pods keep KubeRay's,
    which gates client traffic. Ready expert pods then sit in KubeRay's serve Service (it selects
    every worker pod), so clients use elasticmoe-api, which selects router pods only."""
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

    name, objects = overlay
    groups = pod_groups(objects)
    for group in groups.values():
        role = group["template"]["metadata"]["labels"][ROLE]
        probe = ray_container(group).get("readinessProbe")
        if role == "expert":
            assert probe["httpGet"] == {"path": "/api/healthz", "port": DEFAULT_DASHBOARD_AGENT_LISTEN_PORT}
            assert "rayStartParams" in group and "dashboard-agent-listen-port" not in group["rayStartParams"]
        else:
            assert probe is None, f"{role}: KubeRay's probe (raylet + Serve proxy) is the right one here"
    (api,) = find(objects, "Service", "elasticmoe-api")
    for group in groups.values():
        labels = group["template"]["metadata"]["labels"]
        assert (api["spec"]["selector"].items() <= labels.items()) == (labels[ROLE] == "router"), labels
    (routers,) = groups_with_role(objects, "router")
    config = serve_config(objects)
    grpc, http = api["spec"]["ports"]  # gRPC, and the OpenAI-compatible HTTP API
    assert ports(ray_container(routers))[grpc["targetPort"]] == grpc["port"] == config["grpc_options"]["port"]
    assert ports(ray_container(routers))[http["targetPort"]] == http["port"] == config["http_options"]["port"]


def test_ports_and_metrics_match_the_configs(overlay):
    name, objects = overlay
    app, config = the_app(objects), serve_config(objects)
    groups = pod_groups(objects)
    head = groups["head"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs no router or expert work"
    assert rayservice(objects)["spec"]["excludeHeadPodFromServeSvc"] is True
    # KubeRay copies the head container's serve-* ports into <name>-serve-svc
    assert ports(ray_container(head))["serve-grpc"] == config["grpc_options"]["port"]
    assert ports(ray_container(head))["serve"] == config["http_options"]["port"]  # the OpenAI-compatible API
    (routers,) = groups_with_role(objects, "router")
    p = ports(ray_container(routers))
    assert p["serve-grpc"] == config["grpc_options"]["port"] and p["serve"] == config["http_options"]["port"]
    assert p["router-metrics"] == app["args"]["router"]["metrics_port"] == 9100
    # the autoscaler's metrics come from the controller actor, on the head
    assert ports(ray_container(head))["scaler-metrics"] == app["args"]["controller"]["autoscaler"]["metrics_port"]
    # both bind loopback unless told: scraped pods say 0.0.0.0 explicitly
    assert app["args"]["router"]["metrics_host"] == app["args"]["controller"]["autoscaler"]["metrics_host"] == "0.0.0.0"
    for group, port in ((routers, "9100"), (head, "9101")):
        annotations = group["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == port and annotations["prometheus.io/scrape"] == "true"
    metrics = [s for s in find(objects, "Service") if "metrics" in s["metadata"]["name"]]
    assert len(metrics) == 2
    for svc in metrics:
        (port,) = svc["spec"]["ports"]
        (target,) = [g for g in (routers, head) if svc["spec"]["selector"].items()
                     <= g["template"]["metadata"]["labels"].items()]
        assert ports(ray_container(target))[port["targetPort"]] == port["port"] == \
            int(svc["metadata"]["annotations"]["prometheus.io/port"])


def test_weights_are_mounted_read_only_and_checked_at_start(overlay):
    """Every Ray pod mounts the checkpoint read-only (which pod reads it, and why each must:
    test_actor_placement.py) and fails at start, with the reason, when it is missing."""
    name, objects = overlay
    checkpoint = the_app(objects)["args"]["checkpoint"]
    claims = {c["metadata"]["name"] for c in find(objects, "PersistentVolumeClaim")}
    for group_name, group in pod_groups(objects).items():
        spec = group["template"]["spec"]
        mounts = {m["name"]: m for m in ray_container(group).get("volumeMounts", [])}
        assert checkpoint.startswith(mounts["weights"]["mountPath"] + "/") and mounts["weights"]["readOnly"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "weights"]
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims and volume["persistentVolumeClaim"]["readOnly"]
        check = [c for c in spec["initContainers"] if c["name"] == "check-weights"]
        assert check and env(check[0])["ELASTICMOE_CHECKPOINT"]["value"] == checkpoint, group_name


def test_weights_claim_names_a_storage_class_many_nodes_can_mount():
    """K5: left to the default class (ReadWriteOnce on most clouds) a ReadWriteMany claim stays Pending,
    and every pod with it; the claim names its class, and the guide says how to provide it."""
    (pvc,) = find(render(K8S / "overlays" / "gpu"), "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] in (["ReadWriteMany"], ["ReadOnlyMany"])
    storage_class = pvc["spec"].get("storageClassName")
    assert storage_class, "no storageClassName: the cluster's default class decides, usually ReadWriteOnce"
    guide = (K8S / "README.md").read_text()
    assert f"storageClassName: {storage_class}" in guide and "kubectl get storageclass" in guide
    assert "kubectl -n elasticmoe get pvc elasticmoe-weights" in guide  # and how to see it Bound


def test_every_build_arg_named_anywhere_is_one_the_dockerfile_takes():
    """K6: `--build-arg TORCH_VARIANT` was documented; the Dockerfile's argument is VARIANT."""
    args = set(re.findall(r"^ARG (\w+)", dockerfile(), re.M))
    texts = [ROOT / "README.md", ROOT / "Dockerfile", *K8S.rglob("*.yaml"), *K8S.rglob("*.md")]
    named = {(str(t.relative_to(ROOT)), a) for t in texts for a in re.findall(r"--build-arg[ =](\w+)=", t.read_text())}
    assert named, "the guides show how to build the image"
    assert {(t, a) for t, a in named if a not in args} == set(), f"the Dockerfile takes {sorted(args)}"


def test_secrets_are_rendered_or_documented(overlay):
    name, objects = overlay
    rendered = {(s["metadata"]["name"], k) for s in find(objects, "Secret")
                for k in {**s.get("data", {}), **s.get("stringData", {})}}
    refs = {(ref["name"], ref["key"]) for ref in walk(objects, "secretKeyRef")}
    assert refs and refs <= rendered | EXTERNAL_SECRETS, refs - rendered - EXTERNAL_SECRETS
    if name == "gpu":
        assert not find(objects, "Secret"), "production secrets are created out of band, never in git"
        walkthrough = (K8S / "README.md").read_text()
        for secret in {name for name, _ in EXTERNAL_SECRETS}:
            assert f"kubectl -n elasticmoe create secret generic {secret}" in walkthrough, secret


def test_images_are_one_pinned_image(overlay):
    name, objects = overlay
    rs = rayservice(objects)
    images = {c["image"] for key in ("containers", "initContainers") for cs in walk(rs, key) for c in cs}
    assert len(images) == 1 and not images.pop().endswith(":latest"), name
    for d in find(objects, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            assert not c["image"].endswith(":latest") and ":" in c["image"]


def test_gpu_overlay_is_production_shaped():
    objects = render(K8S / "overlays" / "gpu")
    cluster = rayservice(objects)["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"
    args = the_app(objects)["args"]
    controller, autoscaler = args["controller"], args["controller"]["autoscaler"]
    (experts,) = groups_with_role(objects, "expert")
    container = ray_container(experts)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        experts["template"]["spec"]["tolerations"]
    assert controller["group_device"] == "cuda" and controller["num_gpus_per_group"] == 1
    # one group per GPU pod: the pods can hold the most groups the autoscaler may ask for
    assert experts["minReplicas"] <= autoscaler["min_groups"] <= args["num_groups"]
    assert experts["maxReplicas"] >= autoscaler["max_groups"] >= args["num_groups"]
    (routers,) = groups_with_role(objects, "router")
    router = router_deployment(objects)
    assert "nvidia.com/gpu" not in str(routers) and "nvidia.com/gpu" not in str(pod_groups(objects)["head"])
    assert router["max_replicas_per_node"] == 1
    assert routers["minReplicas"] >= router["autoscaling_config"]["min_replicas"]
    assert router["autoscaling_config"]["max_replicas"] <= routers["maxReplicas"]
    assert router["ray_actor_options"]["num_cpus"] <= float(ray_container(routers)["resources"]["limits"]["cpu"])
    # production serves only authenticated clients, tokens from a Secret; no way to turn that off by accident
    assert args["router"].get("api_tokens_env") and not args["router"].get("allow_unauthenticated")


def test_dev_cpu_overlay_is_one_cpu_worker():
    objects = render(K8S / "overlays" / "dev-cpu")
    assert "nvidia.com/gpu" not in str(objects)
    groups = pod_groups(objects)
    (worker,) = [g for n, g in groups.items() if n != "head"]
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == 1
    args = the_app(objects)["args"]
    assert args["controller"]["group_device"] == "cpu" and args["controller"]["num_gpus_per_group"] == 0
    assert args["checkpoint"].endswith("demo-small")
    # the one pod fits the router replica and every expert group the autoscaler may start (1 CPU each)
    cpus = float(ray_container(worker)["resources"]["limits"]["cpu"])
    assert router_deployment(objects)["ray_actor_options"]["num_cpus"] + args["controller"]["autoscaler"]["max_groups"] \
        <= cpus
    (make,) = [c for c in worker["template"]["spec"]["initContainers"] if c["name"] == "make-weights"]
    assert f"--preset small --out {args['checkpoint']}" in make["command"][-1]


# ---- NetworkPolicy: who reaches whom ---------------------------------------------------------

def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector against a label set."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []), "NotIn": not present or value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def reachable(policies, src: dict, dst_labels: dict, port: int) -> bool:
    """Ingress semantics: a pod no Ingress policy selects takes anything; a selected pod takes
    what some rule of a selecting policy allows. src: {"labels", "namespace" (None: outside the
    cluster, e.g. a load balancer), "namespace_labels"}."""
    selecting = [p["spec"] for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], dst_labels)]
    if not selecting:
        return True
    for spec in selecting:
        for rule in spec.get("ingress", []):
            port_ok = not rule.get("ports") or any(
                "port" not in p or p["port"] == port or p.get("endPort", -1) >= port >= p["port"]
                for p in rule["ports"])
            if port_ok and (not rule.get("from") or any(_peer_matches(peer, src) for peer in rule["from"])):
                return True
    return False


def _peer_matches(peer: dict, src: dict) -> bool:
    assert "ipBlock" not in peer, "teach reachable() ipBlock before using it"
    if src["namespace"] is None:  # not a pod: only a rule without `from` admits it
        return False
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], src["namespace_labels"])
    else:
        ns_ok = src["namespace"] == NAMESPACE
    return ns_ok and selects(peer.get("podSelector", {}), src["labels"])


def _pod(labels: dict, namespace: str | None = NAMESPACE) -> dict:
    return {"labels": labels, "namespace": namespace,
            "namespace_labels": {"kubernetes.io/metadata.name": namespace} if namespace else {}}


def test_network_policy_reachability(overlay):
    name, objects = overlay
    policies = find(objects, "NetworkPolicy")
    templates = {n: g["template"]["metadata"]["labels"] for n, g in pod_groups(objects).items()}
    (redis,) = [d["spec"]["template"]["metadata"]["labels"] for d in find(objects, "Deployment")
                if d["metadata"]["name"] == "elasticmoe-redis"]
    head = templates["head"]
    (router,) = [t for t in templates.values() if t[ROLE] == "router"]
    experts = [t for t in templates.values() if t[ROLE] == "expert"] or [router]  # dev-cpu: groups run on the router pod
    expert = experts[0]
    group_port = 41234  # an expert group's gRPC port: random (port 0), like most of Ray's
    outside, elsewhere = _pod({}, None), _pod({"app": "x"}, "other")
    operator = _pod({"app.kubernetes.io/name": "kuberay-operator"}, "kuberay-system")
    prometheus = _pod({"app.kubernetes.io/name": "prometheus"}, "monitoring")
    # the same labels in another namespace, which any tenant can set on a pod of theirs
    fake_operator = _pod({"app.kubernetes.io/name": "kuberay-operator"}, "tenant-a")
    fake_prometheus = _pod({"app.kubernetes.io/name": "prometheus"}, "tenant-a")
    other_in_monitoring = _pod({"app.kubernetes.io/name": "grafana"}, "monitoring")
    for labels in [*templates.values(), redis]:  # every pod of ours is isolated (default deny)
        assert not reachable(policies, elsewhere, labels, 12345)

    def ok(src, dst, port):
        return reachable(policies, src, dst, port)

    # from outside the namespace: the serve ports (gRPC, HTTP) of the router pods only
    assert all(ok(src, router, port) for src in (outside, elsewhere) for port in (9000, 8000))
    closed = [(router, 9100), (router, group_port), (head, 9000), (head, 8000), (head, 8265), (head, 6379),
              (redis, 6379)]
    if expert is not router:
        closed += [(expert, group_port), (expert, 9000)]
    for dst, port in closed:
        assert not ok(outside, dst, port) and not ok(elsewhere, dst, port), (dst, port)
    # the two named exceptions: the operator reads Serve status on the dashboard, Prometheus scrapes
    assert ok(operator, head, 8265) and not ok(operator, head, 6379) and not ok(operator, redis, 6379)
    assert ok(prometheus, router, 9100) and ok(prometheus, head, 9101) and not ok(prometheus, redis, 6379)
    for intruder in (fake_operator, fake_prometheus, other_in_monitoring):
        for dst, port in ((head, 8265), (head, 9101), (router, 9100), (head, 6379)):
            assert not ok(intruder, dst, port), (intruder, port)
    # Redis: its clients only, the routers and the head (the controller actor)
    assert ok(_pod(router), redis, 6379) and ok(_pod(head), redis, 6379)
    assert expert is router or not ok(_pod(expert), redis, 6379)
    # expert groups: routers dial them; Ray's own traffic between head and workers stays open
    assert ok(_pod(router), expert, group_port)
    assert ok(_pod(head), expert, 40000) and ok(_pod(expert), head, 6379) and ok(_pod(router), head, 6379)
    assert not ok(_pod(redis), expert, group_port)


# ---- the image --------------------------------------------------------------------------------

def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def docker_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile(), re.M))


def test_dockerfile_matches_ray_python_and_the_manifests():
    import sys

    import ray

    args = docker_args()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON\}-\$\{VARIANT\}$", dockerfile(), re.M)
    assert args["RAY_VERSION"] == ray.__version__, "the image's Ray must be the one the tests run"
    assert args["PYTHON"] == f"py{sys.version_info.major}{sys.version_info.minor}" == "py311"
    for name in OVERLAYS:
        assert rayservice(render(K8S / "overlays" / name))["spec"]["rayClusterConfig"]["rayVersion"] == \
            args["RAY_VERSION"], name


def test_dockerfile_deps_match_pyproject():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11 (the project's and CI's Python)")

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {Requirement(r).name: Requirement(r) for r in pyproject["project"]["dependencies"]}
    args = docker_args()
    text = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], dockerfile())
    installs = re.findall(r"pip install --no-cache-dir ([^\n&\\]+)", text)
    pinned = [Requirement(r.strip('"')) for line in installs for r in line.split()
              if r.strip('"') not in (".",) and not r.startswith("--") and not r.startswith('"http')]
    assert any(line.split()[0] == "." for line in installs), "the package itself: its deps from pyproject.toml"
    assert {r.name for r in pinned} == {"torch", "grpcio-tools", "ray"}
    for r in pinned:  # every pin the image adds must be one pyproject.toml allows
        (version,) = [s.version for s in r.specifier]
        assert r.name in declared and declared[r.name].specifier.contains(version), (r, declared.get(r.name))
    assert declared["ray"].extras == {"serve"} and [r.extras for r in pinned if r.name == "ray"] == [{"serve"}]
    # the CPU torch the Makefile installs is the one the image installs
    assert f"torch=={args['TORCH_VERSION']}" in (ROOT / "Makefile").read_text()
    assert "--index-url \"https://download.pytorch.org/whl/" in dockerfile()


def test_dockerfile_generates_every_proto_like_make_proto():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11 (the project's and CI's Python)")
    makefile = (ROOT / "Makefile").read_text()
    flags = "-Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto"
    assert f"grpc_tools.protoc {flags}" in makefile
    assert f"grpc_tools.protoc {flags}" in dockerfile()
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))
    assert protos and all(p in dockerfile() for p in protos), protos
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "checkpoints", ".git", "proto/**/*_pb2*.py"} <= set(ignore)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in {p.split(".")[0] for p in packages} - {"elasticmoe"}:
        assert package not in ignore and f"COPY --chown=ray:users {package} ./{package}" in dockerfile()


# ---- Redis: the manifest's start script, run for real ----------------------------------------

def test_redis_starts_from_the_manifest_script_with_the_password_off_the_command_line(tmp_path):
    import os
    import time

    import redis

    from cluster.state.redis_server import free_port

    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        pytest.fail("redis-server / redis-cli not installed (`make redis` installs them)")
    (deployment,) = find(render(K8S / "overlays" / "dev-cpu"), "Deployment", "elasticmoe-redis")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["sh", "-c"]
    port = free_port()
    script = container["args"][0]
    local = script.replace("port 6379", f"port {port}").replace("bind * -::*", "bind 127.0.0.1")
    assert local.count(str(port)) == 1 and "127.0.0.1" in local, "the script's port/bind lines changed"
    password = "manifest-test-pw"
    pod_env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password, "REDISCLI_AUTH": password}
    server = subprocess.Popen(["sh", "-c", local], env=pod_env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
                time.sleep(0.1)
        with pytest.raises(redis.exceptions.RedisError, match="(?i)NOAUTH|authenticat"):
            redis.Redis(port=port, socket_timeout=2).set("k", "v")
        assert password.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        probe = container["readinessProbe"]["exec"]["command"]  # redis-cli reads REDISCLI_AUTH
        done = subprocess.run([probe[0], "-p", str(port), *probe[1:]], env=pod_env, capture_output=True, text=True,
                              timeout=10)
        assert done.stdout.strip() == "PONG", done.stdout + done.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
