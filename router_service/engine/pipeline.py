"""Two micro-batches in flight: while one's tokens are at the expert groups, the router computes the other.

    A: attention, gate (layer 0) -> submit A0 ----------------------> groups compute A0
    B: attention, gate (layer 0) -> submit B0  (the router works while A0 is away)
    wait A0 -> A: combine, layer 1 -> submit A1  (while B0 is at the groups)
    wait B0 -> B: combine, layer 1 -> submit B1
    ...

MegaScale-Infer's ping-pong and SGLang's two-batch overlap do this across attention and expert
nodes; here each micro-batch is DenseModel.stages() (the forward as a generator that yields at
every MoE layer) and the experts stage is RemoteExperts.submit(), which returns at once. The
micro-batches share one step (one placement) and one KV pool; they hold different sequences,
so nothing one writes is read by the other.
"""
from __future__ import annotations

from router_service.model.dense import expert_step


def forward_overlapped(dense, experts, parts) -> list:
    """parts: (input_ids, attention context, logit rows) per micro-batch -> their logits, in order.
    experts must have submit() (RemoteExperts); the micro-batches take turns at each MoE layer."""
    stages = [dense.stages(*part) for part in parts]
    pending = [None] * len(stages)  # what each micro-batch waits for: an ExpertResult, or None when done
    logits = [None] * len(stages)

    def advance(i: int, expert_output) -> None:
        try:
            call = stages[i].send(expert_output)
        except StopIteration as done:
            logits[i], pending[i] = done.value, None
            return
        pending[i] = experts.submit(*call)

    with expert_step(experts):
        try:
            for i in range(len(stages)):
                advance(i, None)  # each runs to its first MoE layer and sends it off
            while any(p is not None for p in pending):
                for i, result in enumerate(pending):
                    if result is not None:
                        advance(i, result.result())
        except BaseException:
            for result in pending:  # the step failed: the other micro-batch's layer is not waited for
                if result is not None:
                    result.cancel()
            raise
    return logits
