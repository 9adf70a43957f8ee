"""Where stage outputs live: a directory on a local disk or on any pyarrow filesystem (``s3://bucket/prefix``,
``gs://``, ``hdfs://``), so that the workers of a cluster without a shared disk read and write the same data.

A :class:`Store` names a directory by URI (a plain path is a local directory). Tasks write their files on
the node's own disk and the runner commits them into the store (core/tasks.py): on a local disk by a
rename, on an object store by one upload per file (an object appears whole when its upload completes, so
readers never see half a file either way). URIs keep their query (``?endpoint_override=...&scheme=http``)
for every path below them.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from core.files import atomic_write_bytes, read_ipc

_URI = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<rest>[^?]*)(?P<query>\?.*)?$")


class Store:
    """A directory, local or on a pyarrow filesystem; ``store / "name"`` is the one below it."""

    def __init__(self, where: str | Path | Store):
        if isinstance(where, Store):
            where = where.uri
        text = str(where)
        match = _URI.match(text)
        if match is None or match["scheme"] == "file":
            local = Path(match["rest"] if match else text).resolve()
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root, self._scheme, self._query, self.local = str(local), "", "", local
        else:
            self.fs, root = pafs.FileSystem.from_uri(text)
            self.root, self._scheme, self._query = root.rstrip("/"), match["scheme"], match["query"] or ""
            self.local = None

    @property
    def uri(self) -> str:
        """The URI (a plain path for a local directory) that names this directory anywhere."""
        return self.root if self.local is not None else f"{self._scheme}://{self.root}{self._query}"

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __reduce__(self):  # a filesystem is rebuilt from the URI in the process that unpickles it
        return Store, (self.uri,)

    def __truediv__(self, name: str) -> Store:
        if self.local is not None:
            return Store(self.local / name)
        return Store(f"{self._scheme}://{self.root}/{name.strip('/')}{self._query}")

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` below this directory."""
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, rel: str) -> str:
        """The URI of the file ``rel`` below this directory (a local path for a local one)."""
        return (self / rel).uri

    # -- reading ---------------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def size(self, rel: str) -> int:
        info = self.fs.get_file_info(self.path(rel))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self.uri_of(rel)}: no such file")
        return info.size

    def read_bytes(self, rel: str) -> bytes:
        if self.local is not None:
            return (self.local / rel).read_bytes()
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except OSError:
            if not self.is_file(rel):
                raise FileNotFoundError(f"{self.uri_of(rel)}: no such file") from None
            raise

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open_input(self, rel: str = "") -> pa.NativeFile:
        """A random-access reader of ``rel`` (of this path itself when it names a file; ``read_at`` reads a
        range: one ranged GET on an object store)."""
        return self.fs.open_input_file(self.path(rel))

    def files(self, rel: str = "") -> list[str]:
        """Every file below ``rel``, as paths relative to this directory, sorted."""
        where = self.path(rel)
        if self.fs.get_file_info(where).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(where, recursive=True))
        base = len(self.root) + 1
        return sorted(i.path[base:] for i in infos if i.type == pafs.FileType.File)

    # -- writing ---------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file whole: readers see the old one or the new one, never a part."""
        if self.local is not None:
            atomic_write_bytes(self.local / rel, data)
            return
        with self.fs.open_output_stream(self.path(rel)) as f:  # the object appears when the upload completes
            f.write(data)

    def append_bytes(self, rel: str, data: bytes) -> None:
        """Add to the end of a file (an object store rewrites the object: for small files such as logs)."""
        if self.local is not None:
            path = self.local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.write(data)
            return
        old = self.read_bytes(rel) if self.is_file(rel) else b""
        self.write_bytes(rel, old + data)

    def put(self, local_file: Path, rel: str) -> None:
        """Move a file of this node's disk into place at ``rel`` (a rename when both are local)."""
        if self.local is not None:
            dst = self.local / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(local_file, dst)
            except OSError:  # another disk: copy beside the target, then rename
                tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
                shutil.copyfile(local_file, tmp)
                os.replace(tmp, dst)
                local_file.unlink()
            return
        pafs.copy_files(
            str(local_file),
            self.path(rel),
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )
        local_file.unlink()

    def remove(self, rel: str) -> None:
        """Delete one file; a missing one is not an error."""
        if self.is_file(rel):
            self.fs.delete_file(self.path(rel))

    def rmtree(self, rel: str = "") -> None:
        """Delete a directory and everything below it; a missing one is not an error."""
        if self.local is not None:
            shutil.rmtree(self.local / rel if rel else self.local, ignore_errors=True)
        elif self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))


def open_input_file(where: str | Path) -> pa.NativeFile:
    """A random-access reader of a local path or a filesystem URI."""
    return Store(where).open_input()


def read_arrow(where: str | Path | Store) -> pa.Table:
    """An Arrow IPC file: memory-mapped on a local disk, read whole from a remote filesystem."""
    store = Store(where)
    if store.local is not None:
        return read_ipc(store.local)
    with store.open_input() as f:
        return pa.ipc.open_file(f).read_all()
