"""Secrets masked wherever a URI is shown, and kept where the URI is used."""

import io
import pickle
import subprocess
import sys

import pytest

from core.redact import RedactingStream, redact
from core.storage import Store, node_dir

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("s3://AKIA:SeCrEt@bucket/runs?endpoint_override=127.0.0.1:9&scheme=http",
         "s3://***@bucket/runs?endpoint_override=127.0.0.1:9&scheme=http"),
        ("http://user:pa55@mlflow.internal:5000", "http://***@mlflow.internal:5000"),
        ("ray://token@head:10001", "ray://***@head:10001"),
        ("wrote s3://b/x?secret_key=abc&access_key=K&region=us now",
         "wrote s3://b/x?secret_key=***&access_key=***&region=us now"),
        ("https://h/o?X-Amz-Credential=AK%2F1&X-Amz-Signature=dead", "https://h/o?X-Amz-Credential=***&X-Amz-Signature=***"),
        ("gs://bucket/a?session_token=t1", "gs://bucket/a?session_token=***"),
        # no secret: unchanged
        ("/data/run", "/data/run"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("s3://bucket/x?endpoint_override=h:1&scheme=http&region=r", "s3://bucket/x?endpoint_override=h:1&scheme=http&region=r"),
        ("mail admin@example.com", "mail admin@example.com"),
        ("train.lr=0.001", "train.lr=0.001"),
    ],
)  # fmt: skip
def test_redact_masks_user_info_and_secret_query_values_only(text, shown):
    assert redact(text) == shown


def test_a_store_keeps_its_credentials_for_use_and_masks_them_when_shown():
    uri = "s3://AKIDX:SeCrEt@bucket/runs/demo?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    store = Store(uri)
    assert store.uri == uri  # what a worker opens it with
    child = store / "train"
    assert child.uri == uri.replace("/demo?", "/demo/train?")
    assert pickle.loads(pickle.dumps(child)).uri == child.uri  # travels to other processes whole
    # The filesystem rebuilt from the URI holds the key (pyarrow's own reduction names it).
    assert pickle.loads(pickle.dumps(child)).fs.__reduce__()[1][0]["secret_key"] == "SeCrEt"
    for shown in (str(store), repr(store), f"{child}", str(FileNotFoundError(f"{child}: gone"))):
        assert "SeCrEt" not in shown and "AKIDX" not in shown and "***@bucket" in shown
    # The node cache stands for the place, whoever's keys read it.
    assert node_dir(store, "runs") == node_dir(uri.replace("AKIDX:SeCrEt@", "OTHER:KEY@"), "runs")
    assert node_dir(store, "runs") == node_dir(uri.replace("AKIDX:SeCrEt@", ""), "runs")


def test_a_redacting_stream_masks_what_is_written_and_forwards_the_rest():
    raw = io.StringIO()
    stream = RedactingStream(raw)
    assert stream.write("at s3://k:SeCrEt@b/x\n") == len("at s3://k:SeCrEt@b/x\n")
    stream.writelines(["http://u:pw@h\n"])
    assert raw.getvalue() == "at s3://***@b/x\nhttp://***@h\n"
    assert stream.getvalue() == raw.getvalue() and not stream.isatty()


def test_the_cli_process_masks_prints_log_records_and_tracebacks():
    script = """
import logging, sys
handler = logging.StreamHandler(sys.stderr)
logging.getLogger("ray").addHandler(handler)
from core.redact import redact_console
redact_console()
print("workdir s3://KEY:SeCrEt@bucket/x")
logging.getLogger("ray").warning("cannot reach http://u:SeCrEt@h:5000")
raise OSError("s3://KEY:SeCrEt@bucket/x: gone")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "SeCrEt" not in done.stdout + done.stderr
    assert "s3://***@bucket/x" in done.stdout and "http://***@h:5000" in done.stderr
    assert "OSError: s3://***@bucket/x: gone" in done.stderr
