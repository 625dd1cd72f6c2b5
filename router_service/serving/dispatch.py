"""The router's remote expert stage: dispatch -> experts (on groups, over gRPC) -> combine.

T = tokens in the step, k = experts per token, H = hidden, E = experts per layer.

  ids [T, k] --placement--> group of every (token, j) pair [T, k]
  for each group g with work, concurrently:
      rows = tokens with a pair on g
      Forward(hidden[rows], ids[rows] with other groups' pairs set to -1, weights[rows])
  combine: out[rows] += partial_g                     -> [T, H]

A group whose Forward fails (dead, or missing an expert after a placement change) is retried on
another replica of each of its experts within the same deadline, and avoided for DOWN_S seconds
(channels.py); an expert with no live replica fails the layer with UNAVAILABLE naming the (layer,
expert) pairs. A group that has not answered after slow_s (RouterConfig.forward_slow_s) is treated
the same way when every pair it was sent has a replica elsewhere: its call is cancelled and the
pairs move. Without another replica the router waits for it, up to the deadline: slow beats failed.

Which group serves each pair (shares, retries on other replicas, avoiding down groups) is
policy in routes.py; this file does the transport: the fan-out, deadlines and failures.

Every call counts the pairs routed per expert and whether it got any (`take_load()`, flushed to Redis).
The engine submits a layer and waits on its result, inside step(); the gRPC calls run on one asyncio
loop in a background thread that owns the channels (channels.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time

import grpc
import torch
from elasticmoe.v1 import expert_pb2

from cluster.checkpoint.spec import ModelSpec
from cluster.placement.table import PlacementTable
from experts.credentials import RouterCredentials
from experts.wire import decode, encode, to_device, to_host
from router_service.serving.channels import GroupChannels
from router_service.serving.routes import Routes, avoid, choose_groups, compile_routes, first_replica

# What another replica would repeat (bad request, no secret, no such API): fail the layer, not group after group.
PERMANENT = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED)


class DispatchError(RuntimeError):
    """A group failed its part of a layer; carries the group's address and the gRPC status. `public` is
    what a client may be told: the experts and the reason, never a group's address (str() has those, for
    the router's log)."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str, public: str | None = None):
        super().__init__(f"expert group {address} failed Forward: {code.name}: {details}")
        self.address, self.code, self.details = address, code, details
        self.public = public or f"an expert group answered Forward with {code.name}; the router's log says why"


class RemoteExperts:
    def __init__(self, spec: ModelSpec, table: PlacementTable, timeout_s: float = 30.0, on_forward=None,
                 credentials: RouterCredentials | None = None, slow_s: float = 2.0, on_stale=None,
                 whole_below: int = 0):
        table.validate(spec)
        self.spec, self.timeout_s, self.slow_s = spec, timeout_s, slow_s
        self.whole_below, self._calls = whole_below, 0  # routes.choose_groups: whole experts, drawn per call
        self.on_forward = on_forward  # (group address, seconds, "ok" | "failed" | "slow") after every Forward: metrics
        self.on_stale = on_stale  # a group says our placement is stale (FAILED_PRECONDITION): refresh it
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="expert-dispatch", daemon=True)
        self._thread.start()
        self._groups = GroupChannels(credentials)  # used on self._loop only
        self._layer_index = {layer: i for i, layer in enumerate(spec.sparse_layers)}
        self._load = torch.zeros(2, len(spec.sparse_layers), spec.num_experts, dtype=torch.int64)  # pairs, calls
        self._load_lock = threading.Lock()
        self._step_version: int | None = None  # the placement of the step in flight; None between steps
        self._step_depth = 0  # step() contexts open (the engine thread's)
        self.set_table(table)

    def set_table(self, table: PlacementTable) -> None:
        """Switch to a new placement at the next step boundary (any thread may call this).

        The new routes are adopted when the next step() begins, so the layers of one step
        never mix two placements; the old replicas stay loaded until drained.
        """
        table.validate(self.spec)
        routes = compile_routes(self.spec, table)
        self._run(self._groups.connect(table.groups))
        self._pending = routes
        if not hasattr(self, "_routes"):
            self._routes = self._pending

    @property
    def table(self) -> PlacementTable:
        """The placement steps use now."""
        return self._routes.table

    @property
    def latest_table(self) -> PlacementTable:
        """The newest placement handed over: what the next step uses. Health and Status go by it,
        so an idle router reports the placement it will serve by, not the one it last used."""
        return self._pending.table

    @property
    def pending_version(self) -> int:
        """The newest placement handed over (in use, or waiting for the next step)."""
        return self._pending.table.version

    @property
    def version_in_use(self) -> int:
        """The oldest placement a step may still use: the in-flight step's, else the pending one.
        Once every router reports a version >= v, nothing routes by an older table any more."""
        step = self._step_version
        return step if step is not None else self.pending_version

    def take_load(self) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], int]]:
        """Since the last call, (layer, expert) -> pairs, and -> calls that sent it any (non-zero only)."""
        with self._load_lock:
            load, self._load = self._load, torch.zeros_like(self._load)
        layers = self.spec.sparse_layers
        return tuple({(layers[i], e): int(load[k, i, e]) for i, e in load[k].nonzero().tolist()} for k in (0, 1))

    async def _close_unused(self) -> None:
        """Channels to groups neither the placement in use nor the next one names are closed."""
        await self._groups.close_unused(set(self._routes.table.groups) | set(self._pending.table.groups))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @contextlib.contextmanager
    def step(self):
        """One engine step: the placement handed over last is adopted here, and every MoE layer of
        every micro-batch of the step uses it (re-entrant: a step inside a step is the same step).
        Explicit, not inferred from the layer: two micro-batches in flight interleave their layers."""
        self._step_depth += 1
        if self._step_depth == 1:
            if self._routes is not self._pending:  # a step boundary with a new placement
                self._routes = self._pending
                self._run(self._close_unused())
            self._step_version = self._routes.table.version
        try:
            yield
        finally:
            self._step_depth -= 1
            if self._step_depth == 0:
                self._step_version = None  # between steps: version_in_use is the pending one

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> "ExpertResult":
        """Send one MoE layer's tokens to the groups and return at once; .result() waits for the
        combined output [T, H] (on x's device). Call inside step().

        On a GPU the three go to the host once (pinned), every group's part is cut from there,
        and the combined output goes back up once: routing tables and payloads live on the host."""
        assert self._step_depth > 0, "RemoteExperts.submit outside step()"
        device = x.device
        x, ids, weights = to_host(x), to_host(ids), to_host(weights)
        routed = torch.bincount(ids.flatten(), minlength=self.spec.num_experts)
        with self._load_lock:
            self._load[:, self._layer_index[layer]] += torch.stack((routed, (routed > 0).long()))
        self._calls += 1  # routes' per-call draw for whole experts
        future = asyncio.run_coroutine_threadsafe(
            self._forward(self._routes, layer, x, ids, weights, self._calls, routed), self._loop)
        return ExpertResult(future, device)

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], ids [T, k], weights [T, k] -> sum of weighted expert outputs [T, H]: submit and wait."""
        with self.step():
            return self.submit(layer, x, ids, weights).result()

    async def _forward(self, routes: Routes, layer, x, ids, weights, call: int, counts) -> torch.Tensor:
        pending = choose_groups(routes, layer, ids, call, self.whole_below, counts)  # [T, k]; -1 = done
        # a group that failed in the last DOWN_S seconds gets no pairs that have another replica,
        # so one dead group does not cost every step a failed call
        pending = avoid(routes, layer, ids, pending,
                        [g for g, a in enumerate(routes.table.groups) if self._groups.down(a)])
        out = torch.zeros_like(x)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        failed: dict[int, DispatchError] = {}  # groups that failed this layer, and how
        while True:
            parts = {}  # task -> (group, rows, mine)
            for g in torch.unique(pending[pending >= 0]).tolist():
                mine = pending == g  # [T, k]
                rows = mine.any(dim=1).nonzero().squeeze(1)  # tokens with at least one pair on g
                sub_ids = torch.where(mine[rows], ids[rows], -1).to(torch.int32)
                request = expert_pb2.ForwardRequest(layer=layer, hidden=encode(x[rows]), expert_ids=encode(sub_ids),
                                                    weights=encode(weights[rows].to(torch.float32)),
                                                    placement_version=routes.table.version)
                call = self._call(routes.table.groups[g], request, max(0.001, deadline - loop.time()))
                parts[asyncio.ensure_future(call)] = (g, rows, mine)
            retry = torch.full_like(pending, -1)
            done, waiting = await asyncio.wait(parts, timeout=max(0.0, min(self.slow_s, deadline - loop.time())))
            if waiting:
                # Slower than slow_s: where every pair of the part has a replica on a group that is
                # neither failed nor slow itself, give up on the group and move them; else keep
                # waiting (the call's own timeout is the deadline). A group whose call of this round
                # already failed counts as failed here: moving a slow group's pairs onto a group
                # that just refused its own would leave them no replica (found by the soak).
                slow = {parts[t][0]: DispatchError(routes.table.groups[parts[t][0]], grpc.StatusCode.DEADLINE_EXCEEDED,
                                                   f"no answer within forward_slow_s={self.slow_s} s") for t in waiting}
                # Nor does a group that has not answered since its last failure (down, or back from a
                # restart that may still be under way): slow beats failed, so only a group known to
                # answer may take a slow group's pairs.
                just_failed = {parts[t][0]: t.exception() for t in done if t.exception() is not None}
                down = {g: None for g, a in enumerate(routes.table.groups) if self._groups.unproven(a)}
                keep, gone = set(), {**down, **failed, **just_failed, **slow}  # the same for every waiting call
                for task in waiting:
                    g, rows, mine = parts[task]
                    moved = self._alternative(routes, layer, ids, mine, gone, strict=False)
                    if moved is None:
                        keep.add(task)
                        continue
                    task.cancel()
                    failed[g] = slow[g]
                    self._groups.failed(routes.table.groups[g])
                    self._observe(routes.table.groups[g], self.slow_s, "slow")
                    retry[mine] = moved[mine]
                if keep:
                    done |= (await asyncio.wait(keep))[0]
            errors = {task: task.exception() for task in done}  # every one read, so none goes unretrieved
            permanent = [e for e in errors.values() if isinstance(e, DispatchError) and e.code in PERMANENT]
            other = [e for e in errors.values() if e is not None and not isinstance(e, DispatchError)]
            if permanent or other:
                raise (permanent or other)[0]
            for task, error in errors.items():
                g, rows, mine = parts[task]
                if error is not None:
                    # the group is gone or out of date: its pairs go to another replica
                    failed[g] = error
                    self._groups.failed(routes.table.groups[g])
                    if error.code == grpc.StatusCode.FAILED_PRECONDITION and self.on_stale is not None:
                        self.on_stale()  # our placement is older than the group's slots: fetch the new one
            for task, error in errors.items():
                g, rows, mine = parts[task]
                if error is not None:
                    retry[mine] = self._alternative(routes, layer, ids, mine, failed)[mine]
                else:
                    out.index_add_(0, rows, task.result().to(x.dtype))
            if (retry < 0).all():
                return out
            if loop.time() >= deadline:
                why = f"layer {layer}: no replica answered within {self.timeout_s} s"
                raise DispatchError(", ".join(routes.table.groups[g] for g in failed), grpc.StatusCode.DEADLINE_EXCEEDED,
                                    why, public=why)
            pending = retry

    def _alternative(self, routes: Routes, layer: int, ids, mine, failed: dict, strict: bool = True):
        """For the pairs in `mine`, the first replica on a group not in `failed` [T, k]. When some
        pair has none left: with strict, raise UNAVAILABLE naming those (layer, expert) pairs;
        else return None."""
        choice, has = first_replica(routes, layer, ids, failed)
        stranded = mine & ~has
        if stranded.any():
            if not strict:
                return None
            experts = sorted(set(ids[stranded].tolist()))
            why = "; ".join(f"{e.address}: {e.code.name}: {e.details}" for e in failed.values())
            what = f"no live replica of (layer, expert) {', '.join(f'({layer}, {e})' for e in experts)}"
            raise DispatchError(", ".join(sorted({e.address for e in failed.values()})), grpc.StatusCode.UNAVAILABLE,
                                f"{what} ({why})", public=what)
        return choice

    async def _call(self, address: str, request, timeout_s: float) -> torch.Tensor:
        start = time.perf_counter()
        try:
            response = await self._groups.stubs[address].Forward(request, timeout=timeout_s,
                                                                 metadata=self._groups.metadata)
        except grpc.aio.AioRpcError as e:
            self._observe(address, time.perf_counter() - start, "failed")
            raise DispatchError(address, e.code(), e.details()) from None
        self._observe(address, time.perf_counter() - start, "ok")
        self._groups.answered(address)
        return decode(response.output, "output")

    def _observe(self, address: str, seconds: float, outcome: str) -> None:
        """Metrics by the group's address (from the call's own routes: an index shifts when a group is dropped)."""
        if self.on_forward is not None:
            self.on_forward(address, seconds, outcome)

    def group_stats(self, timeout_s: float = 1.0) -> dict[str, expert_pb2.StatsResponse | None]:
        """Stats of every group in the latest placement; None for a group that did not answer in time."""
        return self._run(self._groups.stats(list(self.latest_table.groups), timeout_s))

    def close(self) -> None:
        self._run(self._groups.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


class ExpertResult:
    """A layer's expert output on its way back: .result() waits for it, on the caller's device."""

    def __init__(self, future: concurrent.futures.Future, device: torch.device):
        self._future, self._device = future, device

    def result(self) -> torch.Tensor:
        return to_device(self._future.result(), self._device)

    def cancel(self) -> None:
        self._future.cancel()
