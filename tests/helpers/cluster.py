"""Test helper: a controller with its expert groups on Ray, a Redis, and one router in this
process (engine, RemoteExperts, placement follower, telemetry reporter), for the autoscaler,
fault and Redis-security tests.
"""
from __future__ import annotations

import uuid

import ray

from cluster.checkpoint.reader import Checkpoint
from cluster.control.controller import ControllerActor, ControllerConfig
from cluster.state.store import ClusterState
from router_service.serving.router import Router
from router_service.serving.router_config import RouterConfig

# Autoscaler settings that act within seconds, for tests.
FAST = dict(interval_s=0.25, window_s=2.0, sustain_s=0.5, cooldown_s=1.5, min_tokens=20, metrics_port=0,
            metrics_host="127.0.0.1",
            drain_timeout_s=10.0)


class Cluster:
    """Controller + groups on Ray, Redis, and one router in this process."""

    def __init__(self, checkpoint, redis_url: str, num_groups: int, autoscaler: dict, controller: dict | None = None,
                 router: dict | None = None):
        self.name = f"test-autoscaler-{uuid.uuid4().hex[:8]}"
        self.namespace = self.name
        config = ControllerConfig(checkpoint=str(checkpoint), num_groups=num_groups, redis_url=redis_url,
                                  redis_namespace=self.namespace, group_device="cpu", name=self.name,
                                  autoscaler=autoscaler, **(controller or {}))
        self.controller = ControllerActor.options(name=self.name).remote(config)
        ray.get(self.controller.start.remote(), timeout=120)
        self.state = ClusterState(redis_url, self.namespace)
        placement = ray.get(self.controller.placement.remote(), timeout=30)  # from the controller: no Redis to trust
        self.router = Router(RouterConfig(checkpoint=str(checkpoint), placement=placement,
                                          redis_url=redis_url, redis_namespace=self.namespace, placement_poll_s=0.1,
                                          metrics_port=0, metrics_host="127.0.0.1", **(router or {})),
                             ray.get(self.controller.router_credentials.remote(), timeout=30))
        self.spec = Checkpoint(checkpoint).spec

    def replica_counts(self) -> dict[tuple[int, int], int]:
        return {slot: len(gs) for slot, gs in self.state.load_placement().replicas.items()}

    def replicated(self) -> set[tuple[int, int]]:
        return {slot for slot, n in self.replica_counts().items() if n > 1}

    def status(self) -> dict:
        return self.state.autoscaler_status() or {}

    def close(self) -> None:
        self.router.close()
        try:
            ray.get(self.controller.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.controller)
            self.state.close()
