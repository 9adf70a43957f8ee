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


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto's server mode) on 127.0.0.1: there is no real S3 here. Yields a function
    that makes a bucket and returns its URI prefix, with the query pyarrow needs to reach the server
    (``s3://bucket?endpoint_override=127.0.0.1:PORT&scheme=http``)."""
    from moto.server import ThreadedMotoServer

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask the instance metadata address for credentials
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()

    def bucket(name: str) -> tuple[str, str]:
        import pyarrow.fs as pafs

        query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs = pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{port}",
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return f"s3://{name}", query

    yield bucket
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
