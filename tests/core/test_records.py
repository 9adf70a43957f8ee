"""One rule for the JSON records lmforge reads (core/storage.py ``Store.read_object``): missing is None,
damaged is an error naming the file, and each reader says what a damaged one means; one test of "is it
a URI"."""

import pytest

from core.manifest import ManifestError, read_index
from core.storage import RecordError, Store, is_remote, split_uri, uri_scheme
from core.tasks import TaskId, read_marker
from orchestration.plan import PARTS_FILE, read_parts
from training.data.tokenize import PREPARED, load_prepared

pytestmark = pytest.mark.unit


def test_a_record_is_none_when_missing_and_an_error_naming_it_when_damaged(tmp_path):
    store = Store(tmp_path)
    (tmp_path / "ok.json").write_text('{"a": 1}')
    (tmp_path / "cut.json").write_text('{"a": ')
    (tmp_path / "list.json").write_text("[1, 2]")
    assert store.read_object("ok.json") == {"a": 1} and store.read_object("missing.json") is None
    with pytest.raises(RecordError, match=rf"{tmp_path / 'cut.json'}: not readable JSON \(Expecting value"):
        store.read_object("cut.json")
    with pytest.raises(RecordError, match=r"list.json: not readable JSON \(a JSON list, not an object\)"):
        store.read_object("list.json")
    # A record beside outputs is {} when missing or damaged; the readers of the other records:
    assert [store.read_json(n) for n in ("ok.json", "missing.json", "cut.json", "list.json")] == [
        {"a": 1},
        {},
        {},
        {},
    ]
    for name, reader in ((PARTS_FILE, read_parts), (PREPARED, load_prepared)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        assert reader(tmp_path) is None  # missing
        (tmp_path / name).write_text("{")
        assert reader(tmp_path) is None  # damaged: the key's reasons, the tokenizer pass are made again
    assert read_marker(tmp_path, TaskId(part="p0")) is None
    (tmp_path / "p0.json").write_text("{")
    with pytest.raises(RecordError):  # a task's result: never guessed
        read_marker(tmp_path, TaskId(part="p0"))
    assert read_index(tmp_path / "nothing") is None
    (tmp_path / "index.json").write_text("[]")
    with pytest.raises(
        ManifestError, match=r"index.json: not a readable manifest \(a JSON list, not an object\)"
    ):
        read_index(tmp_path)


def test_one_test_says_what_is_a_uri_and_what_is_remote():
    assert uri_scheme("s3://bucket/key") == "s3" and uri_scheme("file:///tmp/x") == "file"
    assert uri_scheme("/tmp/x") is None and uri_scheme("relative/dir") is None
    assert is_remote("s3://bucket/key") and not is_remote("file:///tmp/x") and not is_remote("/tmp/x")
    assert split_uri("s3://b/dir/x.parquet?endpoint_override=127.0.0.1:9000") == (
        "s3", "b/dir/x.parquet", "?endpoint_override=127.0.0.1:9000"
    )  # fmt: skip
    assert split_uri("s3://b/part-?.parquet") == ("s3", "b/part-?.parquet", "")  # a glob's ? is no query
