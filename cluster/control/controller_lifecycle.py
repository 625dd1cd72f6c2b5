"""The controller's lifecycle: create and start the groups, answer reads, and kill them.

    start()     round-robin table over G groups -> G ExpertGroupActors (slots_of(g))
                -> start() on all, concurrently -> addresses -> publish placement v1 to Redis
    shutdown()  ray.kill every group, unregister it

The groups are ordinary (non-detached) actors owned by the controller: if the
controller dies they die with it, and a new controller starts from scratch,
publishing a placement version above the one left in Redis.

A mixin of Controller (cluster/control/controller.py), whose __init__ sets and documents
the state used here.
"""
from __future__ import annotations

import asyncio
import logging
import os

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError

from cluster.checkpoint.reader import Checkpoint
from cluster.control.autoscaler import Autoscaler
from cluster.control.controller_errors import ControllerError
from cluster.placement.table import PlacementTable
from cluster.state.metrics import serve_metrics
from experts.config import ExpertGroupConfig
from experts.credentials import RouterCredentials
from experts.group import ExpertGroupActor

log = logging.getLogger("cluster.control.controller")  # one logger for the whole controller, named as before the split

SERVING, NOT_SERVING = "SERVING", "NOT_SERVING"


class GroupLifecycle:
    """start(), the reads (placement(), groups()) and shutdown()."""

    # ---- start ------------------------------------------------------------------------

    async def start(self) -> dict:
        """Create the groups, start them and publish the placement. Idempotent: a second call
        returns the summary of the running cluster."""
        async with self._lock:
            if self._table is None:
                try:
                    await self._start()
                except BaseException:
                    # half a cluster is worse than none: the caller retries start() from scratch
                    await self._kill_all()
                    raise
                a = self.config.autoscaler
                if a.metrics_port is not None and self._metrics_server is None:
                    self._metrics_server, self.metrics_address = serve_metrics(self.metrics.registry, a.metrics_port,
                                                                               a.metrics_host)
                    log.info("controller %s: autoscaler metrics on http://%s/metrics", self.config.name,
                             self.metrics_address)
                self._loop_task = asyncio.get_running_loop().create_task(self._run())
            return self._summary()

    async def _start(self) -> None:
        cfg = self.config
        spec = (await asyncio.to_thread(Checkpoint, cfg.checkpoint)).spec  # reads config.json and the index only
        self.spec = spec
        self.autoscaler = Autoscaler(cfg.autoscaler, spec, self.telemetry)
        plan = PlacementTable.round_robin(spec, [f"pending:{i}" for i in range(cfg.num_groups)])
        num_gpus = self._num_gpus()
        if num_gpus:  # a request a controller that died mid-add left standing would pin idle GPU pods
            self.gpu_requests.clear()
        for i, name in enumerate(self.names):
            try:
                self._actors.append(self._create_group(name, plan.slots_of(i), num_gpus))
            except ValueError as e:  # Ray: the name is taken, by a group a previous controller left behind
                raise ControllerError(f"cannot create group {name}: {e}; kill the old actor or pick another "
                                      "controller name") from e
        log.info("controller %s: created %d group(s) (num_gpus=%s each), starting them", cfg.name, len(self._actors),
                 num_gpus)
        results = await asyncio.gather(*(self._call_start(i) for i in range(cfg.num_groups)), return_exceptions=True)
        failed = [(self.names[i], r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if failed:
            name, error = failed[0]
            raise ControllerError(f"{len(failed)} of {cfg.num_groups} group(s) failed to start; "
                                  f"first: {name}: {error}") from error
        # Above the version of a placement a previous controller of this cluster signed, so routers switch to
        # it (v1 on a fresh Redis). Not the bare version key: a forged one must not push versions to the bound.
        version = await asyncio.to_thread(self.state.published_version)
        table = PlacementTable(version + 1, tuple(results), plan.replicas)
        table.validate(spec)
        await self._register_and_publish(table, range(len(self.names)))
        self._table = self._published = table
        self._held = [set(table.slots_of(i)) for i in range(len(self.names))]
        log.info("controller %s: placement version %d published, groups %s", cfg.name, table.version,
                 dict(zip(self.names, table.groups)))

    def _create_group(self, name: str, slots, num_gpus: float):
        """A new ExpertGroupActor; it loads `slots` and serves them once start() is called."""
        cfg = self.config
        for counter in (self.metrics.group_restarts, self.metrics.group_forwards, self.metrics.group_kernel_calls,
                        self.metrics.group_coalesced):
            counter.labels(name)  # at 0 from the start: increase() sees the first event
        group_config = ExpertGroupConfig(checkpoint=cfg.checkpoint, slots=slots, device=cfg.group_device,
                                         dtype=self.model_dtype(), host=cfg.group_host, name=name,
                                         cpu_threads=cfg.group_cpu_threads, credentials=self.credentials,
                                         coalesce_window_s=cfg.group_coalesce_window_s,
                                         cpu_affinity=[int(name.rsplit("-", 1)[-1]) % os.cpu_count()]
                                         if cfg.pin_groups else None)
        options = dict(name=name, max_restarts=cfg.max_group_restarts, max_task_retries=0)
        if num_gpus:
            options["num_gpus"] = num_gpus
        return ExpertGroupActor.options(**options).remote(group_config)

    def model_dtype(self) -> str:
        """The cluster's model dtype, which groups compute in and routers must use (a Ray call)."""
        return self.config.dtype or ("bfloat16" if self._num_gpus() else "float32")

    def router_credentials(self) -> RouterCredentials:
        """What a router needs: call Forward and Stats, verify the placement (a Ray call: it never leaves the
        cluster). Never the cluster secret or the control-plane secret: those stay in this actor."""
        return self.credentials.for_router()

    def redis_target(self) -> tuple[str, str]:
        """(Redis URL, namespace) this controller publishes to, as resolved on its own node; routers
        follow the same (a Ray call: the URL may hold a password and never leaves the cluster)."""
        return self.redis_url, self.redis_namespace

    def _num_gpus(self) -> float:
        if self.config.num_gpus_per_group is not None:
            return self.config.num_gpus_per_group
        return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0

    async def _call_start(self, i: int) -> str:
        try:
            return await asyncio.wait_for(self._actors[i].start.remote(), self.config.group_start_timeout_s)
        except asyncio.TimeoutError:
            raise ControllerError(f"group {self.names[i]}: start() did not return within "
                                  f"{self.config.group_start_timeout_s} s") from None

    # ---- read -------------------------------------------------------------------------

    def placement(self) -> str:
        """The current placement table as JSON (what Redis holds)."""
        self._started()
        return self._published.to_json()

    async def groups(self) -> list[dict]:
        """Per group: name, published address, number of slots, health (SERVING when the actor
        answers address() within health_timeout_s with the published address)."""
        table = self._started()
        seen = await asyncio.gather(*(self._observe(i) for i in range(len(self._actors))))
        return [{"name": self.names[i], "address": table.groups[i], "slots": len(table.slots_of(i)),
                 "health": SERVING if seen[i] == table.groups[i] else NOT_SERVING} for i in range(len(self._actors))]

    def _started(self) -> PlacementTable:
        if self._table is None:
            raise ControllerError(f"controller {self.config.name} is not started: call start() first")
        return self._table

    # ---- shutdown ---------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Kill every group (no restart), unregister it, and return once none answers any more.
        The placement stays in Redis, so the next controller publishes a higher version."""
        for task in (self._loop_task, self._adding):
            if task is not None:
                task.cancel()
        self._loop_task = self._adding = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        async with self._lock:
            await self._kill_all()
            self._table = self._published = None

    async def _kill_all(self) -> None:
        addresses = list(self._table.groups if self._table is not None else (None,) * len(self._actors))
        groups = list(zip(self.names, self._actors, addresses))
        groups += [(g.name, g.actor, g.address) for g in self._retiring]
        await self._kill(groups)
        self._actors, self._held, self._retiring = [], [], []
        self.names = [f"{self.config.name}-group-{i}" for i in range(self.config.num_groups)]
        self._next_name = self.config.num_groups

    async def _register_and_publish(self, table: PlacementTable, ids, publish: bool = True) -> None:
        """Register groups `ids` with their addresses and slots in `table`, then publish it: groups
        first, so a router that sees the placement can look every group up. Off the actor's event
        loop: a slow Redis must not stall the control calls waiting on it."""
        def write():
            for i in ids:
                self.state.register_group(self.names[i], table.groups[i], table.slots_of(i))
            if publish:
                self.state.publish_placement(table)

        await asyncio.to_thread(write)

    async def _kill(self, groups: list[tuple[str, object, str | None]]) -> None:
        for name, actor, _ in groups:
            ray.kill(actor, no_restart=True)
            await asyncio.to_thread(self.state.unregister_group, name)
            log.info("controller %s: killed group %s", self.config.name, name)
        await asyncio.gather(*(self._wait_dead(*group) for group in groups))

    async def _wait_dead(self, name: str, actor, address: str | None, timeout_s: float = 10.0) -> None:
        """Wait (bounded) until Ray reports the group dead and its address stops answering.
        Both are needed: ray.kill returns at once, and Ray marks the actor dead before its
        process has exited, while its gRPC server still answers (seen in tests)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            try:
                await asyncio.wait_for(actor.address.remote(), self.config.health_timeout_s)
            except ActorDiedError:
                break
            except (ActorUnavailableError, asyncio.TimeoutError):
                pass  # on its way down
            await asyncio.sleep(0.05)
        while address is not None and loop.time() < deadline and await self._serves(address):
            await asyncio.sleep(0.05)
        if loop.time() >= deadline:
            log.warning("controller %s: group %s (%s) still alive %.0f s after ray.kill", self.config.name, name,
                        address, timeout_s)

    def _summary(self) -> dict:
        table = self._started()
        return {"version": table.version,
                "groups": [{"name": name, "address": table.groups[i], "slots": len(table.slots_of(i))}
                           for i, name in enumerate(self.names)]}
