"""The soak's faults, one every fault_every_s in turn, and the resident memory it watches.

    kill_group     kill -9 of a group's process (Ray restarts it; the controller reloads and republishes)
    restart_redis  Redis stopped and started again on its port, empty (no persistence)
    rebalance      one expert moved down to 1 replica and back to 2 (two real rebalances)
    slow_group     every Forward of one group delayed past forward_slow_s for a while
    burst          many requests at once: the bounded queues refuse the excess (RESOURCE_EXHAUSTED)

After each, the next waits until the router reports every expert served again (bounded), so faults
do not pile up into one no cluster would survive. Memory: the router's (this process) and every
group's resident set, sampled every sample_s; a restarted group is followed to its new pid.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import ray

FAULTS = ("kill_group", "restart_redis", "rebalance", "slow_group", "burst")


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None  # gone (a killed group) or not Linux


class FaultSchedule:
    def __init__(self, cluster, traffic, fault_every_s: float, sample_s: float = 5.0, burst: int = 40,
                 slow_s: float = 2.0):
        self.cluster, self.traffic = cluster, traffic
        self.fault_every_s, self.sample_s, self.burst_size, self.slow_s = fault_every_s, sample_s, burst, slow_s
        self.start = time.monotonic()
        self.faults: list[dict] = []  # {"at_s", "kind", "detail", "recovered_s"}
        self.memory: dict[str, list[tuple[float, int]]] = {}  # process -> [(seconds since start, bytes)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._faults, name="soak-faults", daemon=True),
                         threading.Thread(target=self._sample, name="soak-memory", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _groups(self):
        return [ray.get_actor(f"{self.cluster.name}-group-{i}") for i in range(2)]

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_s):
            self._record("router", os.getpid())
            for i, actor in enumerate(self._groups()):
                try:
                    self._record(f"group-{i}", ray.get(actor.pid.remote(), timeout=5))
                except Exception:  # restarting: sampled again next time
                    pass

    def _record(self, name: str, pid: int) -> None:
        value = rss_bytes(pid)
        if value is not None:
            self.memory.setdefault(name, []).append((time.monotonic() - self.start, value))

    def _faults(self) -> None:
        turn = 0
        while not self._stop.wait(self.fault_every_s):
            kind = FAULTS[turn % len(FAULTS)]
            at = time.monotonic()
            try:
                detail = getattr(self, kind)(turn)
            except Exception as e:  # a drill that could not be applied is reported, and the soak goes on
                detail = f"could not apply: {type(e).__name__}: {e}"
            recovered = self._wait_serving(60.0)
            self.faults.append({"at_s": round(at - self.start, 1), "kind": kind, "detail": detail,
                                "recovered_s": round(time.monotonic() - at, 1) if recovered else None})
            turn += 1

    def _wait_serving(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.cluster.router.serving():
                return True
            time.sleep(0.2)
        return self.cluster.router.serving()

    # ---- the faults ------------------------------------------------------------------

    def kill_group(self, turn: int) -> str:
        i = (turn // len(FAULTS)) % 2
        pid = ray.get(self._groups()[i].pid.remote(), timeout=10)
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)  # let the router see it before the next fault is even considered
        return f"group-{i} pid {pid}"

    def restart_redis(self, turn: int) -> str:
        self.cluster.restart_redis()
        return "stopped and started empty on the same port"

    def rebalance(self, turn: int) -> str:
        spec = self.cluster.spec
        layer = spec.sparse_layers[turn % len(spec.sparse_layers)]
        expert = turn % spec.num_experts
        ray.get(self.cluster.controller.scale.remote(layer, expert, 1), timeout=120)
        ray.get(self.cluster.controller.scale.remote(layer, expert, 2), timeout=120)
        return f"(layer {layer}, expert {expert}) to 1 replica and back to 2"

    def slow_group(self, turn: int) -> str:
        i = (turn // len(FAULTS)) % 2
        actor = self._groups()[i]
        ray.get(actor.inject_fault.remote(forward_delay_s=self.slow_s), timeout=10)
        self._stop.wait(5.0)
        ray.get(actor.inject_fault.remote(), timeout=10)
        return f"group-{i} +{self.slow_s} s per Forward for 5 s"

    def burst(self, turn: int) -> str:
        self.traffic.burst(self.burst_size)
        return f"{self.burst_size} requests at once"
