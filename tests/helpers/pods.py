"""Test helper: a RayService's pods simulated on this machine, each a real `ray start` node that
gets exactly what its pod template gives it.

    pod template (rendered)  -> a directory standing for the pod's filesystem root: the paths its
                                containers mount exist there, the checkpoint only under the weights
                                mount; HOME is <root>/home/ray (the image's `ray` user)
                             -> the environment its template sets (values, Secret keys, the
                                ray.io/cluster label), the image's ENV lines, and PATH/PYTHONPATH
                                standing for the installed package; nothing from the test process
                             -> `ray start` as KubeRay runs it: --num-cpus (rayStartParams, else the
                                CPU limit), --num-gpus (nvidia.com/gpu limit), --labels, run in the
                                root (so a relative path resolves inside the pod), --block

Absolute paths of the manifests (`/models/demo-small`) are made relative ("models/demo-small") in
the serveConfigV2 under test, so each process resolves them against its own pod's root: a pod
that does not mount the weights does not have them. Stopped by pid (SIGTERM to `ray start
--block` stops what it started; then SIGKILL to its own process group if needed).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.state.redis_server import free_port
from helpers.manifests import ROOT, ray_container

VENV_BIN = Path(sys.executable).parent
# What the image has on PATH and in site-packages; here the repository stands for the installed package.
BASE_ENV = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{ROOT / 'proto'}",
            "LANG": "C.UTF-8", "RAY_USAGE_STATS_ENABLED": "0"}


def image_env() -> dict[str, str]:
    """The Dockerfile's ENV lines: every pod of the image has them."""
    return dict(re.findall(r"^ENV (\w+)=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M))


class SimulatedPod:
    """One pod of a RayService group as a local Ray node."""

    def __init__(self, name: str, group: dict, root: Path, secrets: dict, ray_cluster: str,
                 checkpoint: tuple[str, Path]):
        """secrets: (Secret name, key) -> value; checkpoint: (the path serveConfigV2 names, the directory
        to find there), placed under the weights mount when the template has one."""
        self.name, self.group, self.root = name, group, root
        container = ray_container(group)
        self.env = {**BASE_ENV, **image_env(), "HOME": str(root / "home" / "ray")}
        for e in container.get("env", []):
            self.env[e["name"]] = self._value(e, secrets, ray_cluster)
        (root / "home" / "ray").mkdir(parents=True)
        self.mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        for path, volume in self.mounts.items():
            (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            at, source = checkpoint
            if volume == "weights" and at.startswith(path.rstrip("/") + "/"):  # what make-weights / the PVC holds
                target = root / at.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source, target_is_directory=True)
        limits = container["resources"]["limits"]
        self.num_cpus = group["rayStartParams"].get("num-cpus", limits.get("cpu", "0"))
        self.num_gpus = limits.get("nvidia.com/gpu", "0")
        self.labels = group.get("labels", {})
        self.process: subprocess.Popen | None = None
        self.agent_port = free_port()

    @staticmethod
    def _value(e: dict, secrets: dict, ray_cluster: str) -> str:
        if "value" in e:
            return e["value"]
        source = e["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            return secrets[(ref["name"], ref["key"])]
        if source.get("fieldRef", {}).get("fieldPath") == "metadata.labels['ray.io/cluster']":
            return ray_cluster
        raise NotImplementedError(f"env {e['name']}: teach SimulatedPod {source}")

    def start(self, head_address: str | None = None) -> str:
        """Start the node (the head when head_address is None); returns the GCS address."""
        args = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                f"--num-cpus={self.num_cpus}", f"--num-gpus={self.num_gpus}", "--object-store-memory=100000000",
                f"--dashboard-agent-listen-port={self.agent_port}", "--disable-usage-stats"]
        if self.labels:
            args.append("--labels=" + ",".join(f"{k}={v}" for k, v in self.labels.items()))
        if head_address is None:
            port = free_port()
            args += ["--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}"]
            address = f"127.0.0.1:{port}"
        else:
            args.append(f"--address={head_address}")
            address = head_address
        log = open(self.root.parent / f"{self.name}.log", "wb")
        self.process = subprocess.Popen(args, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        return address

    def stop(self, timeout_s: float = 30.0) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # its own session (start_new_session): only what it started
            p.wait(timeout=10)

    def written(self) -> list[str]:
        """Files the pod's processes created outside its writable mounts (the root filesystem is read-only
        in the manifests): what a pod would fail on. The weights mount is read-only too."""
        writable = [p.lstrip("/") for p, volume in self.mounts.items() if volume != "weights"]
        out = []
        for path in self.root.rglob("*"):
            rel = path.relative_to(self.root).as_posix()
            if path.is_symlink() or path.is_dir() or any(rel == w or rel.startswith(w + "/") for w in writable):
                continue
            out.append(rel)
        return out


def wait_for_nodes(count: int, timeout_s: float = 120.0) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while sum(1 for n in ray.nodes() if n["Alive"]) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} Ray nodes not up after {timeout_s} s")
        time.sleep(0.5)
