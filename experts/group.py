"""ExpertGroup: a Ray actor that serves some experts over a plain grpc.aio server.

  controller --ray--> ExpertGroupActor.options(num_gpus=1, max_restarts=N).remote(config)
  controller --ray--> start() -> "host:port"      loads config.slots, opens the server
  routers ---gRPC---> host:port  Forward / Stats
  controller -gRPC--> host:port  LoadExperts / UnloadExperts / Stats

Router traffic bypasses Ray: a grpc.aio server in the actor answers in about 0.37 ms
against about 1.1 ms for a Ray actor call (DESIGN.md). The server lives on the async
actor's event loop, which Ray keeps running between method calls.

Why start() and not __init__: Ray runs an actor's __init__ synchronously, outside its
event loop, and grpc.aio needs that loop; an explicit start() also gives the
controller one call that both brings a group up and tells it where the group is.

Restarts: when Ray restarts a dead actor it runs __init__ again with the same config
and nothing else, so the new process holds no weights and serves nothing until
start() is called; with port 0 it then listens on a new port. The controller
(cluster/control/controller.py) calls start() after creating a group and again
whenever it sees the group's address stop answering, and records the address start()
returns: start() is idempotent and is what a restarted group runs to come back. Death is not
instantaneous: a start() sent just after a kill can still be answered by the dying
process with its old address, so the controller trusts an address only once it
answers, and calls start() again when it does not. Methods with side
effects keep max_task_retries=0 (DESIGN.md), so Ray never replays them on its own.
"""
from __future__ import annotations

import asyncio
import logging
import os

import grpc
import ray
import torch
from elasticmoe.v1 import expert_pb2_grpc

from experts.config import ExpertGroupConfig
from experts.credentials import SecretCheck, add_port
from experts.servicer import ExpertServicer
from experts.wire import MAX_CONCURRENT_RPCS, server_options

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")


async def serve_group(config: ExpertGroupConfig, servicer: ExpertServicer | None = None
                      ) -> tuple[grpc.aio.Server, str]:
    """Load config.slots (unless a servicer is given) and start a grpc.aio server on the
    running event loop: (server, "host:port" it is bound to). Used by ExpertGroup and,
    without Ray, by tests. The caller stops the server."""
    if servicer is None:
        servicer = await ExpertServicer.create(config)
    creds = config.credentials
    if creds is None:
        log.warning("group %s: no cluster secret configured: its expert API is open to anyone who reaches %s",
                    config.name, config.host)
    servicer.secret_check = SecretCheck(creds) if creds else None
    spec = servicer.spec
    server = grpc.aio.server(options=server_options(spec.hidden_size, spec.top_k),
                             maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
                             interceptors=[servicer.secret_check] if creds else None)
    expert_pb2_grpc.add_ExpertServiceServicer_to_server(servicer, server)
    try:
        port = add_port(server, f"{config.host}:{config.port}", creds)
    except RuntimeError as e:  # grpcio raises when it cannot bind
        raise OSError(f"group {config.name}: cannot listen on {config.host}:{config.port} ({e})") from e
    if port == 0:  # older grpcio returns 0 instead of raising
        raise OSError(f"group {config.name}: cannot listen on {config.host}:{config.port}")
    await server.start()
    address = f"{config.host}:{port}"
    log.info("group %s serving %d slot(s) on %s (%s, %s; %s)", config.name, len(servicer.slots), address,
             servicer.device, servicer.dtype, creds if creds else "no credentials")
    return server, address


class ExpertGroup:
    """One expert group. The plain class runs without Ray; ExpertGroupActor is the actor.

    Create with ExpertGroupActor.options(num_gpus=1, ...) when the cluster has GPUs
    (config.device "auto" then resolves to cuda inside the actor); on CPU-only
    clusters leave num_gpus out.
    """

    def __init__(self, config: ExpertGroupConfig | dict):
        self.config = config if isinstance(config, ExpertGroupConfig) else ExpertGroupConfig.from_dict(config)
        if self.config.cpu_affinity is not None:
            _pin(set(self.config.cpu_affinity))
        if self.config.cpu_threads is not None:
            # process-wide: a group actor is its own process. One thread per group makes CPU
            # groups behave like separate devices instead of each spreading over every core.
            torch.set_num_threads(self.config.cpu_threads)
        self._servicer: ExpertServicer | None = None  # kept across stop()/start(): weights stay loaded
        self._server: grpc.aio.Server | None = None
        self._address: str | None = None
        self._start_lock = asyncio.Lock()  # binds to the actor's loop on first use

    async def start(self) -> str:
        """Load the configured slots and serve them; return the address "host:port" routers dial.

        Idempotent: a second call returns the same address. Run on every (re)start of the
        actor; the port differs after a restart when config.port is 0."""
        async with self._start_lock:
            if self._address is None:
                if self._servicer is None:
                    self._servicer = await ExpertServicer.create(self.config)
                self._server, bound = await serve_group(self.config, self._servicer)
                self._address = self._advertised(bound)
            return self._address

    def _advertised(self, bound: str) -> str:
        """A wildcard bind address is not dialable: publish this node's IP instead."""
        host, port = bound.rsplit(":", 1)
        if host in WILDCARD_HOSTS and ray.is_initialized():
            host = ray.util.get_node_ip_address()
        return f"{host}:{port}"

    async def pid(self) -> int:
        """This process's id: what an operator (or a fault test) would `kill -9`."""
        return os.getpid()

    async def inject_fault(self, forward_delay_s: float = 0.0, load_delay_s: float = 0.0) -> None:
        """Fault injection for drills and tests: every Forward (LoadExperts that loads something) first
        waits this long. 0 clears it. Gone after a restart: Ray runs __init__ again."""
        for name, value in (("forward_delay_s", forward_delay_s), ("load_delay_s", load_delay_s)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 600:
                raise ValueError(f"{name} must be a number of seconds in [0, 600], got {value!r}")
        if self._servicer is None:
            raise RuntimeError(f"group {self.config.name} is not started: call start() first")
        self._servicer.forward_delay_s, self._servicer.load_delay_s = float(forward_delay_s), float(load_delay_s)
        log.warning("group %s: fault injected: Forward +%.3f s, LoadExperts +%.3f s", self.config.name,
                    forward_delay_s, load_delay_s)

    async def address(self) -> str | None:
        """The address published by the last start(), or None while not serving."""
        return self._address

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop serving; in-flight calls get grace_s to finish. Weights stay loaded for a later start()."""
        async with self._start_lock:
            if self._server is not None:
                await self._server.stop(grace_s)
                log.info("group %s stopped serving on %s", self.config.name, self._address)
            self._server, self._address = None, None


# An async actor: Ray runs its methods on one event loop, which the grpc.aio server
# shares. Its methods are control calls only (start, address, stop), so a small
# max_concurrency is plenty; Forward traffic never goes through Ray.
ExpertGroupActor = ray.remote(max_concurrency=16, max_task_retries=0)(ExpertGroup)


def _pin(cores: set[int]) -> None:
    """Every thread of this process on `cores` (threads started later inherit it): on Linux, affinity
    is per thread, and Ray and gRPC threads run before the group's own."""
    available = os.sched_getaffinity(0)
    cores = cores & available or available  # a core this machine lacks: stay where we are
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that ended meanwhile
            pass
    log.info("group process pinned to cores %s", sorted(cores))
