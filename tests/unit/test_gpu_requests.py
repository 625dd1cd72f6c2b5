"""GpuRequests against a fake autoscaler SDK that records every request_resources call
(cluster/control/gpu_requests.py). The controller's own calls, in a real local Ray, are in
tests/integration/test_gpu_requests_ray.py."""
from __future__ import annotations

import logging

import pytest

from cluster.control.gpu_requests import GpuRequests


class FakeSdk:
    """request_resources(bundles=...) as the Ray autoscaler SDK takes it: each call replaces the last."""

    def __init__(self, fail: bool = False):
        self.calls: list[list[dict]] = []
        self.fail = fail

    def __call__(self, bundles):
        self.calls.append(list(bundles))
        if self.fail:
            raise ConnectionError("GCS unreachable")

    @property
    def standing(self) -> list[dict]:
        return self.calls[-1] if self.calls else []


def test_a_scale_up_asks_for_every_group_and_ends_cleared():
    sdk, seen = FakeSdk(), []
    requests = GpuRequests(sdk, on_change=seen.append)
    requests.ask(3, 1)  # two groups run, a third is being added: room for three in the whole cluster
    assert sdk.standing == [{"GPU": 1}] * 3 and requests.bundles == 3
    requests.clear()  # the add ended (its group holds the GPU, or it failed)
    assert sdk.calls == [[{"GPU": 1}] * 3, []] and requests.bundles == 0
    assert seen == [3, 0]


@pytest.mark.parametrize("num_groups, gpus", [(2, 0), (0, 1)])
def test_nothing_is_asked_without_gpus(num_groups, gpus):
    sdk = FakeSdk()
    GpuRequests(sdk).ask(num_groups, gpus)
    assert sdk.calls == []


def test_fractional_gpus_are_asked_as_configured():
    sdk = FakeSdk()
    GpuRequests(sdk).ask(2, 0.5)
    assert sdk.standing == [{"GPU": 0.5}, {"GPU": 0.5}]


def test_a_failing_sdk_is_logged_and_never_raises(caplog):
    sdk, seen = FakeSdk(fail=True), []
    requests = GpuRequests(sdk, on_change=seen.append)
    with caplog.at_level(logging.WARNING, logger="cluster.control.controller"):
        requests.ask(2, 1)
        requests.clear()
    assert len(sdk.calls) == 2 and requests.bundles == 0 and seen == []  # nothing was recorded as asked
    assert "request_resources(2 GPU bundle(s)) failed (ConnectionError: GCS unreachable)" in caplog.text
