"""A router replica `kill -9`ed under load: SDK -> Serve gRPC ingress -> router replica -> expert groups, real Ray.

    2 long Generates hold both running slots, streaming        -> the replica dies under them: ReplicaLost
    2 Generates queued behind them, nothing streamed yet        -> retried by the SDK: complete, equal the reference
      (one more with max_attempts=1: shows what Serve sends)     -> ReplicaLost, code INTERNAL, nothing streamed
    loops of Generate / Score / Status from 3 threads           -> every call succeeds and is correct
    kill -9 of the replica's worker process                     -> Serve starts a replacement; times printed (-s)

What Serve's proxy does (Ray 2.60): a call in flight on the dead replica ends at once with INTERNAL and
the ActorDiedError's text (ray/serve/_private/grpc_util.py), streamed or not; a call arriving while no
replica runs waits at the proxy until the replacement is up, no error. The SDK retries the first kind
as ReplicaLost where nothing was streamed (router_service/client: errors.py, retry.py). Every call has timeout_s
CALL_TIMEOUT_S, long enough for the restart: the Serve controller notices the dead replica at its next
health check (every 2 s, RouterDeployment's health_check_period_s; 6 to 14 s were measured at Serve's
default 10 s) and then needs about 3 s to start a new worker and load the router.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest
import ray
import torch
from ray import serve

from cluster.bench.overload import local_service
from router_service.client import MoEClient, ReplicaLost
from router_service.model.reference import ReferenceModel

ROUTER = {"max_running": 2, "max_queue": 8, "max_step_tokens": 64}
REPLICA_CLASS = "ServeReplica:moe:router"  # Serve names a replica actor's class ServeReplica:<app>:<deployment>
CALL_TIMEOUT_S = 60.0
RECOVERY_BOUND_S = 45.0  # a bound for the waits, not a target: the measured time is printed
SLACK_S = 3.0  # how far past its timeout_s a call may return (thread scheduling on 2 busy cores)
LONG_PROMPTS = ((7, 11, 13, 2, 19, 23), (40, 41, 42))  # no </s> in 300 greedy tokens of the tiny checkpoint
LONG_TOKENS = 300
GEN_PROMPTS = ((5, 17, 42, 99, 3), (9, 8, 7, 6, 5, 4, 3, 2), (100, 200, 300))
GEN_TOKENS = 6
SCORE_PROMPT = [5, 17, 42, 99, 3, 8, 13]


@dataclass
class Call:
    kind: str
    start: float
    end: float | None = None  # None: never returned
    chunks: list = field(default_factory=list)
    result: object = None
    error: Exception | None = None
    prompt: tuple = ()
    max_tokens: int = GEN_TOKENS

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    def overlaps(self, start: float, end: float) -> bool:
        return self.start < end and (self.end or float("inf")) > start


def run_call(call: Call, client: MoEClient, started: threading.Event | None = None) -> None:
    """Run one SDK call, recording chunks, result or error and when it returned."""
    try:
        if call.kind == "generate":
            for chunk in client.stream(list(call.prompt), max_tokens=call.max_tokens):
                call.chunks.append(chunk)
                if started is not None:
                    started.set()
        elif call.kind == "score":
            call.result = client.score(SCORE_PROMPT)
        else:
            call.result = client.status()
    except Exception as e:  # recorded and checked below: anything but the expected ReplicaLost fails the test
        call.error = e
    call.end = time.monotonic()


def load(kind: str, client: MoEClient, stop: threading.Event, calls: list[Call]) -> None:
    i = 0
    while not stop.is_set():
        call = Call(kind, time.monotonic(), prompt=GEN_PROMPTS[i % len(GEN_PROMPTS)])
        calls.append(call)
        run_call(call, client)
        i += 1
        stop.wait(0.05)  # a steady trickle, not a busy loop on 2 cores


def start(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def replica_actors() -> list[dict]:
    """The router's replica actors, dead ones included, from the GCS actor table of this driver's cluster.
    ray.util.state.list_actors needs the dashboard, which local_service does not start, and refuses to
    pick when another Ray instance runs on the machine."""
    return [a for a in ray._private.state.actors().values() if a["ActorClassName"] == REPLICA_CLASS]


def running_replicas() -> int:
    states = serve.status().applications["moe"].deployments["router"].replica_states
    return {getattr(k, "value", k): v for k, v in states.items()}.get("RUNNING", 0)


def greedy(reference: ReferenceModel, prompt, n: int) -> list[int]:
    out = reference.generate_greedy(list(prompt), n)
    return out[:out.index(1)] if 1 in out else out  # </s> = 1 ends generation


@pytest.fixture(scope="module")
def address(tiny_checkpoint):
    with local_service(str(tiny_checkpoint), 2, ROUTER, num_cpus=2) as address:
        yield address


def test_router_replica_killed_under_load(address, tiny_checkpoint):
    reference = ReferenceModel.from_pretrained(tiny_checkpoint)
    expected = {p: greedy(reference, p, GEN_TOKENS) for p in GEN_PROMPTS}
    long_expected = {p: greedy(reference, p, LONG_TOKENS) for p in LONG_PROMPTS}
    assert all(len(v) == LONG_TOKENS for v in long_expected.values())  # they outlast the kill
    logp = torch.log_softmax(reference(torch.tensor([SCORE_PROMPT]))[0], dim=-1)
    expected_scores = [float(logp[i, SCORE_PROMPT[i + 1]]) for i in range(len(SCORE_PROMPT) - 1)]

    def correct(call: Call) -> bool:
        if call.kind == "generate":
            return bool(call.chunks) and call.chunks[-1].finish_reason is not None and \
                call.tokens == expected[call.prompt]
        if call.kind == "score":
            return max(abs(a - b) for a, b in zip(call.result, expected_scores, strict=True)) <= 1e-4
        return call.result.serving and call.result.placement_version == 1

    client = MoEClient(address, timeout_s=CALL_TIMEOUT_S, max_attempts=5, backoff_s=0.2)
    once = MoEClient(address, timeout_s=CALL_TIMEOUT_S, max_attempts=1)  # shows what Serve sends
    try:
        warm = Call("generate", time.monotonic(), prompt=GEN_PROMPTS[0])
        run_call(warm, client)
        assert warm.error is None and correct(warm), (warm.error, warm.tokens)
        (old,) = [a for a in replica_actors() if a["State"] == "ALIVE"]

        # Both running slots taken by long streams that have delivered tokens ...
        long_calls, long_started = [], []
        for prompt in LONG_PROMPTS:
            long_calls.append(Call("generate", time.monotonic(), prompt=prompt, max_tokens=LONG_TOKENS))
            long_started.append(threading.Event())
            start(run_call, long_calls[-1], client, long_started[-1])
        assert all(e.wait(60) for e in long_started), [c.error for c in long_calls]
        # ... so these wait in the router's queue, nothing streamed, when the replica dies.
        queued = [Call("generate", time.monotonic(), prompt=p) for p in GEN_PROMPTS[:2]]
        queued_once = Call("generate", time.monotonic(), prompt=GEN_PROMPTS[2])
        threads = [start(run_call, c, client) for c in queued] + [start(run_call, queued_once, once)]
        stop, calls = threading.Event(), []
        threads += [start(load, kind, client, stop, calls) for kind in ("generate", "score", "status")]
        # wait for the event, not a time: the three queued calls waiting in the router's engine
        deadline = time.monotonic() + 60
        while once.status().kv.waiting < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert once.status().kv.waiting >= 3, "the queued calls never reached the router"
        assert all(c.end is None for c in long_calls + queued + [queued_once]), "finished before the kill"

        os.kill(old["Pid"], signal.SIGKILL)
        t_kill = time.monotonic()
        probe = Call("status", t_kill)  # issued into the outage: its return is the first call served
        threads.append(start(run_call, probe, client))

        t_noticed = t_alive = t_running = None  # Serve asked for a new replica / Ray started it / Serve runs it
        while time.monotonic() - t_kill < RECOVERY_BOUND_S:
            new = [a["State"] for a in replica_actors() if a["ActorID"] != old["ActorID"]]
            if t_noticed is None and new:
                t_noticed = time.monotonic()
            if t_alive is None and "ALIVE" in new:
                t_alive = time.monotonic()
            if t_alive is not None and running_replicas() == 1:
                t_running = time.monotonic()
                break
            time.sleep(0.2)
        assert t_running is not None, f"no replacement replica running {RECOVERY_BOUND_S} s after the kill"
        while time.monotonic() - t_kill < RECOVERY_BOUND_S and not any(  # a load call served by the replacement
                c.error is None and c.start >= t_running and c.end is not None for c in list(calls)):
            time.sleep(0.05)
        stop.set()
        deadline = time.monotonic() + CALL_TIMEOUT_S + SLACK_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "a call outlived its timeout_s"
        t_first_ok = min(c.end for c in calls + [probe] if c.error is None and c.start >= t_kill)
        print(f"\nrouter replica kill -9 -> replacement requested {t_noticed - t_kill:.1f} s, alive in Ray "
              f"{t_alive - t_kill:.1f} s, running in Serve {t_running - t_kill:.1f} s; "
              f"first successful call {t_first_ok - t_kill:.1f} s "
              f"(probe issued at the kill returned after {probe.end - t_kill:.1f} s); "
              f"streams broken {max(c.end for c in long_calls) - t_kill:.2f} s after the kill; "
              f"{len(calls)} load calls")

        # The streams that had delivered tokens: a typed error soon after the kill, never a short success.
        for call in long_calls:
            assert isinstance(call.error, ReplicaLost), call.error
            assert call.chunks and call.chunks[-1].finish_reason is None
            assert call.tokens == long_expected[call.prompt][:len(call.tokens)]
            assert t_kill < call.end < t_running  # broken by the kill itself, not by a later timeout
        # Queued, nothing streamed: what Serve sends, then the same call retried by the SDK.
        assert isinstance(queued_once.error, ReplicaLost) and not queued_once.chunks
        assert queued_once.error.code.name == "INTERNAL" and "actor died" in queued_once.error.details
        for call in queued:
            assert call.error is None and correct(call), (call.error, call.tokens)
            assert call.end > t_kill  # served by the replacement
        # The load: every call correct (or, for a Generate, broken after it streamed), none past its timeout.
        assert {c.kind for c in calls} == {"generate", "score", "status"}
        for call in calls + [probe]:
            assert call.end - call.start <= CALL_TIMEOUT_S + SLACK_S
            if call.error is not None:
                assert call.kind == "generate" and isinstance(call.error, ReplicaLost) and call.chunks, call.error
            else:
                assert correct(call), (call.kind, call.prompt, call.tokens, call.result)
        for kind in ("generate", "score", "status"):  # each kind was asked during the outage and answered
            assert any(c.kind == kind and c.error is None and c.overlaps(t_kill, t_running) for c in calls), kind
        assert probe.error is None and correct(probe)

        # After recovery: all three answer correctly.
        after = [Call(kind, time.monotonic(), prompt=GEN_PROMPTS[1]) for kind in ("generate", "score", "status")]
        for call in after:
            run_call(call, once)
            assert call.error is None and correct(call), (call.kind, call.error)
        assert [a["Pid"] for a in replica_actors() if a["State"] == "ALIVE"] != [old["Pid"]]
    finally:
        client.close()
        once.close()
