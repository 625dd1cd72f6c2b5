"""`moectl serve`: bring the whole cluster up in the foreground, tear it down on Ctrl-C.

    redis (embedded unless --redis-url) -> Ray (join --address, or start a local one)
    -> controller actor -> expert groups (loaded, serving) -> placement v1 in Redis
    -> Serve gRPC ingress on --port -> RouterDeployment -> wait for Ctrl-C
    -> Serve down, groups and controller killed, redis stopped
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

log = logging.getLogger(__name__)

RAY_NAMESPACE = "elasticmoe"
CHECK_GROUPS_S = 2.0  # how often the foreground process asks the controller to check its groups


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="Hugging Face MoE checkpoint directory")
    p.add_argument("--groups", type=int, default=2, help="expert groups to start (default 2)")
    p.add_argument("--port", type=int, default=9000, help="client gRPC port (default 9000)")
    p.add_argument("--redis-url", default=None,
                   help="shared state; default: a private redis-server on a free local port, stopped on exit")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="router (dense part) dtype; groups use bf16 on GPU, fp32 on CPU")


def run(args) -> int:
    if args.groups < 1:
        raise ValueError(f"--groups must be >= 1, got {args.groups}")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    from cluster.checkpoint import Checkpoint

    Checkpoint(args.checkpoint)  # fail in one line on a bad checkpoint, before starting anything

    import ray
    from ray import serve

    from cluster.controller import ControllerActor, ControllerConfig
    from cluster.redis_server import EmbeddedRedis, free_port
    from router_service.deployment import GRPC_SERVICER_FUNCTIONS, build_app

    redis = None if args.redis_url else EmbeddedRedis()
    redis_url = args.redis_url or redis.url
    controller = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # A named namespace: the detached controller is then reachable by name from other drivers.
        ray.init(address=args.address, namespace=RAY_NAMESPACE, include_dashboard=False, log_to_driver=False)
        config = ControllerConfig(checkpoint=str(args.checkpoint), num_groups=args.groups, redis_url=redis_url)
        # Detached and named, so routers and `moectl` on other nodes can find it; this process owns it
        # all the same and kills it on exit (below).
        controller = ControllerActor.options(name=config.name, lifetime="detached").remote(config)
        print(f"starting {args.groups} expert group(s) on {args.checkpoint} ...", file=sys.stderr, flush=True)
        summary = ray.get(controller.start.remote())
        for g in summary["groups"]:
            print(f"  {g['name']}: {g['address']} ({g['slots']} experts)", file=sys.stderr)
        placement = ray.get(controller.placement.remote())
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()},  # HTTP unused: clients speak gRPC
                    grpc_options={"port": args.port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        serve.run(build_app({"checkpoint": str(args.checkpoint), "placement": placement, "dtype": args.dtype,
                              "redis_url": redis_url}),
                  name="moe")
        print(f"serving elasticmoe.v1.MoEService on port {args.port}; Ctrl-C stops\n"
              f"  try: moectl generate --address 127.0.0.1:{args.port} \"Mixture-of-Experts\"", flush=True)
        while not stop.wait(CHECK_GROUPS_S):  # groups Ray restarted come back on new ports: re-publish them
            try:
                result = ray.get(controller.check_groups.remote(), timeout=120)
                if result.get("refreshed") or result.get("failed"):
                    log.warning("group check: %s", result)
            except Exception:
                log.exception("group check failed; will retry in %.0f s", CHECK_GROUPS_S)
        print("shutting down ...", file=sys.stderr, flush=True)
        return 0
    finally:
        _shutdown(controller, redis)


def _shutdown(controller, redis) -> None:
    """Serve, groups, controller, Ray, redis, in that order; each step logged, none skipped on error."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        except Exception:
            log.exception("serve shutdown failed")
        if controller is not None:
            try:
                ray.get(controller.shutdown.remote(), timeout=60)
            except Exception:
                log.exception("controller shutdown failed; killing it")
            ray.kill(controller)
        ray.shutdown()
    if redis is not None:
        redis.stop()
