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
publishing a placement version above the one left in Redis. The controller's modules
are the only ones in cluster/control that call Ray; the state store and the planner
stay plain Python.

One class, Controller, in parts by concern; each part is a mixin in its own module and
works on the state Controller.__init__ sets and documents below:

    controller_lifecycle.py  start(), placement(), groups(), shutdown()
    controller_repair.py     check_groups(), refresh_group(): restart stopped groups, drop lost ones
    controller_scaling.py    the control loop, autoscale_once(), status(), rebalances, groups added/removed
    controller_requests.py   scale() and the `moectl scale` requests
    controller_config.py     ControllerConfig
    controller_errors.py     ControllerError, GroupNotReadyError

Mixins rather than collaborator objects: every part reads and changes the same table,
group lists and lock, in one order under self._lock; one object keeps that order visible.
"""
from __future__ import annotations

import asyncio

import ray

from cluster.control.autoscaler import Autoscaler, Decision, Observation
from cluster.control.controller_config import ControllerConfig
from cluster.control.controller_errors import ControllerError, GroupNotReadyError
from cluster.control.controller_lifecycle import NOT_SERVING, SERVING, GroupLifecycle
from cluster.control.controller_repair import GroupRepair
from cluster.control.controller_requests import ManualRequests
from cluster.control.controller_scaling import Scaling
from cluster.control.gpu_requests import GpuRequests
from cluster.control.rebalance import Rebalancer
from cluster.control.retiring import Retiring
from cluster.placement.table import PlacementTable
from cluster.state.metrics import AutoscalerMetrics
from cluster.state.store import ClusterState
from cluster.state.telemetry import Telemetry

# What callers import from here (tests, cluster/deploy, cluster/bench), wherever it is defined.
__all__ = ["Controller", "ControllerActor", "ControllerConfig", "ControllerError", "GroupNotReadyError", "SERVING",
           "NOT_SERVING"]


class Controller(GroupLifecycle, GroupRepair, Scaling, ManualRequests):
    """The plain class; ControllerActor is the Ray actor. Every public method is a control call."""

    def __init__(self, config: ControllerConfig | dict):
        # All the state every part (mixin) reads and writes; the parts set nothing of their own.
        self.config = config if isinstance(config, ControllerConfig) else ControllerConfig.from_dict(config)
        # Resolved here, in the controller's process: $ELASTICMOE_REDIS_URL and {ray_cluster} come from the
        # node the controller runs on (controller_config.py). config keeps what it was given, so a later
        # build compares like with like (cluster/deploy/serve_app.py).
        self.redis_url, self.redis_namespace = self.config.redis_target()
        # Synchronous redis-py calls on the actor's event loop: a few small writes per control call,
        # bounded by state.SOCKET_TIMEOUT_S; never on a router's hot path.
        self.credentials = self.config.expert_credentials()  # per cluster; groups and routers get their share
        self.state = ClusterState(self.redis_url, self.redis_namespace,
                                  self.credentials.placement_signing_key)  # signs every placement it publishes
        # names, _actors and _held are parallel lists indexed by group id (the table's group order):
        # whatever adds, drops or reorders a group changes all three together.
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
        a = self.config.autoscaler
        self.rebalancer = Rebalancer(self.state, self.telemetry, a.load_timeout_s, a.drain_timeout_s,
                                     credentials=self.credentials)
        self.metrics = AutoscalerMetrics(a.metrics_per_expert)
        self.spec = None  # read from the checkpoint by start()
        self.autoscaler: Autoscaler | None = None  # built by start() from the spec
        self.metrics_address: str | None = None  # the autoscaler's /metrics, served from start() to shutdown()
        self._metrics_server = None
        self._loop_task: asyncio.Task | None = None  # the control loop (controller_scaling.py), from start()
        self._adding: asyncio.Task | None = None  # a group being started for a scale-up
        self._retiring: list[Retiring] = []  # groups removed by a scale-down, alive until no router uses them
        self._answering: set[str] | None = None  # group addresses that answered Stats in the last round
        self.gpu_requests = GpuRequests(on_change=self.metrics.gpu_request_bundles.set)  # gpu_requests.py
        self._last_stats: dict[str, tuple[dict, float, tuple]] = {}  # group -> Stats counters last seen
        self._last_obs: Observation | None = None  # the last autoscaler round's, with its decision: for status()
        self.last_decision: Decision | None = None
        self.last_rebalance: dict | None = None
        self.paused = False  # `moectl autoscaler pause` (a flag in Redis), as of the last round


# An async actor: control calls only, and they wait on groups, so several may be in flight
# (groups() while check_groups() restarts one); self._lock serialises the ones that mutate.
# max_task_retries=0: start()/check_groups() have side effects Ray must not replay.
ControllerActor = ray.remote(num_cpus=0, max_concurrency=16, max_task_retries=0)(Controller)
