"""Writing files so that they are complete or absent, and checksumming them: the one place for both.

Every output a run leaves (checkpoints, stores, predictions, embeddings, plots, result.json) is written
through :func:`atomic_write`: to a temporary name beside the target, flushed to disk, then renamed over
it. A crash leaves the old file or none, never half of one, which is what lets a rerun trust (after its
checksum) whatever it finds.

A process killed mid-write (``kill -9``, a lost node) leaves its temporary behind, and at paper scale one
is a 19 GB data store. The temporary's name says which process on which host wrote it, so that
:func:`remove_orphaned_temporaries` can delete those whose writer is gone, and only those: on a storage
shared by a cluster, another host's writer cannot be checked from here, so its temporaries are left alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is fsynced and renamed to
    ``path``, on error removed. The temporary name keeps the suffix (``.npy``, ``.png``), since some
    writers choose the format by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{_HOST}-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:  # name the file the caller meant, with its folder (not the temporary's bare name)
        raise type(err)(err.errno, err.strerror or str(err), str(path.resolve())) from err
    finally:
        tmp.unlink(missing_ok=True)


#: This host, short: the temporaries' names say where their writer ran.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(r"^\..+\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)(\.[^.]*)?$")


def remove_orphaned_temporaries(folder: str | Path) -> list[tuple[Path, int]]:
    """Delete the temporaries in ``folder`` (not below it) of writers on this host that are no longer
    running; return them with their sizes in bytes. A temporary of a live process, or of another host, is
    kept. (A pid reused by a new process keeps its orphan until that process ends too: a file kept too long,
    never one cut short.)"""
    removed = []
    for entry in Path(folder).glob(".*.tmp-*"):
        match = _TEMPORARY.match(entry.name)
        if match is None or match["host"] != _HOST or not entry.is_file() or _running(int(match["pid"])):
            continue
        try:
            size = entry.stat().st_size
            entry.unlink()
        except FileNotFoundError:  # another process cleaning the same folder
            continue
        removed.append((entry, size))
    return removed


def sweep_orphaned_temporaries(folder: str | Path) -> list[tuple[Path, int]]:
    """:func:`remove_orphaned_temporaries` in ``folder`` if it exists, saying in one line on stderr how
    many files it removed and their size (nothing when it removed none)."""
    folder = Path(folder)
    removed = remove_orphaned_temporaries(folder) if folder.is_dir() else []
    if removed:
        freed = sum(size for _, size in removed)
        size = f"{freed / 1e9:.1f} GB" if freed >= 1e9 else f"{freed / 1e6:.1f} MB"
        print(f"removed {len(removed)} unfinished file(s) in {folder} left by writers that were killed ({size})",
              file=sys.stderr, flush=True)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["atomic_write", "atomic_write_bytes", "file_sha256", "remove_orphaned_temporaries",
           "sweep_orphaned_temporaries"]
