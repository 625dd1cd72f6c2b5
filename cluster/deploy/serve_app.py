"""The Serve application builder behind serveConfigV2 (`import_path: cluster.deploy.serve_app:app_builder`).

    serveConfigV2 args --AppArgs.from_dict--> typed args (unknown keys refused, by name)
      -> redis_url: args, else $ELASTICMOE_REDIS_URL (from a Secret on Kubernetes)
      -> redis_namespace: "{ray_cluster}" replaced by $ELASTICMOE_RAY_CLUSTER
      -> find_or_create_controller(): the detached named ControllerActor of this Ray cluster
      -> controller.start() (idempotent: starts the groups once) -> controller.placement() (JSON)
      -> router_service.serving.deployment.build_app(router config + placement + redis_url)

Ray Serve runs the builder in a task (`build_serve_application`), again on every
in-place serveConfigV2 update and up to 3 more times when it raises. Hence find-or-create:
the first run creates the controller and its expert groups, every later run finds the
same controller and only rebuilds the router application. Controller and autoscaler
settings therefore apply when the controller is created; a run that asks for different
ones logs which keys differ and keeps the running controller (a new RayCluster, i.e. a
KubeRay blue/green upgrade, or `ray.kill` of the controller, applies them).

Serve logs the args of every build ("Importing application ... with arguments ..."), so
a Redis password belongs in $ELASTICMOE_REDIS_URL, not in `redis_url`. Serve runs the
builder task on the nodes the deployments' shared `label_selector` names (Ray 2.60,
`_get_shared_build_app_label_selector`): on Kubernetes the router pods, which alone
carry that variable.

Why "{ray_cluster}" in the Redis namespace: during a blue/green upgrade two Ray clusters
share one Redis; each must own its placement keys, or the two controllers would publish
over each other's tables and the old routers would follow the new cluster's groups.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

from cluster.config import config_from_dict

log = logging.getLogger(__name__)

RAY_NAMESPACE = "elasticmoe"  # the Ray namespace of the controller (moectl serve uses the same)
REDIS_URL_ENV = "ELASTICMOE_REDIS_URL"
RAY_CLUSTER_ENV = "ELASTICMOE_RAY_CLUSTER"
RAY_CLUSTER_FIELD = "{ray_cluster}"
# Set from the top-level args, so the controller and the routers cannot disagree on them.
CONTROLLER_OWN_KEYS = ("checkpoint", "num_groups", "redis_url", "redis_namespace")
ROUTER_OWN_KEYS = ("checkpoint", "placement", "redis_url", "redis_namespace")
START_MARGIN_S = 120.0  # on top of group_start_timeout_s: creating the controller, publishing


class AppArgsError(ValueError):
    """serveConfigV2 args that cannot deploy; the message names the key and how to fix it."""


@dataclass
class AppArgs:
    checkpoint: str  # checkpoint directory, mounted at this path on every router and expert pod
    num_groups: int  # expert groups the controller starts with
    redis_url: str | None = None  # None: $ELASTICMOE_REDIS_URL (keep passwords out of serveConfigV2)
    redis_namespace: str = "elasticmoe"  # Redis key prefix; "{ray_cluster}" -> $ELASTICMOE_RAY_CLUSTER
    controller: dict = field(default_factory=dict)  # more ControllerConfig keys, incl. autoscaler: {...}
    router: dict = field(default_factory=dict)  # more RouterConfig keys (dtype, max_running, metrics_port, ...)
    controller_label_selector: dict = field(default_factory=dict)  # Ray node labels the controller must run on

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise AppArgsError(f"checkpoint must be a non-empty path string, got {self.checkpoint!r}")
        for name in ("controller", "router", "controller_label_selector"):
            if not isinstance(getattr(self, name), dict):
                raise AppArgsError(f"{name} must be a mapping, got {getattr(self, name)!r}")
        for name, own in (("controller", CONTROLLER_OWN_KEYS), ("router", ROUTER_OWN_KEYS)):
            for key in own:
                if key in getattr(self, name):
                    raise AppArgsError(f"{name}.{key} is set from the top-level args (or by the builder); "
                                       f"remove it from {name}")
        if "expert_secret" in self.controller:  # never echo its value
            raise AppArgsError("controller.expert_secret: Serve logs these args, so the cluster secret must not be "
                               "here; put it in an environment variable of the controller's pod (a Secret) and set "
                               "controller.expert_secret_env to its name, or leave both out to have one generated")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.controller_label_selector.items()):
            raise AppArgsError(f"controller_label_selector must map label names to strings, "
                               f"got {self.controller_label_selector!r}")
        # Everything else (num_groups, the nested keys) is validated by the typed configs themselves:
        # controller_config() and router_config() raise with the key's name.

    @classmethod
    def from_dict(cls, d: dict) -> "AppArgs":
        if not isinstance(d, dict):
            raise AppArgsError(f"application args must be a mapping, got {type(d).__name__}")
        try:
            return config_from_dict(cls, d)
        except (TypeError, ValueError) as e:  # a required key missing, an unknown one
            raise AppArgsError(f"application args: {e}") from None

    # ---- resolved, typed configs ----------------------------------------------------------

    def resolve_redis_url(self, environ=os.environ) -> str:
        url = self.redis_url or environ.get(REDIS_URL_ENV)
        if not url:
            raise AppArgsError(f"no Redis URL: set the environment variable {REDIS_URL_ENV} where Serve runs this "
                               f"builder (on Kubernetes: the router pods, from the Redis Secret), or args.redis_url "
                               f"in serveConfigV2 (which Serve logs: no password there)")
        return url

    def resolve_namespace(self, environ=os.environ) -> str:
        ns = self.redis_namespace
        if not isinstance(ns, str):
            raise AppArgsError(f"redis_namespace must be a string, got {ns!r}")
        if RAY_CLUSTER_FIELD in ns:
            cluster = environ.get(RAY_CLUSTER_ENV)
            if not cluster:
                raise AppArgsError(f"redis_namespace {ns!r} uses {RAY_CLUSTER_FIELD} but {RAY_CLUSTER_ENV} is not "
                                   f"set (on Kubernetes: from the pod label ray.io/cluster)")
            ns = ns.replace(RAY_CLUSTER_FIELD, cluster)
        if "{" in ns or "}" in ns:
            raise AppArgsError(f"redis_namespace {self.redis_namespace!r}: the only placeholder is {RAY_CLUSTER_FIELD}")
        return ns

    def controller_config(self, redis_url: str, namespace: str):
        """The ControllerConfig these args ask for (ValueError naming the key when one is wrong)."""
        from cluster.control.controller import ControllerConfig

        try:
            return ControllerConfig.from_dict({**self.controller, "checkpoint": self.checkpoint,
                                               "num_groups": self.num_groups, "redis_url": redis_url,
                                               "redis_namespace": namespace})
        except (TypeError, ValueError) as e:
            raise AppArgsError(f"application args, controller: {e}") from None

    def router_config(self, placement: str, redis_url: str, namespace: str, dtype: str | None = None):
        """The RouterConfig of every router replica (ValueError naming the key when one is wrong); dtype:
        the cluster's (the controller's model_dtype()), which a router setting may repeat but not contradict."""
        from router_service.serving.router_config import RouterConfig

        mine = self.router.get("dtype")
        if dtype is not None and mine is not None and mine != dtype:
            raise AppArgsError(f"application args, router: dtype {mine} but the controller's groups use {dtype}: a "
                               f"cluster has one model dtype; set controller.dtype (or leave router.dtype out)")
        try:
            config = RouterConfig.from_dict({**self.router, "checkpoint": self.checkpoint, "placement": placement,
                                             "redis_url": redis_url, "redis_namespace": namespace,
                                             "dtype": mine or dtype})
            config.check_auth_setting()  # a token source, or allow_unauthenticated by name
            return config
        except (TypeError, ValueError) as e:
            raise AppArgsError(f"application args, router: {e}") from None


def find_or_create_controller(config, label_selector: dict | None = None):
    """The detached named ControllerActor `config.name` in Ray namespace "elasticmoe": found when
    it runs, created from `config` otherwise (two callers racing get the same actor). Needs a
    connected Ray. A found controller keeps the config it was created with; keys that differ
    from `config` are logged by name (values may hold credentials)."""
    import ray

    from cluster.control.controller import ControllerActor

    options = dict(name=config.name, namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True)
    if label_selector:
        options["label_selector"] = dict(label_selector)
    handle = ControllerActor.options(**options).remote(config)
    try:
        running = ray.get(handle.__ray_call__.remote(lambda self: self.config), timeout=60)
    except ray.exceptions.RayError as e:  # a diagnostic only (incl. GetTimeoutError): never fail the deploy over it
        log.warning("controller %s: could not read its config to compare (%s)", config.name, e)
        return handle
    differ = _differing_keys(dataclasses.asdict(running), dataclasses.asdict(config))
    if differ:
        log.warning("controller %s already runs with other settings for %s; keeping it (settings apply when the "
                    "controller is created: a new Ray cluster, or ray.kill it first)", config.name, ", ".join(differ))
    return handle


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(prefix + key)
    return out


def app_builder(args: dict):
    """serveConfigV2 `import_path: cluster.deploy.serve_app:app_builder`: args (AppArgs keys) -> the router
    Application, bound to the placement of the running (or just started) controller."""
    import ray

    from cluster.state.store import redact_url
    from router_service.serving.deployment import build_app

    parsed = AppArgs.from_dict(dict(args))
    redis_url, namespace = parsed.resolve_redis_url(), parsed.resolve_namespace()
    config = parsed.controller_config(redis_url, namespace)  # bad settings fail here, before anything starts
    parsed.router_config(_EMPTY_PLACEMENT, redis_url, namespace)  # and router ones too
    log.info("elasticmoe app: checkpoint %s, %d group(s), redis %s namespace %s, controller %s",
             parsed.checkpoint, parsed.num_groups, redact_url(redis_url), namespace, config.name)
    controller = find_or_create_controller(config, parsed.controller_label_selector)
    summary = ray.get(controller.start.remote(), timeout=config.group_start_timeout_s + START_MARGIN_S)
    placement = ray.get(controller.placement.remote(), timeout=60)
    log.info("elasticmoe app: controller %s serving placement v%d on %d group(s)", config.name, summary["version"],
             len(summary["groups"]))
    credentials = ray.get(controller.router_credentials.remote(), timeout=60)
    dtype = ray.get(controller.model_dtype.remote(), timeout=60)
    router = parsed.router_config(placement, redis_url, namespace, dtype)
    return build_app(dataclasses.asdict(router), credentials)


# Only for validating router keys before a placement exists: from_json parses it, nothing reads it.
_EMPTY_PLACEMENT = '{"version": 0, "groups": [], "replicas": []}'
