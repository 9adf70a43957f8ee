"""Fixtures shared by the training tests."""

import os

import pytest

from tests.conftest import free_port


@pytest.fixture(scope="session")
def single_process_dist():
    """World size 1 on gloo. The group stays up: DeepSpeed caches it, so re-creating it would break."""
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    for key, value in env.items():
        os.environ.setdefault(key, value)
    yield
