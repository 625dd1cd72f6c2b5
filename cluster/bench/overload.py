"""`moectl bench overload`: a burst far beyond what the router can hold, then one more request.

    N Generate calls at once, SDK, no retries --+--> RESOURCE_EXHAUSTED (refused: the bounded queue is full)
                                                +--> tokens to the end   (accepted and completed)
                                                +--> any other error     (accepted but failed: should be 0)
    then one call after the burst: the service recovered

The router holds max_running sequences decoding plus max_queue waiting (RouterConfig,
router_service/engine/scheduler.py); every request beyond that is refused when it arrives, so
a refusal costs one round trip while a completion waits its turn. Reported: the counts,
and latency percentiles of completions and of refusals.

Traffic goes to loopback only: --address names a running service on this machine, or,
without it, this command starts one in-process (local Ray, expert-group actors, the router
behind Serve's gRPC ingress on a free 127.0.0.1 port) with a deliberately small
--max-running / --max-queue, and tears it down after. Bounded: at most MAX_REQUESTS calls,
each within --timeout-s.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import time
from dataclasses import dataclass, field

from cluster.bench.serving_runs import pct

MAX_REQUESTS = 2000


@dataclass
class OverloadReport:
    requests: int
    completed_s: list[float] = field(default_factory=list)  # latency of each accepted call that finished
    refused_s: list[float] = field(default_factory=list)  # latency of each RESOURCE_EXHAUSTED
    failed: dict[str, int] = field(default_factory=dict)  # accepted but failed: status code name -> count
    wall_s: float = 0.0
    recovered: bool = False  # the call after the burst completed
    recovery_s: float = 0.0

    @property
    def refused(self) -> int:
        return len(self.refused_s)

    @property
    def completed(self) -> int:
        return len(self.completed_s)

    @property
    def accepted(self) -> int:
        return self.requests - self.refused

    def lines(self) -> list[str]:
        failed = sum(self.failed.values())
        return [
            f"burst of {self.requests} Generate calls in {self.wall_s:.2f} s: accepted {self.accepted}, "
            f"refused {self.refused} (RESOURCE_EXHAUSTED), completed {self.completed}, failed {failed}"
            + (f" {self.failed}" if failed else ""),
            f"completed latency: {_percentiles(self.completed_s)}",
            f"refused latency:   {_percentiles(self.refused_s)}",
            f"after the burst: {'completed' if self.recovered else 'FAILED'} in {self.recovery_s * 1e3:.0f} ms",
        ]


def _percentiles(values: list[float]) -> str:
    if not values:
        return "none"
    return " ".join(f"{name} {pct(values, q) * 1e3:.0f} ms" for name, q in
                    (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)))


def check_loopback(address: str) -> None:
    """Refuse to aim load at anything but this machine: a load generator is one typo from a DoS."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    try:
        ips = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise ValueError(f"--address {address}: cannot resolve {host!r}") from None
    if not ips or not all(ipaddress.ip_address(ip.split("%")[0]).is_loopback for ip in ips):
        raise ValueError(f"--address {address}: bench overload sends traffic to loopback addresses only "
                         f"(127.0.0.1, ::1, localhost)")


async def burst(address: str, requests: int, prompt: list[int], max_tokens: int, timeout_s: float,
                **client_options) -> OverloadReport:
    """`requests` concurrent Generate calls, then one more; the outcome of each, timed from when it was sent."""
    from router_service.client import AsyncMoEClient, MoEError, ResourceExhausted

    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"--requests must be in [1, {MAX_REQUESTS}], got {requests}")
    report = OverloadReport(requests)
    # No retries: a refusal must be counted, not hidden behind a backoff.
    async with AsyncMoEClient(address, timeout_s=timeout_s, max_attempts=1, **client_options) as client:
        try:
            await client.status()  # connected (and authenticated) before the clock starts
        except MoEError as e:
            raise ValueError(f"{address}: {e.code.name}: {e.details}") from None

        async def one() -> None:
            start = time.perf_counter()
            try:
                await client.generate(prompt, max_tokens=max_tokens)
            except ResourceExhausted:
                report.refused_s.append(time.perf_counter() - start)
            except MoEError as e:
                report.failed[e.code.name] = report.failed.get(e.code.name, 0) + 1
            else:
                report.completed_s.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        report.wall_s = time.perf_counter() - start
        start = time.perf_counter()
        try:
            await client.generate(prompt, max_tokens=max_tokens)
            report.recovered = True
        except MoEError:
            report.recovered = False
        report.recovery_s = time.perf_counter() - start
    return report


@contextlib.contextmanager
def local_service(checkpoint: str, groups: int, router: dict, num_cpus: int | None = None,
                  http_port: int | None = None, group_threads: int | None = None):
    """A whole service in this process on loopback: Ray, `groups` expert-group actors (round-robin
    placement), the router behind Serve's gRPC ingress (and its HTTP one on http_port, else a free
    port). Yields "127.0.0.1:PORT" (gRPC); tears it all down."""
    import ray
    from ray import serve

    from cluster.checkpoint.reader import Checkpoint
    from cluster.placement.table import PlacementTable
    from cluster.state.redis_server import free_port
    from experts.config import ExpertGroupConfig
    from experts.group import ExpertGroupActor
    from router_service.serving.deployment import GRPC_SERVICER_FUNCTIONS, build_app, limit_client_messages

    spec = Checkpoint(checkpoint).spec
    limit_client_messages()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    actors = []
    try:
        table = PlacementTable.round_robin(spec, [f"pending:{g}" for g in range(groups)])
        actors = [ExpertGroupActor.remote(ExpertGroupConfig(str(checkpoint), table.slots_of(g), device="cpu",
                                                            name=f"overload-{g}", cpu_threads=group_threads))
                  for g in range(groups)]
        table = PlacementTable(1, tuple(ray.get([a.start.remote() for a in actors], timeout=300)), table.replicas)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": http_port or free_port()},
                    grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        token_keys = ("api_token_sha256", "api_tokens_file", "api_tokens_env")
        unauthenticated = {} if any(k in router for k in token_keys) else {"allow_unauthenticated": True}  # loopback
        serve.run(build_app({"metrics_port": None, **unauthenticated, **router, "checkpoint": str(checkpoint),
                             "placement": table.to_json()}), name="moe")
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            with contextlib.suppress(Exception):  # best effort on the way out; ray.shutdown follows regardless
                serve.shutdown()
            for a in actors:
                ray.kill(a)
            ray.shutdown()


def add_arguments(p) -> None:
    from cluster.deploy.connect import add_client_arguments

    p.add_argument("--address", default=None,
                   help="a running service on this machine (loopback only); default: start one in-process")
    p.add_argument("--checkpoint", default="checkpoints/demo-small",
                   help="in-process service: checkpoint (default: the demo one)")
    p.add_argument("--groups", type=int, default=2, help="in-process service: expert groups (default 2)")
    p.add_argument("--max-running", type=int, default=4, help="in-process service: sequences decoding (default 4)")
    p.add_argument("--max-queue", type=int, default=4, help="in-process service: waiting requests (default 4)")
    p.add_argument("--requests", type=int, default=None,
                   help=f"calls in the burst (default: 10 x (max-running + max-queue); at most {MAX_REQUESTS})")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per call (default 32)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="deadline of each call (default 300)")
    add_client_arguments(p)


def run(args) -> int:
    from cluster.deploy.connect import client_options

    requests = args.requests or 10 * (args.max_running + args.max_queue)
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"--requests must be in [1, {MAX_REQUESTS}], got {requests}")
    if args.prompt_tokens < 1:
        raise ValueError(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")
    options = client_options(args)
    if args.address:
        check_loopback(args.address)
        prompt = [2 + (7 * i) % 100 for i in range(args.prompt_tokens)]  # ids < 102: valid for any real vocab
        report = asyncio.run(burst(args.address, requests, prompt, args.max_tokens, args.timeout_s, **options))
        print(f"{args.address}: {requests} calls of {args.prompt_tokens} prompt + {args.max_tokens} new tokens")
    else:
        from cluster.checkpoint.reader import Checkpoint

        spec = Checkpoint(args.checkpoint).spec
        rng = random.Random(0)
        prompt = [rng.randrange(2, spec.vocab_size) for _ in range(args.prompt_tokens)]
        router = {"max_running": args.max_running, "max_queue": args.max_queue,
                  "max_step_tokens": max(512, args.max_running)}
        with local_service(args.checkpoint, args.groups, router) as address:
            print(f"{spec.family} {args.checkpoint}, {args.groups} groups, router max_running {args.max_running} "
                  f"max_queue {args.max_queue} (capacity {args.max_running + args.max_queue}); {requests} calls of "
                  f"{args.prompt_tokens} prompt + {args.max_tokens} new tokens")
            report = asyncio.run(burst(address, requests, prompt, args.max_tokens, args.timeout_s, **options))
    for line in report.lines():
        print(line)
    failed = sum(report.failed.values())
    return 0 if report.recovered and not failed else 1
