"""Controller: creates the expert groups, owns the placement table, keeps Redis current.

    start()         round-robin table over G groups -> G ExpertGroupActors (slots_of(g))
                    -> start() on all, concurrently -> addresses -> publish placement v1 to Redis
    check_groups()  observe: address() of every group (short timeout)
                    decide:  groups answering None / another address / not at all need start()
                    apply:   start() them, probe the new address over gRPC, publish v+1 if any moved
    shutdown()      ray.kill every group, unregister it

Meant to run as a detached named actor, so it outlives the `moectl` process that made it:

    ControllerActor.options(name=config.name, lifetime="detached", get_if_exists=True).remote(config)

The groups are ordinary (non-detached) actors owned by the controller: if the
controller dies they die with it, and a new controller starts from scratch,
publishing a placement version above the one left in Redis. This is the only file
in cluster/ that calls Ray; state.py and the planner stay plain Python.

Why check_groups() and not a Ray callback: Ray restarts a dead group (max_restarts)
but only runs its __init__, so the new process serves nothing until start() is
called, and with port 0 it listens on a new port (experts/group.py). Nobody is told;
the controller notices because address() answers None, and publishes the new address.
A process that is dying still answers with its old address for a moment, so an
address is published only once it answers a gRPC Stats call.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
import ray
from elasticmoe.v1 import expert_pb2, expert_pb2_grpc
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from cluster.autoscaler_config import AutoscalerConfig
from cluster.checkpoint import Checkpoint
from cluster.placement_table import PlacementTable
from cluster.state import ClusterState, check_url
from experts.config import DEVICES, DTYPES, ExpertGroupConfig
from experts.group import ExpertGroupActor
from cluster.typed_config import config_from_dict

log = logging.getLogger(__name__)

SERVING, NOT_SERVING = "SERVING", "NOT_SERVING"


class ControllerError(RuntimeError):
    """The controller could not bring up or repair its groups; the message names the group."""


class GroupNotReadyError(ControllerError):
    """A group is restarting or its new address does not answer yet: transient, the next
    check_groups() tries again."""


@dataclass
class ControllerConfig:
    checkpoint: str  # checkpoint directory, readable from every node a group may run on
    num_groups: int  # expert groups (one GPU each when the cluster has GPUs)
    redis_url: str  # redis://[:password@]host:port/db or rediss:// for TLS
    redis_namespace: str = "elasticmoe"  # key prefix in Redis (cluster/state.py)
    group_device: str = "auto"  # ExpertGroupConfig.device
    group_dtype: str | None = None  # ExpertGroupConfig.dtype; None = bf16 on cuda, fp32 on cpu
    group_host: str = "127.0.0.1"  # groups' bind address; "0.0.0.0" when routers run on other nodes
    num_gpus_per_group: float | None = None  # None = 1 when the cluster has GPUs, else 0
    max_group_restarts: int = 3  # Ray restarts of a group's process; -1 = unlimited
    group_start_timeout_s: float = 600.0  # start() loads weights: minutes for a large model
    health_timeout_s: float = 2.0  # a group's address() or Stats slower than this counts as not serving
    name: str = "elasticmoe-controller"  # the actor name; groups are named f"{name}-group-{i}"
    autoscaler: AutoscalerConfig | dict = field(default_factory=AutoscalerConfig)  # cluster/autoscaler_config.py

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ValueError(f"checkpoint must be a non-empty path string, got {self.checkpoint!r}")
        if not _is_int(self.num_groups) or self.num_groups < 1:
            raise ValueError(f"num_groups must be an int >= 1, got {self.num_groups!r}")
        check_url(self.redis_url)
        if not isinstance(self.redis_namespace, str) or not self.redis_namespace or ":" in self.redis_namespace:
            raise ValueError(f"redis_namespace must be a non-empty string without ':', got {self.redis_namespace!r}")
        if self.group_device not in DEVICES:
            raise ValueError(f"group_device must be one of {DEVICES}, got {self.group_device!r}")
        if self.group_dtype is not None and self.group_dtype not in DTYPES:
            raise ValueError(f"group_dtype must be None or one of {tuple(DTYPES)}, got {self.group_dtype!r}")
        if not isinstance(self.group_host, str) or not self.group_host:
            raise ValueError(f"group_host must be a non-empty string, got {self.group_host!r}")
        if self.num_gpus_per_group is not None and (not _is_number(self.num_gpus_per_group)
                                                    or self.num_gpus_per_group < 0):
            raise ValueError(f"num_gpus_per_group must be None (auto) or a number >= 0, got {self.num_gpus_per_group!r}")
        if not _is_int(self.max_group_restarts) or self.max_group_restarts < -1:
            raise ValueError(f"max_group_restarts must be an int >= -1 (-1 = unlimited), got {self.max_group_restarts!r}")
        for key in ("group_start_timeout_s", "health_timeout_s"):
            value = getattr(self, key)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"{key} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if isinstance(self.autoscaler, dict):
            self.autoscaler = AutoscalerConfig.from_dict(self.autoscaler)
        if not isinstance(self.autoscaler, AutoscalerConfig):
            raise ValueError(f"autoscaler must be a mapping of AutoscalerConfig keys, got {self.autoscaler!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "ControllerConfig":
        return config_from_dict(cls, d)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Controller:
    """The plain class; ControllerActor is the Ray actor. Every public method is a control call."""

    def __init__(self, config: ControllerConfig | dict):
        self.config = config if isinstance(config, ControllerConfig) else ControllerConfig.from_dict(config)
        # Synchronous redis-py calls on the actor's event loop: a few small writes per control call,
        # bounded by state.SOCKET_TIMEOUT_S; never on a router's hot path.
        self.state = ClusterState(self.config.redis_url, self.config.redis_namespace)
        self.names = [f"{self.config.name}-group-{i}" for i in range(self.config.num_groups)]
        self._actors: list = []  # ActorHandle per group id, empty until start()
        self._table: PlacementTable | None = None  # what Redis holds, with the addresses we trust
        self._lock = asyncio.Lock()  # one control call mutates the table at a time; binds to the actor's loop

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
            return self._summary()

    async def _start(self) -> None:
        cfg = self.config
        spec = (await asyncio.to_thread(Checkpoint, cfg.checkpoint)).spec  # reads config.json and the index only
        plan = PlacementTable.round_robin(spec, [f"pending:{i}" for i in range(cfg.num_groups)])
        num_gpus = self._num_gpus()
        for i, name in enumerate(self.names):
            group_config = ExpertGroupConfig(checkpoint=cfg.checkpoint, slots=plan.slots_of(i), device=cfg.group_device,
                                             dtype=cfg.group_dtype, host=cfg.group_host, name=name)
            options = dict(name=name, max_restarts=cfg.max_group_restarts, max_task_retries=0)
            if num_gpus:
                options["num_gpus"] = num_gpus
            try:
                self._actors.append(ExpertGroupActor.options(**options).remote(group_config))
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
        # Above any version a previous controller left in Redis, so routers switch to it (v1 on a fresh Redis).
        table = PlacementTable(self.state.placement_version() + 1, tuple(results), plan.replicas)
        table.validate(spec)
        # Groups first: a router that sees the new placement can already look every group up.
        for i, name in enumerate(self.names):
            self.state.register_group(name, table.groups[i], table.slots_of(i))
        self.state.publish_placement(table)
        self._table = table
        log.info("controller %s: placement version %d published, groups %s", cfg.name, table.version,
                 dict(zip(self.names, table.groups)))

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
        return self._started().to_json()

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

    # ---- repair: observe / decide / apply ---------------------------------------------

    async def check_groups(self) -> dict:
        """Restart every group that stopped serving its published address; publish the new
        addresses as one new placement version. Returns {"version", "refreshed": [names moved],
        "pending": [names still restarting: call again], "failed": {name: error, for good}}."""
        async with self._lock:
            table = self._started()
            seen = await asyncio.gather(*(self._observe(i) for i in range(len(self._actors))))
            stale = [i for i, address in enumerate(seen) if address != table.groups[i]]
            return await self._refresh(stale)

    async def refresh_group(self, i: int) -> dict:
        """Call start() on group i again (after a Ray restart it serves nothing until then) and
        publish placement version+1 if its address changed. Same return shape as check_groups()."""
        async with self._lock:
            self._started()
            if not 0 <= i < len(self._actors):
                raise ControllerError(f"group id {i} is outside [0, {len(self._actors) - 1}]")
            return await self._refresh([i])

    async def _observe(self, i: int) -> str | None:
        """What group i says its address is; None when it serves nothing, is dead or too slow."""
        try:
            return await asyncio.wait_for(self._actors[i].address.remote(), self.config.health_timeout_s)
        except (asyncio.TimeoutError, RayActorError):
            return None  # restarting, dead for good, or its loop is blocked: all "not serving"

    async def _refresh(self, ids: list[int]) -> dict:
        table = self._table
        results = await asyncio.gather(*(self._restart(i) for i in ids), return_exceptions=True)
        moved, pending, failed = {}, [], {}
        for i, result in zip(ids, results):
            if isinstance(result, (GroupNotReadyError, ActorUnavailableError)):
                pending.append(self.names[i])  # Ray is restarting it: expected right after a crash
                log.warning("controller %s: group %s (published at %s) is not ready yet, will retry: %s",
                            self.config.name, self.names[i], table.groups[i], result)
            elif isinstance(result, BaseException):
                # ActorDiedError: out of restarts (max_group_restarts); or start() itself failed
                failed[self.names[i]] = f"{type(result).__name__}: {result}"
                log.error("controller %s: group %s (published at %s) could not be restarted: %s", self.config.name,
                          self.names[i], table.groups[i], failed[self.names[i]])
            elif result != table.groups[i]:
                moved[i] = result
        if moved:
            groups = tuple(moved.get(i, address) for i, address in enumerate(table.groups))
            new = PlacementTable(table.version + 1, groups, table.replicas, table.shares)
            for i, address in moved.items():
                self.state.register_group(self.names[i], address, new.slots_of(i))
            self.state.publish_placement(new)
            self._table = new
            for i, address in moved.items():
                log.info("controller %s: group %s moved %s -> %s, placement version %d", self.config.name,
                         self.names[i], table.groups[i], address, new.version)
        return {"version": self._table.version, "refreshed": [self.names[i] for i in moved], "pending": pending,
                "failed": failed}

    async def _restart(self, i: int) -> str:
        """start() on group i and the address it returns, once that address answers over gRPC."""
        address = await self._call_start(i)
        if not await self._serves(address):
            # start() answered by the dying process with its old address (experts/group.py): the
            # next check_groups() sees the restarted process's None and tries again.
            raise GroupNotReadyError(f"group {self.names[i]}: start() returned {address}, which does not answer Stats")
        return address

    async def _serves(self, address: str) -> bool:
        """Whether a group answers Stats at address within health_timeout_s."""
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                await expert_pb2_grpc.ExpertServiceStub(channel).Stats(expert_pb2.StatsRequest(),
                                                                       timeout=self.config.health_timeout_s)
            return True
        except grpc.aio.AioRpcError:
            return False

    # ---- shutdown ---------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Kill every group (no restart), unregister it, and return once none answers any more.
        The placement stays in Redis, so the next controller publishes a higher version."""
        async with self._lock:
            await self._kill_all()
            self._table = None

    async def _kill_all(self) -> None:
        addresses = self._table.groups if self._table is not None else (None,) * len(self._actors)
        for name, actor in zip(self.names, self._actors):
            ray.kill(actor, no_restart=True)
            self.state.unregister_group(name)
            log.info("controller %s: killed group %s", self.config.name, name)
        await asyncio.gather(*(self._wait_dead(*group) for group in zip(self.names, self._actors, addresses)))
        self._actors = []

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


# An async actor: control calls only, and they wait on groups, so several may be in flight
# (groups() while check_groups() restarts one); self._lock serialises the ones that mutate.
# max_task_retries=0: start()/check_groups() have side effects Ray must not replay.
ControllerActor = ray.remote(num_cpus=0, max_concurrency=16, max_task_retries=0)(Controller)
