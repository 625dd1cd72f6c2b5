"""Least privilege in the rendered manifests: every pod, every container, every NetworkPolicy rule.

    pods        non-root, RuntimeDefault seccomp, no service-account token unless it needs the API
    containers  no privilege escalation, every capability dropped, read-only root filesystem
                (writable: the emptyDirs it mounts), images by version
    policies    a peer in another namespace is named by its namespace (kubernetes.io/metadata.name,
                set by the API server) and its pod labels; no rule admits every namespace; the only
                rule open to anyone is the client port of the router pods
"""
from __future__ import annotations

import yaml

from helpers.manifests import K8S, OBSERVABILITY, OVERLAYS, find, render, walk

# The one container that talks to the Kubernetes API: KubeRay's autoscaler sidecar (it patches the
# RayCluster), given a token through autoscalerOptions.volumeMounts and nothing else.
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
PUBLIC_PORTS = {("router", 9000), ("router", 8000)}  # elasticmoe-api (gRPC, HTTP): clients, load balancers


def all_objects():
    for name in OVERLAYS:
        yield from render(K8S / "overlays" / name)
    yield from (d for d in yaml.safe_load_all((K8S / "tools" / "weights-loader.yaml").read_text()) if d)


def pod_specs():
    """(where, pod spec) of every pod the manifests make (RayService groups, Deployments, Pods)."""
    for o in all_objects():
        if o["kind"] == "RayService":
            cluster = o["spec"]["rayClusterConfig"]
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                yield f"{o['metadata']['name']}/{group.get('groupName', 'head')}", group["template"]["spec"], cluster
        elif o["kind"] == "Deployment":
            yield f"Deployment/{o['metadata']['name']}", o["spec"]["template"]["spec"], None
        elif o["kind"] == "Pod":
            yield f"Pod/{o['metadata']['name']}", o["spec"], None


def test_pods_run_as_non_root_with_runtime_default_seccomp_and_no_token():
    seen = 0
    for where, spec, _ in pod_specs():
        seen += 1
        context = spec.get("securityContext", {})
        assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) != 0, where
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert spec.get("automountServiceAccountToken") is False, f"{where}: mounts an API token"
        for c in spec["containers"] + spec.get("initContainers", []):
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert TOKEN_PATH not in mounts, f"{where}/{c['name']}: an API token it does not need"
    assert seen >= 6  # 3 + 2 RayService groups, Redis (twice), the weights loader


def test_containers_drop_everything_and_keep_the_root_filesystem_read_only():
    for where, spec, cluster in pod_specs():
        containers = spec["containers"] + spec.get("initContainers", [])
        if cluster is not None and where.endswith("/head"):
            containers.append({"name": "autoscaler (KubeRay sidecar)", **cluster["autoscalerOptions"]})
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers:
            context, name = c.get("securityContext", {}), f"{where}/{c['name']}"
            assert context.get("allowPrivilegeEscalation") is False, name
            capabilities = context.get("capabilities", {})
            assert capabilities.get("drop") == ["ALL"] and not capabilities.get("add"), name
            assert context.get("readOnlyRootFilesystem") is True, name
            assert not context.get("privileged"), name
            for m in c.get("volumeMounts", []):  # what it may write: emptyDirs only, never the weights
                volume = volumes[m["name"]]
                if not m.get("readOnly"):
                    assert "emptyDir" in volume or (where.startswith("Pod/") and m["mountPath"] == "/models"), \
                        f"{name} writes to {m['mountPath']}"


def test_the_autoscaler_sidecar_alone_gets_an_api_token():
    for name in OVERLAYS:
        (rs,) = find(render(K8S / "overlays" / name), "RayService")
        cluster = rs["spec"]["rayClusterConfig"]
        head = cluster["headGroupSpec"]["template"]["spec"]
        (token,) = [m for m in cluster["autoscalerOptions"]["volumeMounts"] if m["mountPath"] == TOKEN_PATH]
        assert token["readOnly"] is True
        (volume,) = [v for v in head["volumes"] if v["name"] == token["name"]]
        sources = volume["projected"]["sources"]
        assert any("serviceAccountToken" in s for s in sources)  # what the kubelet would have mounted
        assert {"ca.crt", "namespace"} <= {i["path"] for s in sources for i in next(iter(s.values())).get("items", [])}


def test_images_are_pinned_by_version():
    for o in [*all_objects(), *render(OBSERVABILITY)]:
        for key in ("containers", "initContainers"):
            for containers in walk(o, key):
                for c in containers:
                    image = c["image"]
                    name, _, tag = image.rpartition(":")
                    assert name and "/" not in tag and tag not in ("", "latest"), image


def _namespace_pinned(peer: dict) -> bool:
    labels = peer["namespaceSelector"].get("matchLabels", {})
    return set(labels) == {"kubernetes.io/metadata.name"} and not peer["namespaceSelector"].get("matchExpressions")


def test_network_policy_peers_name_their_namespace_and_their_pods():
    """The operator rule once matched a pod label in any namespace (`namespaceSelector: {}`): any tenant
    could label a pod kuberay-operator and submit a job on the dashboard. No rule may do that again."""
    for name in OVERLAYS:
        objects = render(K8S / "overlays" / name)
        for policy in find(objects, "NetworkPolicy"):
            target = policy["spec"]["podSelector"]
            for rule in policy["spec"].get("ingress", []):
                where = (name, policy["metadata"]["name"])
                if "from" not in rule:  # open to anyone: only the public client port
                    roles = {v for e in target.get("matchExpressions", []) for v in e.get("values", [])} | \
                        {target.get("matchLabels", {}).get("elasticmoe.io/role")}
                    ports = {p["port"] for p in rule["ports"]}
                    assert {(r, p) for r in roles - {None} for p in ports} <= PUBLIC_PORTS, where
                    continue
                for peer in rule["from"]:
                    assert "ipBlock" not in peer, where
                    pods = peer.get("podSelector", {})
                    assert pods.get("matchLabels") or pods.get("matchExpressions"), f"{where}: every pod"
                    if "namespaceSelector" in peer:
                        assert _namespace_pinned(peer), f"{where}: namespaces chosen by labels anyone can set"


def test_the_check_catches_a_peer_open_to_every_namespace():
    peer = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    assert not _namespace_pinned(peer)
    assert not _namespace_pinned({"namespaceSelector": {"matchLabels": {"team": "ops"}}})
    assert _namespace_pinned({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}})
