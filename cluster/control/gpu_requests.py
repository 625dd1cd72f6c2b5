"""GPU room asked of the Ray autoscaler, and only while an expert group waits for its GPU.

    scale-up starts a group   ask(groups after the add)   request_resources(bundles=[{GPU: g}] * n)
    the add ends              clear()                     it holds its GPU, or it failed: nothing waits
    scale-down                clear()                     the autoscaler may remove the idle GPU pod
    controller start          clear()                     a request left by a controller that died mid-add

Why clear: `ray.autoscaler.sdk.request_resources` is sticky (Ray 2.60). Each call replaces the
previous request, which then stands until the next call, and the autoscaler keeps enough nodes to
satisfy it even when they are idle: a request for n GPUs left standing pins n GPU pods, so
KubeRay's idleTimeoutSeconds never frees one. Why the total and not the increment: the request
says what must fit in the whole cluster, running actors included, so n = every group after the add.

A request is a hint that starts a node early; the group's own GPU request is what waits for it.
So a failing call is logged and the scaling goes on: it must never fail an add or a removal.
"""
from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("cluster.control.controller")  # one logger for the whole controller


def _ray_request_resources(bundles: list[dict]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


class GpuRequests:
    """The controller's standing request for GPU bundles; `bundles` is what is asked now."""

    def __init__(self, request_resources: Callable[..., None] | None = None,
                 on_change: Callable[[int], None] | None = None):
        """request_resources(bundles=[...]): Ray's by default (a fake in unit tests); on_change(number of
        bundles asked): metrics."""
        self._request = request_resources or _ray_request_resources
        self._on_change = on_change
        self.bundles = 0

    def ask(self, num_groups: int, gpus_per_group: float) -> None:
        """Room for num_groups groups of gpus_per_group GPUs each, in the whole cluster."""
        if gpus_per_group > 0 and num_groups > 0:
            self._send([{"GPU": gpus_per_group}] * num_groups)

    def clear(self) -> None:
        """No GPU asked for: nodes the groups do not use may go."""
        self._send([])

    def _send(self, bundles: list[dict]) -> None:
        try:
            self._request(bundles=bundles)
        except Exception as e:  # a hint only (module docstring): scaling goes on without it
            log.warning("request_resources(%d GPU bundle(s)) failed (%s: %s); the Ray autoscaler keeps the previous "
                        "request", len(bundles), type(e).__name__, e)
            return
        self.bundles = len(bundles)
        if self._on_change is not None:
            self._on_change(self.bundles)
