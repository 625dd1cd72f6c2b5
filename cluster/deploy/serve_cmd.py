"""`moectl serve`: bring the whole cluster up in the foreground, tear it down on Ctrl-C.

    redis (embedded unless --redis-url) -> Ray (join --address, or start a local one)
    -> controller actor -> expert groups (loaded, serving) -> placement v1 in Redis
    -> Serve gRPC ingress on --port, HTTP (OpenAI-compatible) on --http-port -> RouterDeployment
    -> wait for Ctrl-C
    -> Serve down, groups and controller killed, redis stopped

The controller repairs groups and runs the autoscaler on its own loop; this process
only waits. While it runs, SERVE_FILE (cluster/deploy/connect.py) tells
`moectl placement/scale/autoscaler` where Redis is.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import threading

from cluster.deploy.connect import remove_serve_file, write_serve_file

log = logging.getLogger(__name__)

RAY_NAMESPACE = "elasticmoe"


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="Hugging Face MoE checkpoint directory")
    p.add_argument("--groups", type=int, default=2, help="expert groups to start (default 2)")
    p.add_argument("--port", type=int, default=9000, help="client gRPC port (default 9000)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API port (default 8000; 0 = off: Serve's HTTP proxy then listens on "
                        "a free loopback port)")
    p.add_argument("--http-host", default="0.0.0.0",
                   help="address the HTTP API binds (default 0.0.0.0, every interface, like the gRPC port)")
    p.add_argument("--served-model-name", default=None,
                   help="the `model` clients of the HTTP API name (default: the checkpoint folder's name)")
    p.add_argument("--redis-url", default=None,
                   help="shared state; default: a private redis-server on a free local port, stopped on exit")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="the model dtype of groups and router alike (default: bfloat16 with GPUs, else float32)")
    p.add_argument("--autoscaler", action="append", default=[], metavar="KEY=VALUE",
                   help="an AutoscalerConfig setting (cluster/control/autoscaler_config.py), repeatable: e.g. "
                        "--autoscaler max_groups=4 --autoscaler cooldown_s=10 --autoscaler enabled=false")
    p.add_argument("--group-threads", type=int, default=None,
                   help="torch threads per expert group on CPU (default: torch's own, every core)")
    p.add_argument("--metrics-port", type=int, default=9100,
                   help="router Prometheus port (default 9100; the autoscaler's is autoscaler.metrics_port, 9101)")
    p.add_argument("--api-tokens-file", default=None, metavar="PATH",
                   help="client-API bearer tokens, one a line, '#' comments; $ELASTICMOE_API_TOKENS "
                        "(comma-separated) adds more. Either turns authentication on (health checks stay open)")


def parse_settings(pairs: list[str]) -> dict:
    """["max_groups=4", "enabled=false"] -> {"max_groups": 4, "enabled": False}; values are JSON, else strings."""
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"a setting is KEY=VALUE (--autoscaler, --router), got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def api_token_digests(tokens_file: str | None, environ=None) -> list[str]:
    """SHA-256 digests of the client-API tokens from --api-tokens-file and $ELASTICMOE_API_TOKENS.

    The router replicas get these digests, never the tokens: nothing secret enters Ray's
    deployment config, its logs or its dashboard. [] means authentication off.
    """
    from router_service.serving.auth import TOKENS_ENV, TokenSourceError, digest, read_tokens

    if tokens_file is not None and not tokens_file.strip():  # never read as "no file": that would mean no auth
        raise TokenSourceError("--api-tokens-file is empty: give the path of a token file, or leave the flag out")
    tokens = read_tokens(tokens_file, TOKENS_ENV, os.environ if environ is None else environ)
    if tokens_file and not tokens:
        raise TokenSourceError(f"--api-tokens-file {tokens_file} holds no token (only blanks and comments)")
    return sorted({digest(t) for t in tokens})


def run(args) -> int:
    if args.groups < 1:
        raise ValueError(f"--groups must be >= 1, got {args.groups}")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    if not 0 <= args.http_port <= 65535 or args.http_port == args.port:
        raise ValueError(f"--http-port must be in [0, 65535] (0 = off) and not --port, got {args.http_port}")
    from cluster.checkpoint.reader import Checkpoint

    spec = Checkpoint(args.checkpoint).spec  # fail in one line on a bad checkpoint, before starting anything
    from cluster.control.autoscaler_config import AutoscalerConfig

    autoscaler = AutoscalerConfig.from_dict(parse_settings(args.autoscaler))  # bad settings fail here, in one line
    from router_service.serving.auth import TOKENS_ENV, TokenAuth

    digests = api_token_digests(args.api_tokens_file)  # a bad token file fails here, in one line
    auth = TokenAuth(digests) if digests else None
    # The local Ray started below (raylet, workers) inherits this environment: keep the raw tokens out of it.
    os.environ.pop(TOKENS_ENV, None)
    # Without tokens the router serves unauthenticated by explicit choice (printed below), never by default.
    router_settings = {"metrics_port": args.metrics_port, "served_model_name": args.served_model_name,
                       **({"api_token_sha256": digests} if digests else {"allow_unauthenticated": True})}

    import ray
    from ray import serve

    from cluster.control.controller import ControllerActor, ControllerConfig
    from cluster.state.redis_server import EmbeddedRedis, free_port
    from router_service.serving.api import max_request_bytes
    from router_service.serving.deployment import GRPC_SERVICER_FUNCTIONS, build_app, limit_client_messages

    # The private Redis gets a password of its own: any local user could otherwise rewrite the placement
    # or the heartbeats. It reaches Ray inside redis_url and `moectl` through the 0600 SERVE_FILE.
    redis = None if args.redis_url else EmbeddedRedis(password=secrets.token_urlsafe(24))
    redis_url = args.redis_url or redis.url
    controller = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # A named namespace: the detached controller is then reachable by name from other drivers.
        # the largest legal request of this model: inherited by the Ray we start (with --address, that cluster's
        # own setting holds)
        limit_client_messages(limit_bytes=max_request_bytes(spec))
        # "local": a Ray of our own even when another runs on this machine (ray.init(None) would join it)
        ray.init(address=args.address or "local", namespace=RAY_NAMESPACE, include_dashboard=False,
                 log_to_driver=False)
        config = ControllerConfig(checkpoint=str(args.checkpoint), num_groups=args.groups, redis_url=redis_url,
                                  autoscaler=autoscaler, group_cpu_threads=args.group_threads, dtype=args.dtype)
        # Detached and named, so routers and `moectl` on other nodes can find it; this process owns it
        # all the same and kills it on exit (below).
        controller = ControllerActor.options(name=config.name, lifetime="detached").remote(config)
        print(f"starting {args.groups} expert group(s) on {args.checkpoint} ...", file=sys.stderr, flush=True)
        summary = ray.get(controller.start.remote())
        for g in summary["groups"]:
            print(f"  {g['name']}: {g['address']} ({g['slots']} experts)", file=sys.stderr)
        placement = ray.get(controller.placement.remote())
        http = ({"host": args.http_host, "port": args.http_port} if args.http_port
                else {"host": "127.0.0.1", "port": free_port()})  # off: nothing listens beyond loopback
        serve.start(http_options=http,
                    grpc_options={"port": args.port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        credentials = ray.get(controller.router_credentials.remote())
        router_settings["dtype"] = ray.get(controller.model_dtype.remote())  # the cluster's, set once
        serve.run(build_app({**router_settings, "checkpoint": str(args.checkpoint), "placement": placement,
                              "redis_url": redis_url}, credentials),
                  name="moe")
        write_serve_file(redis_url, args.port)
        auth_line = (f"bearer token required ({len(auth)} token(s), fingerprint {auth.fingerprint}), health checks "
                     f"open" if auth else "OFF, allow_unauthenticated: anyone who reaches the port may call it "
                     "(give --api-tokens-file or $ELASTICMOE_API_TOKENS)")
        print(f"client API authentication: {auth_line}; gRPC and HTTP are plaintext: for other hosts put a TLS proxy "
              f"in front (README, Security)", file=sys.stderr)
        if args.http_port:
            from router_service.serving.router_config import served_model

            model = served_model(str(args.checkpoint), args.served_model_name)
            print(f"OpenAI-compatible HTTP API on http://{args.http_host}:{args.http_port}/v1 (model {model!r}); "
                  f"try: curl http://127.0.0.1:{args.http_port}/v1/completions -H 'content-type: application/json' "
                  f"-d '{{\"model\": \"{model}\", \"prompt\": \"Mixture\", \"max_tokens\": 8}}'",
                  file=sys.stderr)
        print(f"serving elasticmoe.v1.MoEService on port {args.port}; Ctrl-C stops\n"
              f"  try: moectl generate --address 127.0.0.1:{args.port} \"Mixture-of-Experts\"\n"
              f"       moectl placement show    (autoscaler: {'on' if autoscaler.enabled else 'off'}; groups: "
              + (f"{autoscaler.min_groups}..{autoscaler.max_groups})" if autoscaler.max_groups is not None
                 else f"{args.groups}, fixed)"), flush=True)
        while not stop.wait(1.0):  # the controller's own loop repairs groups and autoscales
            pass
        print("shutting down ...", file=sys.stderr, flush=True)
        return 0
    finally:
        remove_serve_file()
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
