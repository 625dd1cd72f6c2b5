"""Fixtures of the integration tests: a local Ray per module, and the reference model."""
from __future__ import annotations

import pytest
import ray

from router_service.model.reference import ReferenceModel


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ReferenceModel.from_pretrained(tiny_checkpoint)
