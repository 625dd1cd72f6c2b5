"""Test helper: the k8s/ overlays rendered as `kubectl kustomize` renders them, and lookups on them.

Without kubectl a small fallback renderer (resources, components, JSON6902 patches with a target,
images, namespace, configMapGenerator from files with a fixed name) renders the same objects;
tests/k8s/test_k8s_manifests.py checks both agree.
"""
from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
OBSERVABILITY = K8S / "observability"
CRD_DIR = Path(__file__).resolve().parents[3] / "shared" / "kuberay-crds"
KUBECTL = shutil.which("kubectl")
NAMESPACE = "elasticmoe"
# Secrets the gpu overlay expects to exist, created by hand as k8s/README.md says (step 2), never in git
EXTERNAL_SECRETS = {("elasticmoe-redis", "password"), ("elasticmoe-redis", "url"), ("elasticmoe-api-tokens", "tokens")}
ROLE = "elasticmoe.io/role"


# ---- rendering ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _render_cached(path: str, use_kubectl: bool) -> tuple:
    if use_kubectl:
        done = subprocess.run([KUBECTL, "kustomize", path], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"kubectl kustomize {path} failed:\n{done.stderr}")
        return tuple(d for d in yaml.safe_load_all(done.stdout) if d)
    return tuple(build_fallback(Path(path)))


def render(path: Path, use_kubectl: bool | None = None) -> list[dict]:
    """The objects `kubectl kustomize path` renders (the fallback without kubectl); a fresh copy."""
    use = bool(KUBECTL) if use_kubectl is None else use_kubectl
    return copy.deepcopy(list(_render_cached(str(path), use)))


FALLBACK_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "images", "namespace", "configMapGenerator"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass"}


def build_fallback(path: Path, accumulated: list[dict] | None = None) -> list[dict]:
    """render_fallback: resources (files, directories), components, JSON6902 patches with a
    target (inline or path), images (any containers/initContainers list), namespace, and
    configMapGenerator entries made of files with disableNameSuffixHash (a fixed name)."""
    k = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(k) - FALLBACK_KEYS
    if unknown:
        raise NotImplementedError(f"{path}/kustomization.yaml uses {sorted(unknown)}: teach render_fallback")
    objects = list(accumulated or [])
    for entry in k.get("resources", []):
        p = (path / entry).resolve()
        objects += build_fallback(p) if p.is_dir() else [d for d in yaml.safe_load_all(p.read_text()) if d]
    for entry in k.get("components", []):
        objects = build_fallback((path / entry).resolve(), objects)
    objects += [_config_map(path, g) for g in k.get("configMapGenerator", [])]
    for patch in k.get("patches", []):
        if set(patch) - {"path", "patch", "target"} or "target" not in patch:
            raise NotImplementedError(f"{path}: only JSON6902 patches with a target, got {patch}")
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (path / patch["path"]).read_text())
        targets = [o for o in objects if _targeted(o, patch["target"])]
        assert targets, f"{path}: patch target {patch['target']} matches nothing"
        for o in targets:
            for op in ops:
                _json6902(o, op)
    for image in k.get("images", []):
        for o in objects:
            _set_image(o, image)
    if "namespace" in k:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    return objects


def _config_map(path: Path, generator: dict) -> dict:
    options = generator.get("options", {})
    if set(generator) - {"name", "files", "options"} or set(options) - {"labels", "disableNameSuffixHash"} \
            or not options.get("disableNameSuffixHash"):
        raise NotImplementedError(f"{path}: only configMapGenerator name/files/options.labels with "
                                  f"disableNameSuffixHash, got {generator}")
    metadata = {"name": generator["name"], **({"labels": dict(options["labels"])} if "labels" in options else {})}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
            "data": {Path(f).name: (path / f).read_text() for f in generator["files"]}}


def _targeted(o: dict, target: dict) -> bool:
    group, _, version = o["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": o["kind"], "name": o["metadata"]["name"]}
    return all(want[key] == value for key, value in target.items())


def _json6902(doc: dict, op: dict) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op["op"] == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif op["op"] == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[index]
        else:
            raise NotImplementedError(op["op"])
    elif op["op"] in ("add", "replace"):
        if op["op"] == "replace" and last not in node:
            raise KeyError(f"replace of a missing path {op['path']}")
        node[last] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del node[last]
    else:
        raise NotImplementedError(op["op"])


def _set_image(node, image: dict) -> None:
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name, tag = _split_image(c.get("image", ""))
                    if name == image["name"]:
                        c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
            _set_image(value, image)


def _split_image(image: str) -> tuple[str, str]:
    name, sep, tag = image.rpartition(":")
    return (name, tag) if sep and "/" not in tag else (image, "latest")


# ---- the rendered objects, by role ------------------------------------------------------------

def find(objects, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def rayservice(objects) -> dict:
    (rs,) = find(objects, "RayService")
    return rs


def serve_config(objects) -> dict:
    """The parsed serveConfigV2 of the overlay's RayService."""
    return yaml.safe_load(rayservice(objects)["spec"]["serveConfigV2"])


def pod_groups(objects) -> dict[str, dict]:
    """'head' and each worker groupName -> its group spec (template, labels, replicas)."""
    cluster = rayservice(objects)["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def walk(node, key: str):
    """Every value stored under `key`, at any depth."""
    if isinstance(node, list):
        for item in node:
            yield from walk(item, key)
    elif isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            yield from walk(value, key)


def groups_with_role(objects, role: str) -> list[dict]:
    return [g for g in pod_groups(objects).values() if g["template"]["metadata"]["labels"].get(ROLE) == role]
