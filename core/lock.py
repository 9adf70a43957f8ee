"""One run per work dir: an exclusive lock a run holds while it writes there.

On a local disk the lock is ``flock`` on ``WORKDIR/.lmforge.lock`` (the kernel drops it when the holder
exits, however it exits, so a stale lock never needs cleaning up); the file names the holder for the
message a second run gets. On an object store, which has no locks, it is a lease: ``.lmforge.lock``
holds the holder and an expiry that the holder renews every third of the lease; a run finding a lease
that has not expired refuses, one finding an expired lease takes it over (writes its own, then reads it
back to make sure no one else wrote in between).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from core.storage import Store

LOCK_FILE = ".lmforge.lock"
#: How long a lease on an object store lasts without being renewed.
LEASE_SECONDS = 60.0


class WorkdirLocked(RuntimeError):
    """Another run holds the work dir."""


def _holder(command: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "token": uuid.uuid4().hex,
    }


def _refusal(store: Store, holder: dict[str, Any]) -> WorkdirLocked:
    return WorkdirLocked(
        f"work dir {store} is in use by another run: {holder.get('command', 'lmforge')} (pid {holder.get('pid')} "
        f"on {holder.get('host')}, since {holder.get('since')}); wait for it to end, or give this run another "
        "workdir"
    )


@contextlib.contextmanager
def workdir_lock(
    store: Store | str, command: str = "lmforge run", lease: float = LEASE_SECONDS
) -> Iterator[None]:
    """Hold the work dir for the block, or raise WorkdirLocked naming the run that holds it."""
    store = Store(store)
    if store.local is not None:
        with _local_lock(store, command):
            yield
    else:
        with _lease(store, command, lease):
            yield


@contextlib.contextmanager
def _local_lock(store: Store, command: str) -> Iterator[None]:
    store.local.mkdir(parents=True, exist_ok=True)
    fd = os.open(store.local / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:  # the holder is still writing its name
                holder = {}
            raise _refusal(store, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(command)).encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock


@contextlib.contextmanager
def _lease(store: Store, command: str, lease: float) -> Iterator[None]:
    mine = _holder(command)

    def write() -> None:
        store.write_bytes(LOCK_FILE, json.dumps({**mine, "expires": time.time() + lease}).encode())

    def current() -> dict[str, Any] | None:
        try:
            return json.loads(store.read_bytes(LOCK_FILE))
        except (FileNotFoundError, ValueError):
            return None

    held = current()
    if held is not None and held.get("expires", 0) > time.time():
        raise _refusal(store, held)
    write()
    time.sleep(min(1.0, lease / 10))  # another run taking over the same expired lease writes in this time
    held = current()
    if held is None or held.get("token") != mine["token"]:
        raise _refusal(store, held or {})
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease / 3):
            with contextlib.suppress(OSError):
                write()

    thread = threading.Thread(target=renew, name="lmforge-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError):
            if (current() or {}).get("token") == mine["token"]:
                store.remove(LOCK_FILE)
