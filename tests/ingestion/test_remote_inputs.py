"""read.paths on an object store: a local S3 server (moto) that pyarrow's S3FileSystem talks HTTP to, as it
would to S3. Directories and globs expand to their files, Parquet reads from there, and the inputs' key
follows the objects' size and last-modified time."""

import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ingestion.readers import ReadConfig, read_corpus

pytestmark = pytest.mark.unit


def put_parquet(fs: pafs.FileSystem, path: str, texts: list[str]) -> None:
    table = pa.table({"id": [f"{path}-{i}" for i in range(len(texts))], "text": texts})
    with fs.open_output_stream(path) as out:
        pq.write_table(table, out)


@pytest.fixture
def corpus(s3_server):
    prefix, query = s3_server(f"corpus-{time.monotonic_ns()}")
    fs, bucket = pafs.FileSystem.from_uri(prefix + query)
    put_parquet(fs, f"{bucket}/dump/part-0.parquet", ["first document", "second document"])
    put_parquet(fs, f"{bucket}/dump/nested/part-1.parquet", ["third document"])
    with fs.open_output_stream(f"{bucket}/dump/notes.bin") as out:
        out.write(b"\0not a corpus file")
    return fs, bucket, prefix, query


def test_a_remote_directory_and_a_glob_expand_to_their_parquet_files(corpus):
    fs, bucket, prefix, query = corpus
    files = [f"{prefix}/dump/nested/part-1.parquet{query}", f"{prefix}/dump/part-0.parquet{query}"]
    assert ReadConfig(paths=[f"{prefix}/dump{query}"]).inputs() == files
    assert ReadConfig(paths=[f"{prefix}/dump/*.parquet{query}"]).inputs() == files[1:]
    assert (
        ReadConfig(paths=[f"{prefix}/dump/**/*.parquet{query}"]).inputs() == files
    )  # as glob(recursive=True)
    assert ReadConfig(paths=[f"{prefix}/dump/*/part-?.parquet{query}"]).inputs() == files[:1]
    texts = [t for f in files for b in read_corpus(f) for t in b.column("text").to_pylist()]
    assert texts == ["third document", "first document", "second document"]
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        ReadConfig(paths=[f"{prefix}/dump/*.jsonl{query}"]).inputs()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ReadConfig(paths=[f"{prefix}/missing{query}"]).inputs()


def test_the_inputs_key_follows_the_objects_size_and_mtime(corpus):
    fs, bucket, prefix, query = corpus
    config = ReadConfig(paths=[f"{prefix}/dump{query}"])
    before = config.fingerprint()
    info = fs.get_file_info(f"{bucket}/dump/part-0.parquet")
    assert (before[1][1], before[1][2]) == (info.size, info.mtime_ns) and info.size > 0
    assert config.fingerprint() == before  # nothing changed: the same key
    time.sleep(1.1)  # S3's last-modified has one-second resolution
    put_parquet(fs, f"{bucket}/dump/part-0.parquet", ["first document", "second document"])  # same bytes
    after = config.fingerprint()
    assert after[0] == before[0] and after[1][1] == before[1][1] and after[1][2] > before[1][2]
