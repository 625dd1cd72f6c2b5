"""ExpertServicer: the expert stage of one group, behind elasticmoe.v1.ExpertService.

t = tokens sent to this group, k = experts per token, H = hidden, E = experts per
layer, S_l = slots this group holds of layer l.

  ForwardRequest(layer, hidden [t, H], expert_ids [t, k], weights [t, k])
    -> decode and check             bad tensor / shape / dtype -> INVALID_ARGUMENT
    -> expert id -> local slot      an expert not held here    -> FAILED_PRECONDITION
    -> the coalescer: moe_forward in a worker thread, same-layer calls queued together in one
    -> ForwardResponse(output [t, H])

What the group holds is one immutable snapshot, layer -> LayerExperts. Load and Unload build a new
snapshot and swap it in with one assignment; a Forward reads self._held once, so it sees the slots
from before a swap or after it, never a mix. Dropped weights are freed when the last Forward that
read the old snapshot ends. The expert math lives in experts.kernels.forward; this file only maps,
checks and counts. Who may call what is checked before any handler runs (experts/credentials.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from elasticmoe.v1 import expert_pb2, expert_pb2_grpc

from cluster.checkpoint.reader import Checkpoint, CheckpointError
from experts.coalescer import Coalescer
from experts.config import ExpertGroupConfig
from experts.credentials import SecretCheck
from experts.held import LayerExperts, Slot, Triple, held_bytes, held_slots, stack_layer
from experts.kernels import packed
from experts.kernels.forward import moe_forward, resolve_backend
from experts.wire import NAME_OF, WireError, decode, encode, to_device, to_host

log = logging.getLogger(__name__)

def slot_messages(slots) -> list[expert_pb2.Slot]:
    return [expert_pb2.Slot(layer=layer, expert=expert) for layer, expert in slots]


def _lower_priority(niceness: int = 10) -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads by their own nice value)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or not allowed: loads compete as equals
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    """Serves the slots of one group. Build with `await ExpertServicer.create(config)`."""

    def __init__(self, config: ExpertGroupConfig):
        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        # The torch kernel in fp32 on CPU runs on oneDNN-packed weights (1.3-1.45x, experts/kernels/packed.py)
        self.packed = (resolve_backend(config.backend, self.device) == "torch"
                       and packed.supported(torch.empty(0, dtype=self.dtype, device=self.device)))
        self.checkpoint = Checkpoint(config.checkpoint)  # reads config.json and the index only
        self.spec = self.checkpoint.spec
        self._held: dict[int, LayerExperts] = {}  # replaced whole, never mutated (see module doc)
        self._swap_lock = asyncio.Lock()  # one Load/Unload at a time, so none builds on a stale snapshot
        self._tokens: Counter[Slot] = Counter()  # (token, expert) pairs served, cumulative
        self._busy_s, self._forward_calls, self._in_flight, self._loads_in_flight = 0.0, 0, 0, 0
        # Loads and unloads read files and copy stacks while Forwards are served: on their own
        # thread at a lower CPU priority, so on a shared CPU serving wins (DESIGN: a rebalance
        # must not stall serving). One thread: loads run one at a time anyway (_swap_lock).
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="expert-load", initializer=_lower_priority)
        self.secret_check: SecretCheck | None = None  # set by serve_group when the port needs a secret
        # same-layer Forwards queued together run as one kernel call (coalescer.py)
        self.coalescer = Coalescer(self._compute, config.coalesce_window_s)
        # Fault injection for drills and tests (ExpertGroup.inject_fault): added latency, never a wrong answer.
        self.forward_delay_s, self.load_delay_s = 0.0, 0.0

    @classmethod
    async def create(cls, config: ExpertGroupConfig) -> "ExpertServicer":
        servicer = cls(config)
        await servicer.load(config.slots)
        return servicer

    # ---- held weights -------------------------------------------------------------

    @property
    def slots(self) -> list[Slot]:
        return held_slots(self._held)

    @property
    def loaded_bytes(self) -> int:
        return held_bytes(self._held)

    async def load(self, slots: list[Slot]) -> dict[int, LayerExperts]:
        """Load the slots not yet held; all or nothing. Raises CheckpointError on a bad slot."""
        async with self._swap_lock:
            held = self._held
            new = sorted({(int(layer), int(expert)) for layer, expert in slots} - set(held_slots(held)))
            if new:
                start, before = time.monotonic(), held_bytes(held)
                self._loads_in_flight += 1
                try:
                    if self.load_delay_s:
                        await asyncio.sleep(self.load_delay_s)
                    self._held = await self._off_loop(self._with_loaded, held, new)  # reads files: off the loop
                finally:
                    self._loads_in_flight -= 1
                log.info("group %s loaded %d slot(s) %s: +%.2f MiB, now %d slots, %.2f MiB, in %.3f s",
                         self.config.name, len(new), new, (self.loaded_bytes - before) / 2**20,
                         len(self.slots), self.loaded_bytes / 2**20, time.monotonic() - start)
            return self._held

    async def unload(self, slots: list[Slot]) -> dict[int, LayerExperts]:
        """Drop the given slots; a slot not held is ignored."""
        async with self._swap_lock:
            held = self._held
            drop = sorted({(int(layer), int(expert)) for layer, expert in slots} & set(held_slots(held)))
            if drop:
                start, before = time.monotonic(), held_bytes(held)
                self._held = await self._off_loop(self._without, held, drop)
                del held  # our reference to the old snapshot; in-flight Forwards hold theirs until they end
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # hand freed blocks back, so the device's memory use shows it
                log.info("group %s unloaded %d slot(s) %s: -%.2f MiB, now %d slots, %.2f MiB, in %.3f s",
                         self.config.name, len(drop), drop, (before - self.loaded_bytes) / 2**20,
                         len(self.slots), self.loaded_bytes / 2**20, time.monotonic() - start)
            return self._held

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    def _with_loaded(self, held: dict[int, LayerExperts], new: list[Slot]) -> dict[int, LayerExperts]:
        added: dict[int, dict[int, Triple]] = defaultdict(dict)
        for layer, expert in new:  # only these tensors are read from the checkpoint
            triple = self.checkpoint.load_expert(layer, expert, self.dtype)
            added[layer][expert] = tuple(t.to(self.device) for t in triple)
        out = dict(held)
        for layer, experts in added.items():
            old = held[layer].per_expert() if layer in held else {}
            out[layer] = stack_layer({**old, **experts}, self.spec.num_experts, self.packed)
        return out

    def _without(self, held: dict[int, LayerExperts], drop: list[Slot]) -> dict[int, LayerExperts]:
        out = dict(held)
        for layer in {layer for layer, _ in drop}:
            gone = {e for l, e in drop if l == layer}
            keep = {e: w for e, w in held[layer].per_expert().items() if e not in gone}
            out[layer] = stack_layer(keep, self.spec.num_experts, self.packed) if keep else None
        return {layer: le for layer, le in out.items() if le is not None}

    # ---- Forward --------------------------------------------------------------------

    async def Forward(self, request, context):
        self._in_flight += 1
        try:
            return await self._forward(request, context)
        finally:
            self._in_flight -= 1

    async def _forward(self, request, context):
        held = self._held  # one snapshot for the whole call
        try:
            hidden = decode(request.hidden, "hidden")  # [t, H]
            expert_ids = decode(request.expert_ids, "expert_ids")  # [t, k] int32
            weights = decode(request.weights, "weights")  # [t, k] float32
        except WireError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        problem = self._check(request.layer, hidden, expert_ids, weights)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

        layer = held.get(request.layer)
        valid = expert_ids >= 0
        if layer is None:
            slot_ids = torch.full_like(expert_ids, -1, dtype=torch.int64)
        else:
            slot_ids = torch.where(valid, layer.slot_of[expert_ids.clamp(min=0).long()], -1)  # [t, k]
        missing = sorted(set(expert_ids[valid & (slot_ids < 0)].tolist()))
        if missing:
            # the router's placement is older than this group's slots: it re-plans and retries
            pairs = ", ".join(f"({request.layer}, {e})" for e in missing)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"group {self.config.name} does not hold (layer, expert) {pairs}; "
                                f"placement_version {request.placement_version} is stale")

        if self.forward_delay_s:
            await asyncio.sleep(self.forward_delay_s)
        if layer is None:  # nothing of this layer here and every id is -1: a zero contribution
            output = torch.zeros_like(hidden)
        else:
            output = await self.coalescer.run((request.layer, layer), hidden, slot_ids, weights)
            counts = torch.bincount(slot_ids[slot_ids >= 0], minlength=len(layer.experts)).tolist()
            for expert, n in zip(layer.experts, counts):
                if n:
                    self._tokens[(request.layer, expert)] += n
        self._forward_calls += 1
        return expert_pb2.ForwardResponse(output=encode(output))

    def _check(self, layer: int, hidden, expert_ids, weights) -> str | None:
        """What is wrong with a decoded request, naming the field; None when it is well formed."""
        H, E = self.spec.hidden_size, self.spec.num_experts
        if not self.spec.is_sparse(layer):
            return f"layer {layer} is not an MoE layer of this model (sparse layers: {list(self.spec.sparse_layers)})"
        if hidden.dim() != 2 or hidden.shape[1] != H:
            return f"hidden must be [t, H={H}], got shape {list(hidden.shape)}"
        if hidden.dtype != self.dtype:
            return f"hidden.dtype must be {NAME_OF[self.dtype]} (this group's dtype), got {NAME_OF[hidden.dtype]}"
        t = hidden.shape[0]
        if expert_ids.dtype != torch.int32:
            return f"expert_ids.dtype must be int32, got {NAME_OF[expert_ids.dtype]}"
        if expert_ids.dim() != 2 or expert_ids.shape[0] != t:
            return f"expert_ids must be [t={t}, k] like hidden, got shape {list(expert_ids.shape)}"
        if weights.dtype != torch.float32:
            return f"weights.dtype must be float32, got {NAME_OF[weights.dtype]}"
        if weights.shape != expert_ids.shape:
            return f"weights must have expert_ids' shape {list(expert_ids.shape)}, got {list(weights.shape)}"
        if expert_ids.numel() and (expert_ids.min() < -1 or expert_ids.max() >= E):
            return f"expert_ids must be in [-1, {E - 1}], got values in [{expert_ids.min()}, {expert_ids.max()}]"
        return None

    def _compute(self, key, hidden, slot_ids, weights) -> torch.Tensor:
        """One kernel call, in the coalescer's worker thread, over every request it merged: output on
        the host [t, H]. Copying it back waits for the device, so busy_s is the real compute time."""
        start = time.perf_counter()
        _, layer = key
        # through pinned memory, non-blocking: the three copies queue behind each other on the stream
        out = moe_forward(to_device(hidden, self.device), to_device(slot_ids, self.device),
                          to_device(weights, self.device), layer.weights, self.config.backend,
                          check_range=False)  # [t, H]: _check did it
        out = to_host(out)
        self._busy_s += time.perf_counter() - start
        return out

    # ---- Load / Unload / Stats ------------------------------------------------------

    async def _requested(self, request, context) -> list[Slot]:
        # More entries than the model has (layer, expert) pairs: refused before the list is walked
        limit = len(self.spec.sparse_layers) * self.spec.num_experts
        if len(request.slots) > limit:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"slots has {len(request.slots)} entries; at "
                                f"most {limit} (one per (layer, expert) of this model)")
        return [(s.layer, s.expert) for s in request.slots]

    async def LoadExperts(self, request, context):
        try:
            held = await self.load(await self._requested(request, context))
        except CheckpointError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return expert_pb2.LoadExpertsResponse(slots=slot_messages(held_slots(held)), loaded_bytes=held_bytes(held))

    async def UnloadExperts(self, request, context):
        held = await self.unload(await self._requested(request, context))
        return expert_pb2.UnloadExpertsResponse(slots=slot_messages(held_slots(held)), loaded_bytes=held_bytes(held))

    async def Stats(self, request, context):
        # slots held now, plus slots dropped since start that served tokens (counts are cumulative)
        slots = sorted(set(self.slots) | set(self._tokens))
        return expert_pb2.StatsResponse(
            slots=[expert_pb2.SlotStats(slot=expert_pb2.Slot(layer=layer, expert=expert),
                                        tokens=self._tokens[(layer, expert)]) for layer, expert in slots],
            busy_s=self._busy_s, queue_depth=self._in_flight, forward_calls=self._forward_calls,
            device=str(self.device), dtype=NAME_OF[self.dtype], loaded_bytes=self.loaded_bytes,
            refused_calls=self.secret_check.refused if self.secret_check else 0, loads_in_flight=self._loads_in_flight,
            kernel_calls=self.coalescer.calls, merged_calls=self.coalescer.merged)
