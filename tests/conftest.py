"""Shared fixtures: one local Ray per test session, free ports, a small generated site."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray started once per session (two Ray instances in one process tree break Ray Train)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_site(tmp_path_factory):
    """A generated pydoc site (8 modules, 2 exact and 2 near duplicates, 2 private pages)."""
    from ingestion.demo_site import build_demo_site

    return build_demo_site(
        tmp_path_factory.mktemp("site"), modules=8, exact_duplicates=2, near_duplicates=2, private_pages=2
    )
