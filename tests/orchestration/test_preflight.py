"""Pre-flight: config mistakes that pass validation are caught before any stage runs, naming field, value
and fix."""

import json
from pathlib import Path

import pytest

from orchestration.config import ConfigError, parse_config
from orchestration.pipeline import Pipeline
from orchestration.preflight import cluster_problems, preflight

pytestmark = pytest.mark.integration


def _config(tmp_path, **sections):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "some text"}) + "\n")
    data = {"workdir": str(tmp_path / "work"), "read": {"paths": [str(corpus)]}, **sections}
    return parse_config(data, "test")


def test_missing_files_are_all_named_before_anything_runs(tmp_path):
    cfg = _config(
        tmp_path,
        read={"paths": [str(tmp_path / "dumps" / "*.jsonl.gz")]},
        tokenize={"tokenizer": {"path": str(tmp_path / "nope" / "tokenizer.json")}},
        train={"init_from": str(tmp_path / "no-model")},
    )
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert f"read.paths: nothing matches '{tmp_path / 'dumps' / '*.jsonl.gz'}'" in message
    assert f"tokenize.tokenizer.path: '{tmp_path / 'nope' / 'tokenizer.json'}'" in message
    assert f"train.init_from: '{tmp_path / 'no-model'}' is not a Hugging Face model directory" in message


def test_seq_len_longer_than_the_init_from_model_positions(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64}))
    (model / "tokenizer.json").write_text("{}")
    cfg = _config(tmp_path, train={"init_from": str(model), "seq_len": 128})
    with pytest.raises(
        ConfigError, match=r"train.seq_len: 128 is longer than the 64 positions .*seq_len <= 64"
    ):
        preflight(cfg)
    preflight(_config(tmp_path, train={"init_from": str(model), "seq_len": 64}))


def test_labeled_columns_and_labels_are_checked_before_pretraining(tmp_path):
    """A labeled file without the text column, or whose test rows hold a label the train rows lack, is
    named before the pretraining the fine-tuning waits for (it used to fail after it)."""
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text("".join(json.dumps({"sentence": f"s{i}", "label": i % 2}) + "\n" for i in range(20)))
    section = {"data": {"path": str(labeled)}}
    with pytest.raises(ConfigError, match=r"finetune.data: .*labeled.jsonl: no column text; its columns are"):
        preflight(_config(tmp_path, finetune=section))
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"text": f"s{i}", "label": "neg"}) + "\n" for i in range(10)))
    test.write_text(
        json.dumps({"text": "t", "label": "neg"}) + "\n" + json.dumps({"text": "u", "label": "pos"})
    )
    section = {"data": {"splits": {"train": str(train), "validation": str(train), "test": str(test)}}}
    with pytest.raises(ConfigError, match=r"test.jsonl: row 2 \(test split\): label 'pos' is not one of"):
        preflight(_config(tmp_path, finetune=section))


def test_a_parquet_input_without_the_text_column_is_named_with_read_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "dump.parquet"
    pq.write_table(pa.table({"id": ["a"], "content": ["some text"]}), data)
    with pytest.raises(
        ConfigError,
        match=r"read.text_field: .*dump.parquet has no column 'text' \(its columns: id, content\)",
    ):
        preflight(_config(tmp_path, read={"paths": [str(data)]}))
    preflight(_config(tmp_path, read={"paths": [str(data)], "text_field": "content"}))


def test_validate_runs_the_cluster_pre_flight_run_does():
    """`lmforge validate` said "valid" for a worker group the embedded Ray could never place; `run`
    refused it. Both check it now (cluster_problems, with what the embedded Ray will have)."""
    from typer.testing import CliRunner

    from orchestration.cli import app

    demo = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    sets = ["--set", "ray.num_cpus=2", "--set", "train.cpus_per_worker=4"]
    refused = CliRunner().invoke(app, ["validate", demo, *sets])
    assert refused.exit_code == 2, refused.output
    assert "train.num_workers: 2 workers x 4 CPU(s) each need 8 CPUs; the Ray cluster has 2 CPUs" in " ".join(
        refused.output.split()
    )
    assert CliRunner().invoke(app, ["validate", demo, "--set", "ray.num_cpus=2"]).exit_code == 0


def test_a_worker_group_the_cluster_can_never_place(tmp_path):
    cfg = _config(tmp_path, train={"num_workers": 8})
    (problem,) = cluster_problems(cfg, {"CPU": 2.0, "memory": 1e9})
    assert problem.startswith("train.num_workers: 8 workers x 1 CPU(s) each need 8 CPUs")
    assert "the Ray cluster has 2 CPUs, 0 GPUs in all" in problem
    gpu = _config(tmp_path, train={"num_workers": 2, "use_gpu": True})
    assert "need 2 CPUs and 2 GPUs" in cluster_problems(gpu, {"CPU": 16.0})[0]
    assert cluster_problems(_config(tmp_path, train={"num_workers": 2}), {"CPU": 2.0}) == []


def test_stage_tasks_the_cluster_can_never_place(tmp_path):
    cfg = _config(
        tmp_path, ray={"resources": {"evaluate": {"gpus": 1}, "clean": {"cpus": 1, "memory_mb": 4096}}}
    )
    problems = cluster_problems(cfg, {"CPU": 2.0, "memory": 2**31}, train=False)
    assert problems == [
        "ray.resources.clean.memory_mb: each clean task asks for 4096 MB, the Ray cluster has 2048 MB in all, "
        "so it could never be placed; lower it or add nodes",
        "ray.resources.evaluate.gpus: each evaluate task asks for 1 GPU(s), the Ray cluster has 0 in all, "
        "so it could never be placed; lower it or add nodes",
    ]
    assert cluster_problems(cfg, {"CPU": 2.0, "GPU": 1.0, "memory": 2**33}, train=False) == []
    with pytest.raises(ConfigError, match="ray.resources: no stage trian"):
        _config(tmp_path, ray={"resources": {"trian": {"cpus": 1}}})


def test_the_pipeline_stops_before_its_first_stage(ray_session, tmp_path):
    cfg = _config(tmp_path, train={"num_workers": 8})
    with pytest.raises(ConfigError, match="the Ray cluster has 2 CPUs"):
        Pipeline(cfg).run()
    assert not (tmp_path / "work" / "crawl").exists()
    missing = _config(tmp_path, read={"paths": [str(tmp_path / "absent.jsonl")]})
    with pytest.raises(ConfigError, match="read.paths"):
        Pipeline(missing).run(until="clean")


def test_finetune_seq_len_longer_than_the_positions_of_its_base(tmp_path):
    import random

    from tests.fixtures import finetune_section, labeled_rows

    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text("\n".join(json.dumps(r) for r in labeled_rows(random.Random(0), 40)))

    def config(train, **ft):
        return _config(tmp_path, train=train, finetune=finetune_section(data={"path": str(labeled)}, **ft))

    # The train stage's own model has train.seq_len positions (a learned-position arch).
    bert = {"objective": "masked_lm", "model": {"arch": "bert"}, "seq_len": 32}
    with pytest.raises(
        ConfigError, match=r"finetune.seq_len: 64 is longer than the 32 positions of the model the"
    ):
        preflight(config(bert, seq_len=64))
    preflight(config(bert, seq_len=32))
    preflight(config({"objective": "span_corruption", "model": {"arch": "t5"}, "seq_len": 32}, seq_len=64))
    # A RoBERTa directory: two of its max_position_embeddings are the padding offset.
    model = tmp_path / "roberta"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "roberta", "max_position_embeddings": 66}))
    (model / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"finetune.seq_len: 65 is longer than the 64 positions"):
        preflight(config(bert, init_from=str(model), seq_len=65))
    preflight(config(bert, init_from=str(model), seq_len=64))


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a black-holed endpoint)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_an_unreachable_work_dir_or_tracking_server_is_named_within_a_bounded_time(
    tmp_path, silent_server, monkeypatch
):
    import time

    import orchestration.preflight as pre
    from tests.conftest import free_port

    monkeypatch.setattr(pre, "REACH_TIMEOUT_S", 3.0)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask the instance metadata address
    query = f"?endpoint_override=127.0.0.1:{silent_server}&scheme=http&region=us-east-1"
    cfg = _config(
        tmp_path,
        workdir=f"s3://AKIDX:SeCrEt42@bucket/run{query}",
        tracking={"uri": f"http://127.0.0.1:{silent_server}"},
    )
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert time.monotonic() - start < 2 * 3.0 + 3
    message = str(err.value)
    assert f"workdir: s3://***@bucket/run{query} cannot be reached (no answer within 3 s)" in message
    assert (
        f"tracking.uri: http://127.0.0.1:{silent_server} cannot be reached (no answer within 3 s)" in message
    )
    assert "SeCrEt42" not in message
    # `run` gives up as soon, before it takes the work dir's lock (a request to the same endpoint).
    start = time.monotonic()
    with pytest.raises(ConfigError, match="cannot be reached"):
        Pipeline(cfg).run()
    assert time.monotonic() - start < 2 * 3.0 + 3
    # Nothing listens: refused, with the error, at once.
    closed = free_port()
    refused = _config(tmp_path, tracking={"uri": f"http://127.0.0.1:{closed}"})
    with pytest.raises(
        ConfigError, match=rf"tracking.uri: http://127.0.0.1:{closed} cannot be reached \(URLError"
    ):
        preflight(refused)
