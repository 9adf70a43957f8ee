"""Where stage outputs live: a directory on a local disk or on any pyarrow filesystem (``s3://bucket/prefix``,
``gs://``, ``hdfs://``), so that the workers of a cluster without a shared disk read and write the same data.

A :class:`Store` names a directory by URI (a plain path is a local directory). Tasks write their files on
the node's own disk and the runner commits them into the store (core/tasks.py): on a local disk by a
rename, on an object store by one upload per file (an object appears whole when its upload completes, so
readers never see half a file either way). URIs keep their query (``?endpoint_override=...&scheme=http``)
for every path below them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from core.files import atomic_write_bytes, file_sha256, read_ipc
from core.redact import redact

_URI = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<rest>[^?]*)(?P<query>\?.*)?$")


def uri_scheme(value: str | Path) -> str | None:
    """The scheme of a URI (``s3``, ``file``), None for a plain path: the one test of "is it a URI"."""
    match = _URI.match(str(value))
    return match["scheme"] if match else None


def is_remote(value: str | Path) -> bool:
    """Whether ``value`` names a place on a filesystem other than this machine's (``file://`` is local)."""
    return uri_scheme(value) not in (None, "file")


def split_uri(uri: str) -> tuple[str, str, str]:
    """``scheme://path?query`` as (scheme, path, ``?query`` or ''); a glob's own ``?`` is no query."""
    scheme, rest = uri.split("://", 1)
    query = re.search(r"\?[A-Za-z_]\w*=[^?]*$", rest)
    if query is None:
        return scheme, rest, ""
    return scheme, rest[: query.start()], query.group()


def filesystem(where: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a URI or local path, and the path on it."""
    if uri_scheme(where) is None:
        return pafs.LocalFileSystem(), str(Path(where).resolve())
    return pafs.FileSystem.from_uri(str(where))


class RecordError(ValueError):
    """A JSON record that is there but damaged: names the file (credentials masked) and what is wrong."""

    def __init__(self, where: Store, reason: str):
        super().__init__(f"{where}: not readable JSON ({reason})")
        self.where, self.reason = where, reason


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
            self.root, self._scheme, self._query, self._auth, self.local = str(local), "", "", "", local
        else:
            self.fs, root = pafs.FileSystem.from_uri(text)
            self.root, self._scheme, self._query = root.rstrip("/"), match["scheme"], match["query"] or ""
            # Credentials in the URI (s3://KEY:SECRET@bucket) travel with it to every process that opens
            # it; str() and repr() mask them.
            head = match["rest"].split("/", 1)[0]
            self._auth = head.rsplit("@", 1)[0] + "@" if "@" in head else ""
            self.local = None

    @property
    def uri(self) -> str:
        """The URI (a plain path for a local directory) that names this directory anywhere, credentials
        included: never print it, print the Store (``str()`` masks them)."""
        if self.local is not None:
            return self.root
        return f"{self._scheme}://{self._auth}{self.root}{self._query}"

    @property
    def address(self) -> str:
        """The URI without its user info: where the directory is, whoever reads it."""
        if self.local is not None:
            return self.root
        return f"{self._scheme}://{self.root}{self._query}"

    def __str__(self) -> str:
        return redact(self.uri)

    def __repr__(self) -> str:
        return f"Store({redact(self.uri)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __reduce__(self):  # a filesystem is rebuilt from the URI in the process that unpickles it
        return Store, (self.uri,)

    def __truediv__(self, name: str) -> Store:
        if self.local is not None:
            return Store(self.local / name)
        return Store(f"{self._scheme}://{self._auth}{self.root}/{name.strip('/')}{self._query}")

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

    def stats_of(self, rel: str) -> tuple[int, int]:
        """(size, mtime in ns) of one file."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self / rel}: no such file")
        return info.size, info.mtime_ns or 0

    def size(self, rel: str) -> int:
        info = self.fs.get_file_info(self.path(rel))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self / rel}: no such file")
        return info.size

    def read_bytes(self, rel: str) -> bytes:
        if self.local is not None:
            return (self.local / rel).read_bytes()
        try:
            with self.fs.open_input_stream(self.path(rel), compression=None) as f:
                return f.read()
        except OSError:
            if not self.is_file(rel):
                raise FileNotFoundError(f"{self / rel}: no such file") from None
            raise

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_object(self, rel: str) -> dict | None:
        """A JSON object file: None when it is missing (the one rule for every record lmforge reads: manifests,
        task markers, key parts, run and model records); ValueError naming the file when it is not a JSON
        object (each caller says what a damaged one means: a manifest stops the run, a marker or a key's
        parts are written again)."""
        try:
            data = self.read_bytes(rel)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            value = json.loads(data)
        except ValueError as e:  # UnicodeDecodeError too
            raise RecordError(self / rel, str(e)) from None
        if not isinstance(value, dict):
            raise RecordError(self / rel, f"a JSON {type(value).__name__}, not an object")
        return value

    def read_json(self, rel: str) -> dict:
        """A record beside outputs (run.json, a model's record, a summary): ``{}`` when it is missing or
        damaged, which only leaves a report's or a walk's field empty."""
        try:
            return self.read_object(rel) or {}
        except ValueError:
            return {}

    def sha256(self, rel: str, chunk: int = 1 << 20) -> str:
        """The sha256 of a file, streamed (hex)."""
        if self.local is not None:
            return file_sha256(self.local / rel)
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path(rel), compression=None) as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()

    def open_input(self, rel: str = "") -> pa.NativeFile:
        """A random-access reader of ``rel`` (of this path itself when it names a file; ``read_at`` reads a
        range: one ranged GET on an object store)."""
        return self.fs.open_input_file(self.path(rel))

    def files(self, rel: str = "") -> list[str]:
        """Every file below ``rel``, as paths relative to this directory, sorted."""
        return sorted(self.stats(rel))

    def stats(self, rel: str = "") -> dict[str, tuple[int, int]]:
        """Every file below ``rel`` (relative to this directory) -> (size, mtime in ns): one listing call."""
        where = self.path(rel)
        if self.fs.get_file_info(where).type != pafs.FileType.Directory:
            return {}
        infos = self.fs.get_file_info(pafs.FileSelector(where, recursive=True))
        base = len(self.root) + 1
        return {i.path[base:]: (i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File}

    # -- writing ---------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file whole: readers see the old one or the new one, never a part."""
        if self.local is not None:
            atomic_write_bytes(self.local / rel, data)
            return
        with self.fs.open_output_stream(
            self.path(rel), compression=None
        ) as f:  # the object appears when the upload completes
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

    def upload(self, local_dir: Path, rel: str = "") -> list[str]:
        """Copy every file below ``local_dir`` to ``rel`` below this directory (nothing to do when it is
        that directory already); returns their paths relative to ``rel``."""
        names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
        target = self / rel if rel else self
        if target.local is not None and target.local == local_dir.resolve():
            return names
        for name in names:
            if target.local is not None:
                dst = target.local / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
                shutil.copyfile(local_dir / name, tmp)
                os.replace(tmp, dst)
            else:
                pafs.copy_files(
                    str(local_dir / name),
                    target.path(name),
                    source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=target.fs,
                )
        return names

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


def node_cache() -> Path:
    """This node's own directory for copies of remote data and for the local state of a run whose work dir
    is remote: ``$LMFORGE_CACHE``, else ``$XDG_CACHE_HOME/lmforge`` (``~/.cache/lmforge``)."""
    if env := os.environ.get("LMFORGE_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"


def node_dir(where: str | Path | Store, kind: str) -> Path:
    """A directory of this node's disk that stands for ``where``: itself when it is local, else one of
    the node cache's ``kind`` directories named by the URI's hash (the same on every call and node)."""
    store = Store(where)
    if store.local is not None:
        return store.local
    return node_cache() / kind / hashlib.sha256(store.address.encode()).hexdigest()[:16]


def local_copy(where: str | Path | Store, rel: str = "") -> Path:
    """A directory of this node's disk holding what ``where``/``rel`` holds: the directory itself when it
    is local, else a mirror in the node cache, brought up to date by downloading each file whose size
    or modification time differs (a mirrored file carries its object's mtime) and removing files gone.
    Each file is downloaded beside its place and renamed into it, so processes of one node can share
    a mirror."""
    store = Store(where)
    if rel:
        store = store / rel
    if store.local is not None:
        return store.local
    remote = store.stats()
    if not remote and not store.exists():
        raise FileNotFoundError(f"{store}: no such directory")
    mirror = _mirror(store, node_dir(store, "mirror"), remote)
    for old in [p for p in mirror.rglob("*") if p.is_file()]:
        if old.relative_to(mirror).as_posix() not in remote and ".part-" not in old.name:
            old.unlink(missing_ok=True)
    return mirror


def _mirror(store: Store, mirror: Path, remote: dict[str, tuple[int, int]]) -> Path:
    """Download each of ``remote`` (name -> size, mtime) into ``mirror`` unless its copy there matches."""
    for name, (size, mtime_ns) in remote.items():
        dst = mirror / name
        with contextlib.suppress(FileNotFoundError):
            st = dst.stat()
            if st.st_size == size and st.st_mtime_ns == mtime_ns:
                continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.part-{os.getpid()}")
        pafs.copy_files(
            store.path(name),
            str(tmp),
            source_filesystem=store.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, dst)
    return mirror


def local_file(where: str | Path) -> Path:
    """A file of this node's disk holding what the file ``where`` holds: itself when local, else its
    copy in the node cache (downloaded when its size or modification time differs)."""
    text = str(where)
    parent, _, name = text.split("?")[0].rpartition("/")
    query = text[len(text.split("?")[0]) :]
    store = Store(parent + query)
    if store.local is not None:
        return Path(where)
    if not store.is_file(name):
        raise FileNotFoundError(f"{redact(str(where))}: no such file")
    return _mirror(store, node_dir(text, "mirror"), {name: store.stats_of(name)}) / name


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
