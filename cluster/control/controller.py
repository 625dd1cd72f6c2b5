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
import os
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import ray
from elasticmoe.v1 import expert_pb2
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from cluster.checkpoint.reader import Checkpoint
from cluster.config import config_from_dict
from cluster.control.autoscaler import ADD_GROUP, REBALANCE, REMOVE_GROUP, Autoscaler, Decision, Observation
from cluster.control.autoscaler_config import AutoscalerConfig
from cluster.control.rebalance import Rebalancer, RebalanceResult, grpc_call
from cluster.placement.layout import Placement
from cluster.placement.table import PlacementTable
from cluster.state.metrics import AutoscalerMetrics, serve_metrics
from cluster.state.store import ClusterState, check_url
from cluster.state.telemetry import Telemetry
from experts.config import DEVICES, DTYPES, ExpertGroupConfig
from experts.credentials import ExpertCredentials, ExpertTLS
from experts.group import ExpertGroupActor

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
    redis_url: str = field(repr=False)  # redis://[:password@]host:port/db or rediss:// for TLS; never in a repr
    redis_namespace: str = "elasticmoe"  # key prefix in Redis (cluster/state/store.py)
    group_device: str = "auto"  # ExpertGroupConfig.device
    group_dtype: str | None = None  # ExpertGroupConfig.dtype; None = bf16 on cuda, fp32 on cpu
    group_host: str = "127.0.0.1"  # groups' bind address; "0.0.0.0" when routers run on other nodes
    group_cpu_threads: int | None = None  # ExpertGroupConfig.cpu_threads: torch threads per CPU group
    num_gpus_per_group: float | None = None  # None = 1 when the cluster has GPUs, else 0
    max_group_restarts: int = 3  # Ray restarts of a group's process; -1 = unlimited
    group_start_timeout_s: float = 600.0  # start() loads weights: minutes for a large model
    health_timeout_s: float = 2.0  # a group's address() or Stats slower than this counts as not serving
    name: str = "elasticmoe-controller"  # the actor name; groups are named f"{name}-group-{i}"
    repair_interval_s: float | None = 2.0  # the control loop restarts stopped groups this often; None = on call only
    autoscaler: AutoscalerConfig | dict = field(default_factory=AutoscalerConfig)  # cluster/control/autoscaler_config.py
    # The internal expert API's credentials (experts/credentials.py). The cluster secret: given here (Python
    # only: serveConfigV2 args are logged), read from the environment variable named by expert_secret_env
    # in the controller's process, or else generated at start: 32 random bytes, never logged.
    expert_secret: str | None = field(default=None, repr=False)
    expert_secret_env: str | None = None
    expert_tls: dict | None = None  # {ca_file, cert_file, key_file[, server_name]}: mutual TLS on expert ports

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
        if self.repair_interval_s is not None and (not _is_number(self.repair_interval_s)
                                                   or self.repair_interval_s <= 0):
            raise ValueError(f"repair_interval_s must be None or a positive number, got {self.repair_interval_s!r}")
        if self.expert_secret is not None:
            ExpertCredentials(self.expert_secret)  # validates it; the message never holds it
        if self.expert_secret_env is not None and not (isinstance(self.expert_secret_env, str)
                                                       and self.expert_secret_env.isidentifier()):
            raise ValueError(f"expert_secret_env must name an environment variable, got {self.expert_secret_env!r}")
        if self.expert_tls is not None:
            if not isinstance(self.expert_tls, dict):
                raise ValueError(f"expert_tls must be a mapping of ca_file, cert_file, key_file[, server_name], "
                                 f"got {self.expert_tls!r}")
            ExpertTLS.from_dict(self.expert_tls)
        if isinstance(self.autoscaler, dict):
            self.autoscaler = AutoscalerConfig.from_dict(self.autoscaler)
        if not isinstance(self.autoscaler, AutoscalerConfig):
            raise ValueError(f"autoscaler must be a mapping of AutoscalerConfig keys, got {self.autoscaler!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "ControllerConfig":
        return config_from_dict(cls, d)

    def expert_credentials(self, environ=os.environ) -> ExpertCredentials:
        """The cluster's expert-API credentials: the configured secret, else a fresh random one."""
        secret = self.expert_secret
        if secret is None and self.expert_secret_env is not None:
            secret = environ.get(self.expert_secret_env)
            if not secret:  # fail closed: a configured source that yields nothing is a mistake
                raise ValueError(f"expert_secret_env: ${self.expert_secret_env} is unset or empty here")
        tls = ExpertTLS.from_dict(self.expert_tls) if self.expert_tls else None
        return ExpertCredentials(secret, tls) if secret else ExpertCredentials.generate(tls)


def _request_gpus(num_groups: int) -> None:
    """Ask the Ray autoscaler (KubeRay's in-tree one) for GPU room for num_groups groups now,
    so a node starts while the new group's actor waits; a no-op without an autoscaler."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": 1}] * num_groups)
    except Exception as e:  # no autoscaler here: the actor's own GPU request is what waits
        log.info("request_resources unavailable (%s); the group's GPU request alone will wait", e)


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
        self._next_name = self.config.num_groups  # the number in the next added group's name
        self._actors: list = []  # ActorHandle per group id, empty until start()
        self._table: PlacementTable | None = None  # the groups we run and what they serve (see _published)
        # What Redis holds. Equal to _table but between dropping a lost group and publishing the
        # placement without it: routers and placement() go by this one.
        self._published: PlacementTable | None = None
        self._held: list[set[tuple[int, int]]] = []  # per group id: the slots it holds (a superset of its table slots)
        self._lock = asyncio.Lock()  # one control call mutates the table at a time; binds to the actor's loop
        self.telemetry = Telemetry(self.state)
        self.credentials = self.config.expert_credentials()  # per cluster; groups and routers get it from here
        a = self.config.autoscaler
        self.rebalancer = Rebalancer(self.state, self.telemetry, a.load_timeout_s, a.drain_timeout_s,
                                     credentials=self.credentials)
        self.metrics = AutoscalerMetrics(a.metrics_per_expert)
        self.spec = None  # read from the checkpoint by start()
        self.autoscaler: Autoscaler | None = None
        self.metrics_address: str | None = None
        self._metrics_server = None
        self._loop_task: asyncio.Task | None = None
        self._adding: asyncio.Task | None = None  # a group being started for a scale-up
        self._retiring: list[tuple[str, object, str, int]] = []  # (name, actor, address, version) removed groups
        self._last_stats: dict[str, tuple[dict, float, int]] = {}  # group name -> Stats counters last seen
        self._last_obs: Observation | None = None
        self.last_decision: Decision | None = None
        self.last_rebalance: dict | None = None
        self.paused = False  # `moectl autoscaler pause` (a flag in Redis), as of the last round

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
        # Above any version a previous controller left in Redis, so routers switch to it (v1 on a fresh Redis).
        table = PlacementTable(self.state.placement_version() + 1, tuple(results), plan.replicas)
        table.validate(spec)
        # Groups first: a router that sees the new placement can already look every group up.
        for i, name in enumerate(self.names):
            self.state.register_group(name, table.groups[i], table.slots_of(i))
        self.state.publish_placement(table)
        self._table = self._published = table
        self._held = [set(table.slots_of(i)) for i in range(len(self.names))]
        log.info("controller %s: placement version %d published, groups %s", cfg.name, table.version,
                 dict(zip(self.names, table.groups)))

    def _create_group(self, name: str, slots, num_gpus: float):
        """A new ExpertGroupActor; it loads `slots` and serves them once start() is called."""
        cfg = self.config
        group_config = ExpertGroupConfig(checkpoint=cfg.checkpoint, slots=slots, device=cfg.group_device,
                                         dtype=cfg.group_dtype, host=cfg.group_host, name=name,
                                         cpu_threads=cfg.group_cpu_threads, credentials=self.credentials)
        options = dict(name=name, max_restarts=cfg.max_group_restarts, max_task_retries=0)
        if num_gpus:
            options["num_gpus"] = num_gpus
        return ExpertGroupActor.options(**options).remote(group_config)

    def expert_credentials(self) -> ExpertCredentials:
        """What routers need to call the groups (a Ray call: it never leaves the cluster)."""
        return self.credentials

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
        moved, pending, failed, lost = {}, [], {}, []
        for i, result in zip(ids, results):
            if isinstance(result, (GroupNotReadyError, ActorUnavailableError)):
                pending.append(self.names[i])  # Ray is restarting it: expected right after a crash
                log.warning("controller %s: group %s (published at %s) is not ready yet, will retry: %s",
                            self.config.name, self.names[i], table.groups[i], result)
            elif isinstance(result, ActorDiedError) and await self._dead_for_good(i):  # out of restarts
                lost.append(i)
                failed[self.names[i]] = f"{type(result).__name__}: {result}"
                log.error("controller %s: group %s (published at %s) is dead and Ray will not restart it; its "
                          "experts move to the other groups", self.config.name, self.names[i], table.groups[i])
            elif isinstance(result, BaseException):  # start() itself failed: the next check tries again
                failed[self.names[i]] = f"{type(result).__name__}: {result}"
                log.error("controller %s: group %s (published at %s) could not be restarted: %s", self.config.name,
                          self.names[i], table.groups[i], failed[self.names[i]])
            elif result != table.groups[i]:
                moved[i] = result
        if moved:
            groups = tuple(moved.get(i, address) for i, address in enumerate(table.groups))
            new = PlacementTable(table.version + 1, groups, table.replicas, table.shares)
            if table == self._published:  # else survivors of a lost group wait to be published (below)
                for i, address in moved.items():
                    self.state.register_group(self.names[i], address, new.slots_of(i))
                self.state.publish_placement(new)
                self._published = new
            self._table = new
            for i, address in moved.items():
                log.info("controller %s: group %s moved %s -> %s, placement version %d", self.config.name,
                         self.names[i], table.groups[i], address, new.version)
        refreshed = [self.names[i] for i in moved]
        if lost:
            await self._drop_lost_groups(lost)
        if self._table != self._published and self._table.groups:  # dropped groups, not yet published (or retry)
            await self._publish_survivors()
        return {"version": self._published.version, "refreshed": refreshed, "pending": pending, "failed": failed}

    async def _dead_for_good(self, i: int) -> bool:
        """ActorDiedError also ends a call whose process died mid-call while Ray restarts it; only an
        actor that still answers ActorDiedError to a new call is out of restarts."""
        try:
            await asyncio.wait_for(self._actors[i].address.remote(), self.config.health_timeout_s)
        except ActorDiedError:
            return True
        except (ActorUnavailableError, asyncio.TimeoutError):
            pass
        return False

    async def _drop_lost_groups(self, lost: list[int]) -> None:
        """Forget groups Ray cannot restart (call with self._lock held). _publish_survivors then
        publishes the placement without them. Until it does, routers keep the old table: requests
        for experts only the lost groups held fail fast with UNAVAILABLE."""
        old = self._table
        survivors = [i for i in range(len(old.groups)) if i not in lost]
        gone = [(self.names[i], self._actors[i], old.groups[i]) for i in lost]
        new_id = {g: k for k, g in enumerate(survivors)}
        replicas, shares = {}, {}
        for slot, groups in old.replicas.items():
            kept = [(new_id[g], share) for g, share in zip(groups, old.shares_of(slot)) if g in new_id]
            if kept:  # the shares of the replicas left, renormalised
                total = sum(share for _, share in kept)
                replicas[slot] = tuple(g for g, _ in kept)
                shares[slot] = tuple(share / total if total > 0 else 1.0 / len(kept) for _, share in kept)
        # Not published: _publish_survivors publishes v+1 from it.
        self._table = PlacementTable(old.version, tuple(old.groups[i] for i in survivors), replicas, shares)
        self.names = [self.names[i] for i in survivors]
        self._actors = [self._actors[i] for i in survivors]
        self._held = [self._held[i] for i in survivors]
        await self._kill(gone)  # unregister them; Ray has them dead already
        self.metrics.group_changes.labels("lost").inc(len(gone))
        if not survivors:
            log.error("controller %s: every expert group is lost; nothing serves until the controller is restarted",
                      self.config.name)

    def _orphans(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs the controller's table gives no replica (their groups were lost)."""
        table = self._table
        return [(l, e) for l in self.spec.sparse_layers for e in range(self.spec.num_experts)
                if not table.replicas.get((l, e))]

    async def _publish_survivors(self) -> None:
        """After groups were dropped: a rebalance that publishes v+1 over the groups left, placing
        the experts only lost groups held where they move the fewest weights (call with
        self._lock held). A failure leaves the survivors unpublished: the next group check retries."""
        orphans = self._orphans()
        current = self._current_placement()
        if orphans:
            placement = await asyncio.to_thread(self.autoscaler.plan, self._loads(), current, len(self._table.groups))
        else:
            placement = current  # every expert has a replica left: only the lost addresses go
        result = await self._rebalance(placement, f"lost group(s) dropped; {len(orphans)} expert(s) re-placed")
        if result.result == "failed":
            log.error("controller %s: publishing the placement without the lost group(s) failed (%s); next try at the "
                      "next group check", self.config.name, result.error)

    async def _restart(self, i: int) -> str:
        """start() on group i and the address it returns, once that address answers over gRPC."""
        address = await self._call_start(i)
        if not await self._serves(address):
            # start() answered by the dying process with its old address (experts/group.py): the
            # next check_groups() sees the restarted process's None and tries again.
            raise GroupNotReadyError(f"group {self.names[i]}: start() returned {address}, which does not answer Stats")
        # A restarted process loaded the slots it was created with; the table may say otherwise
        # since (rebalances): load what it must serve before routers are sent there, drop the rest.
        want = set(self._table.slots_of(i)) if i < len(self._table.groups) else set()
        held = await self.rebalancer.load(address, want)
        if held - want:
            held = await self.rebalancer.unload(address, held - want)
        self._held[i] = held
        return address

    async def _serves(self, address: str) -> bool:
        """Whether a group answers Stats at address within health_timeout_s."""
        try:
            await grpc_call(address, "Stats", expert_pb2.StatsRequest(), self.config.health_timeout_s, self.credentials)
            return True
        except grpc.aio.AioRpcError:
            return False

    # ---- the control loop: repair, telemetry, autoscaling ------------------------------

    async def _run(self) -> None:
        """Every interval_s: groups Ray restarted are repaired (every repair_interval_s), group
        counters go to Redis, manual requests are served, then one autoscaler round."""
        loop = asyncio.get_running_loop()
        repair_s = self.config.repair_interval_s
        next_check = loop.time() + (repair_s or 0)
        while True:
            await asyncio.sleep(self.config.autoscaler.interval_s)
            try:
                if repair_s is not None and loop.time() >= next_check:
                    next_check = loop.time() + repair_s
                    result = await self.check_groups()
                    if result["refreshed"] or result["failed"]:
                        log.warning("controller %s: group check: %s", self.config.name, result)
                await self._collect_group_stats()
                await self._serve_requests()
                await self.autoscale_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis down, a group mid-restart: log, keep the loop, try next round
                log.exception("controller %s: control round failed; next in %.1f s", self.config.name,
                              self.config.autoscaler.interval_s)

    async def _collect_group_stats(self) -> None:
        """Groups count what they serve (Stats); the controller turns counts into per-round
        deltas in Redis, so groups need no Redis of their own (experts/ knows nothing of it)."""
        table = self._started()
        names, addresses = list(self.names), list(table.groups)
        replies = await asyncio.gather(*(grpc_call(a, "Stats", expert_pb2.StatsRequest(),
                                                   self.config.health_timeout_s, self.credentials) for a in addresses),
                                       return_exceptions=True)
        now = time.time()
        for name, reply in zip(names, replies):
            if isinstance(reply, BaseException):
                continue  # a group that does not answer adds nothing; check_groups repairs it
            tokens = {(s.slot.layer, s.slot.expert): s.tokens for s in reply.slots}
            last_tokens, last_busy, last_calls = self._last_stats.get(name, ({}, 0.0, 0))
            if reply.busy_s < last_busy or reply.forward_calls < last_calls:  # restarted: counters from zero
                last_tokens, last_busy, last_calls = {}, 0.0, 0
            delta = {slot: n - last_tokens.get(slot, 0) for slot, n in tokens.items() if n > last_tokens.get(slot, 0)}
            self._last_stats[name] = (tokens, reply.busy_s, reply.forward_calls)
            await asyncio.to_thread(self.telemetry.record_group, name, delta, reply.busy_s - last_busy,
                                    reply.forward_calls - last_calls, reply.queue_depth, now)

    async def autoscale_once(self) -> Decision:
        """One observe -> decide -> apply round (the loop calls it; tests may too)."""
        async with self._lock:
            table = self._started()
            if not table.groups:  # every group lost (logged when it happened): nothing to observe or plan
                self.last_decision = Decision("hold", "no expert group left")
                return self.last_decision
            await asyncio.to_thread(self._ensure_published, self._published)
            obs = await asyncio.to_thread(self.autoscaler.observe, table, list(self.names))
            self._last_obs = obs
            self._export(obs, table)
            self.paused = await asyncio.to_thread(self.state.paused)
            await self._finish_retiring()
            if not self.config.autoscaler.enabled:
                decision = Decision("hold", "autoscaler disabled (autoscaler.enabled: false)")
            elif self.paused:
                decision = Decision("hold", "paused (moectl autoscaler resume)")
            elif self._adding is not None:
                decision = Decision("hold", "a new group is starting")
            else:
                # planning can take a second or more on a big model: off the actor's event loop
                decision = await asyncio.to_thread(self.autoscaler.decide, obs, table)
            self.last_decision = decision
            if decision.action == REBALANCE:
                await self._rebalance(decision.placement, decision.reason)
            elif decision.action == REMOVE_GROUP:
                await self._remove_last_group(decision)
            elif decision.action == ADD_GROUP:
                self.autoscaler.changed()
                self._adding = asyncio.get_running_loop().create_task(self._add_group(decision.reason))
            await asyncio.to_thread(self.state.put_autoscaler_status, self.status())
            return decision

    def _ensure_published(self, table: PlacementTable) -> None:
        """A Redis that restarted empty (no persistence) forgot the placement: publish it again,
        so new routers and `moectl` find it. Running routers kept serving on theirs meanwhile."""
        if self.state.placement_version() < table.version:
            for i, name in enumerate(self.names[:len(table.groups)]):
                self.state.register_group(name, table.groups[i], table.slots_of(i))
            self.state.publish_placement(table)
            log.warning("controller %s: Redis had lost placement v%d; published it again", self.config.name,
                        table.version)

    def status(self) -> dict:
        """What the autoscaler did last, for `moectl` and the router's Status (JSON-able, no secrets)."""
        obs, d = self._last_obs, self.last_decision
        return {"version": self._published.version if self._published else 0, "groups": len(self.names),
                "enabled": self.config.autoscaler.enabled, "paused": self.paused,
                "imbalance": obs.imbalance if obs else None, "pairs_per_s": float(obs.loads.sum()) if obs else None,
                "utilization": obs.utilization if obs else {},
                "decision": {"action": d.action, "reason": d.reason} if d else None,
                "last_rebalance": self.last_rebalance, "metrics": self.metrics_address,
                "updated_at": time.time()}

    def _export(self, obs: Observation, table: PlacementTable) -> None:
        m, counts = self.metrics, obs.current.replica_counts()
        m.imbalance.set(obs.imbalance)
        m.groups.set(len(table.groups))
        m.placement_version.set(table.version)
        m.replicas.set(int(counts.sum()))
        m.replicated.set(int((counts > 1).sum()))
        for name, u in obs.utilization.items():
            m.utilization.labels(name).set(u)
        for l, layer in enumerate(self.spec.sparse_layers):
            m.layer_max_load.labels(str(layer)).set(float(obs.loads[l].max()) if obs.loads.size else 0.0)
            if m.per_expert:
                for e in range(self.spec.num_experts):
                    m.expert_load.labels(str(layer), str(e)).set(float(obs.loads[l, e]))
                    m.expert_replicas.labels(str(layer), str(e)).set(int(counts[l, e]))

    async def _rebalance(self, placement, reason: str, groups=None, keep: int | None = None) -> RebalanceResult:
        """Apply a planner placement (call with self._lock held)."""
        old = self._table
        new = PlacementTable.from_placement(placement, self.spec, groups or old.groups, old.version + 1)
        self.metrics.rebalances.labels("started").inc()
        result = await self.rebalancer.apply(old, new, self._held, reason, keep)
        self.metrics.rebalances.labels(result.result).inc()
        self.metrics.rebalance_seconds.observe(result.seconds)
        self.metrics.weights_moved.inc(result.weights_loaded)
        self.metrics.weight_bytes_moved.inc(result.weights_loaded * self._expert_bytes())
        if placement is not None and placement.expected_imbalance == placement.expected_imbalance:  # not NaN
            self.metrics.planned_imbalance.set(placement.expected_imbalance)
        if result.result != "failed":
            self._table = self._published = new
            for i in range(min(len(self.names), len(new.groups))):
                self.state.register_group(self.names[i], new.groups[i], new.slots_of(i))
        self.autoscaler.changed()  # a failure cools down too: no retry storm
        self.last_rebalance = result.as_dict()
        return result

    def _loads(self) -> np.ndarray:
        """Load [L, E] of the last observation (zeros before the first)."""
        if self._last_obs is not None:
            return self._last_obs.loads
        return np.zeros((len(self.spec.sparse_layers), self.spec.num_experts))

    def _current_placement(self):
        """The planner's view of the table, with the slots per group its group count gets."""
        return self._table.to_placement(self.spec, self.autoscaler.slots_per_group(len(self._table.groups)))

    def _expert_bytes(self) -> int:
        spec = self.spec
        itemsize = 4 if (self.config.group_dtype in (None, "float32") and not self._num_gpus()) else 2
        return 3 * spec.hidden_size * spec.moe_intermediate_size * itemsize

    async def _add_group(self, reason: str) -> None:
        """Scale up: start one more group (outside the lock: waiting for a GPU node may take
        minutes), then rebalance onto it."""
        cfg = self.config
        name = f"{cfg.name}-group-{self._next_name}"  # never a name in use: lost groups leave gaps in the ids
        self._next_name += 1
        num_gpus = self._num_gpus()
        actor = None
        try:
            try:
                if num_gpus:
                    _request_gpus(len(self.names) + 1)  # lets the Ray/KubeRay autoscaler add a node ahead of time
                actor = self._create_group(name, [], num_gpus)
                log.info("controller %s: adding group %s (%s)", cfg.name, name, reason)
                address = await asyncio.wait_for(actor.start.remote(), cfg.group_start_timeout_s)
            except Exception as e:
                log.error("controller %s: could not add group %s: %s", cfg.name, name, e)
                self.metrics.group_changes.labels("up_failed").inc()
                if actor is not None:  # started too slowly or failed: it must not hold a GPU request
                    await self._kill([(name, actor, None)])
                return
            async with self._lock:
                self.names.append(name)
                self._actors.append(actor)
                self._held.append(set())
                old = self._table
                widened = PlacementTable(old.version, old.groups + (address,), old.replicas, old.shares)
                current = widened.to_placement(self.spec, self.autoscaler.slots_per_group(len(old.groups)))
                placement = await asyncio.to_thread(self.autoscaler.plan, self._loads(), current, len(widened.groups))
                self._table = widened  # not published: rebalance publishes v+1 with the new group in it
                result = await self._rebalance(placement, f"scale up: {reason}", groups=widened.groups)
                if result.result == "failed":  # (a success registered the new group with its slots)
                    self._table = old
                    self.names.pop(), self._actors.pop(), self._held.pop()
                    await self._kill([(name, actor, address)])
                    self.metrics.group_changes.labels("up_failed").inc()
                else:
                    self.metrics.group_changes.labels("up").inc()
        except Exception:  # never silent: the task's exception would otherwise go unread
            log.exception("controller %s: adding group %s failed", cfg.name, name)
            self.metrics.group_changes.labels("up_failed").inc()
        finally:
            self._adding = None

    async def _remove_last_group(self, decision: Decision) -> None:
        """Scale down: move the last group's replicas to the others, then stop it once drained."""
        old = self._table
        keep = len(old.groups) - 1
        result = await self._rebalance(decision.placement, f"scale down: {decision.reason}", groups=old.groups[:keep],
                                       keep=keep)
        if result.result == "failed":
            return
        name, actor, address = self.names.pop(), self._actors.pop(), old.groups[keep]
        self._held.pop()
        self._retiring.append((name, actor, address, self._table.version))
        self.metrics.group_changes.labels("down").inc()
        await self._finish_retiring()

    async def _finish_retiring(self) -> None:
        """Kill removed groups once no router routes by a placement that still named them."""
        if not self._retiring:
            return
        routers = await asyncio.to_thread(self.telemetry.routers)
        oldest = min((r["version"] for r in routers.values()), default=None)
        done = [g for g in self._retiring if oldest is None or oldest >= g[3]]
        if done:
            await self._kill([(name, actor, address) for name, actor, address, _ in done])
            self._retiring = [g for g in self._retiring if g not in done]

    async def _serve_requests(self) -> None:
        """Manual changes queued by `moectl scale` (served even while the autoscaler is paused)."""
        for request in await asyncio.to_thread(self.state.pop_requests):
            try:
                if request.get("kind") != "scale":
                    raise ControllerError(f"unknown request kind {request.get('kind')!r}")
                result = await self.scale(int(request["layer"]), int(request["expert"]), int(request["replicas"]))
                outcome = {"ok": result["result"] != "failed", **result}
            except (ControllerError, KeyError, ValueError, TypeError) as e:
                outcome = {"ok": False, "error": str(e)}
            await asyncio.to_thread(self.state.put_result, request["id"], outcome)

    async def scale(self, layer: int, expert: int, replicas: int) -> dict:
        """Give (layer, expert) exactly `replicas` replicas: new ones on the groups with the least
        load that have room, removed ones from the busiest; shares even. Returns the rebalance."""
        async with self._lock:
            table, spec = self._started(), self.spec
            G = len(table.groups)
            if layer not in spec.sparse_layers:
                raise ControllerError(f"layer {layer} is not an MoE layer (sparse layers: {list(spec.sparse_layers)})")
            if not 0 <= expert < spec.num_experts:
                raise ControllerError(f"expert must be in [0, {spec.num_experts - 1}], got {expert}")
            if not 1 <= replicas <= G:
                raise ControllerError(f"replicas must be in [1, {G}] (one per group at most), got {replicas}")
            S = self.autoscaler.slots_per_group(G)
            placement = table.to_placement(spec, S)
            l = list(spec.sparse_layers).index(layer)
            loads = self._loads()
            group_load = placement.group_loads(loads)[l]
            slots, shares = placement.slots.copy(), placement.shares.copy()
            holders = [g for g in range(G) if (slots[l, g] == expert).any()]
            if replicas > len(holders):
                room = [g for g in range(G) if g not in holders and (slots[l, g] < 0).any()]
                if len(room) < replicas - len(holders):
                    raise ControllerError(f"only {len(holders) + len(room)} group(s) have room for expert {expert} "
                                          f"of layer {layer} ({S} slots per layer per group)")
                for g in sorted(room, key=lambda g: (group_load[g], g))[:replicas - len(holders)]:
                    slots[l, g, int(np.argmax(slots[l, g] < 0))] = expert
            else:
                for g in sorted(holders, key=lambda g: (-group_load[g], g))[:len(holders) - replicas]:
                    slots[l, g][slots[l, g] == expert] = -1
            mine = slots[l] == expert
            shares[l][mine] = 1.0 / replicas
            shares[l][slots[l] < 0] = 0.0
            new = Placement(slots=slots, shares=shares, weight_loads=max(0, replicas - len(holders)),
                            expected_imbalance=float("nan"))
            if replicas == len(holders):
                return {"result": "unchanged", "version": table.version}
            result = await self._rebalance(new, f"moectl scale --layer {layer} --expert {expert} "
                                                f"--replicas {replicas}")
            return result.as_dict()

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
        groups += [(name, actor, address) for name, actor, address, _ in self._retiring]
        await self._kill(groups)
        self._actors, self._held, self._retiring = [], [], []
        self.names = [f"{self.config.name}-group-{i}" for i in range(self.config.num_groups)]
        self._next_name = self.config.num_groups

    async def _kill(self, groups: list[tuple[str, object, str | None]]) -> None:
        for name, actor, _ in groups:
            ray.kill(actor, no_restart=True)
            self.state.unregister_group(name)
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


# An async actor: control calls only, and they wait on groups, so several may be in flight
# (groups() while check_groups() restarts one); self._lock serialises the ones that mutate.
# max_task_retries=0: start()/check_groups() have side effects Ray must not replay.
ControllerActor = ray.remote(num_cpus=0, max_concurrency=16, max_task_retries=0)(Controller)
