"""One grid per storage at a time: an OS file lock on ``<storage>/.occkd.lock``.

Two drivers on one storage would train the same nodes twice and close each other's live MLflow runs
(issue 14). The lock is ``fcntl.flock``: the kernel drops it when the holding process dies, however it
dies, so a killed driver cannot leave it stuck (a marker file could). On NFS, Linux maps ``flock`` to
POSIX byte-range locks, which the NFS lock manager honours across machines. The file also says who holds
it (host, pid, start time), for the message the second driver prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

LOCK_NAME = ".occkd.lock"


class StorageBusy(RuntimeError):
    """Another driver holds the storage's lock."""


@dataclass
class StorageLock:
    """Held for the life of a grid invocation; :meth:`release` (or the process's exit) frees it."""

    path: Path
    file: IO[str]

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def driver_identity() -> dict[str, Any]:
    """Who this driver is: host, pid and when the process started (a pid alone can be reused)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def describe_holder(holder: dict[str, Any]) -> str:
    started = holder.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "an unknown time"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


def acquire(storage: Path, *, wait: bool = False, on_wait: Any = None) -> StorageLock:
    """Take the storage's lock; StorageBusy naming the holder if another driver has it (``wait``: block
    until it is free, calling ``on_wait(holder)`` once first)."""
    storage.mkdir(parents=True, exist_ok=True)
    path = storage / LOCK_NAME
    file = open(path, "a+")  # noqa: SIM115 - held open for the life of the lock
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(path)
        if not wait:
            file.close()
            raise StorageBusy(f"another grid is running on --storage {str(storage)!r} ({describe_holder(holder)}); "
                              f"wait for it, stop it, or pass --wait to start when it ends") from None
        if on_wait is not None:
            on_wait(holder)
        fcntl.flock(file, fcntl.LOCK_EX)
    file.seek(0)
    file.truncate()
    file.write(json.dumps({**driver_identity(), "started_at": time.time()}))
    file.flush()
    return StorageLock(path=path, file=file)


def read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def driver_alive(identity: dict[str, Any]) -> bool | None:
    """Whether the driver a run names still runs: True / False on this host, None for another host."""
    if identity.get("host") != socket.gethostname():
        return None
    pid = int(identity.get("pid", -1))
    if pid <= 0:
        return False
    start = _process_start(pid)
    return start is not None and start == identity.get("started")


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])
