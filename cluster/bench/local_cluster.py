"""An in-process cluster for the benchmarks that need the real thing: a private redis-server, a local
Ray of our own, the controller actor with its expert groups, and one router in this process.

    with LocalCluster(checkpoint, num_groups, autoscaler={...}, router={...}) as c:
        c.router.api / c.router.engine / c.controller / c.state
        c.restart_redis()     # stopped and started again on its port, empty (a fault drill)

routers=N starts N-1 more router replicas, each a Ray actor (its own process and GIL, as replicas
are in production) holding a Router built from the same RouterConfig and credentials:
c.replicas[i].call.remote(fn, *args) runs fn(router, *args) there. controller={...} adds
ControllerConfig settings (e.g. group_coalesce_window_s).

Everything it started is stopped on exit (the replicas close, the controller kills its groups, Ray
shuts down, the Redis process is ended by pid).
"""
from __future__ import annotations

import secrets
import time


class LocalCluster:
    def __init__(self, checkpoint, num_groups: int = 2, autoscaler: dict | None = None, router: dict | None = None,
                 group_threads: int | None = None, namespace: str = "bench", name: str | None = None,
                 pin_groups: bool = False, routers: int = 1, controller: dict | None = None):
        if isinstance(routers, bool) or not isinstance(routers, int) or routers < 1:
            raise ValueError(f"routers must be an int >= 1, got {routers!r}")
        self.checkpoint, self.num_groups, self.namespace = str(checkpoint), num_groups, namespace
        self.autoscaler, self.router_settings, self.group_threads = autoscaler or {}, router or {}, group_threads
        self.name, self.pin_groups = name or f"bench-{int(time.time())}", pin_groups
        self.routers, self.controller_settings = routers, controller or {}
        self.redis = self.controller = self.router = self.state = None
        self.replicas: list = []  # routers 2..N: RouterReplica actors
        self._redis_password = secrets.token_urlsafe(24)

    def __enter__(self) -> "LocalCluster":
        import ray
        import torch

        from cluster.checkpoint.reader import Checkpoint
        from cluster.control.controller import ControllerActor, ControllerConfig
        from cluster.state.redis_server import EmbeddedRedis
        from cluster.state.store import ClusterState
        from router_service.serving.router import Router
        from router_service.serving.router_config import RouterConfig

        self.spec = Checkpoint(self.checkpoint).spec
        self.redis = EmbeddedRedis(password=self._redis_password)  # like moectl serve's: not open to local users
        try:
            ray.init(address="local", include_dashboard=False, log_to_driver=False, namespace="elasticmoe-bench")
            self.state = ClusterState(self.redis.url, self.namespace)
            config = ControllerConfig(checkpoint=self.checkpoint, num_groups=self.num_groups, redis_url=self.redis.url,
                                      redis_namespace=self.namespace, group_device="cpu", name=self.name,
                                      autoscaler={"metrics_port": None, **self.autoscaler},
                                      group_cpu_threads=self.group_threads, pin_groups=self.pin_groups,
                                      **self.controller_settings)
            self.controller = ControllerActor.options(name=self.name).remote(config)
            ray.get(self.controller.start.remote(), timeout=600)
            placement = ray.get(self.controller.placement.remote(), timeout=60)  # from the controller, not Redis
            router_config = RouterConfig(checkpoint=self.checkpoint, placement=placement, redis_url=self.redis.url,
                                         redis_namespace=self.namespace, metrics_port=None, **self.router_settings)
            credentials = ray.get(self.controller.router_credentials.remote(), timeout=60)
            self.router = Router(router_config, credentials)
            replica = ray.remote(max_task_retries=0)(RouterReplica)
            self.replicas = [replica.remote(router_config, credentials, torch.get_num_threads())
                             for _ in range(self.routers - 1)]
            ray.get([r.ready.remote() for r in self.replicas], timeout=600)
        except BaseException:
            self.__exit__()
            raise
        return self

    def restart_redis(self) -> None:
        from cluster.state.redis_server import EmbeddedRedis

        port = self.redis.port
        self.redis.stop()
        # back on its port with its password, empty: the controller publishes the placement again
        self.redis = EmbeddedRedis(port=port, password=self._redis_password)

    def __exit__(self, *exc) -> None:
        import ray

        try:
            if self.replicas:
                try:
                    ray.get([r.close.remote() for r in self.replicas], timeout=60)
                except Exception as e:  # a replica that died or never started: the rest must still stop
                    print(f"warning: closing router replicas: {e}")
                finally:
                    for r in self.replicas:
                        ray.kill(r)
            if self.router is not None:
                self.router.close()
            if self.controller is not None:
                try:
                    ray.get(self.controller.shutdown.remote(), timeout=60)
                finally:
                    ray.kill(self.controller)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            if self.redis is not None:
                self.redis.stop()


class RouterReplica:
    """A router replica in its own process (LocalCluster's routers 2..N, as a Ray actor): a Router from the
    same config and credentials as the one in the driver, with as many torch threads (Ray would give it one)."""

    def __init__(self, config, credentials, torch_threads: int):
        import torch

        from router_service.serving.router import Router

        torch.set_num_threads(torch_threads)
        self.router = Router(config, credentials)

    def ready(self) -> bool:
        return True

    def call(self, fn, *args):
        """fn(router, *args) here; fn a module-level function (Ray pickles it by name)."""
        return fn(self.router, *args)

    def close(self) -> None:
        self.router.close()
