"""Cached stores, checked before they are reused: a damaged store is rebuilt, never trained on.

A store in the cache is named by what it is made from (the sources' checksums, or the synthetic
generator's settings), and that name is the data's fingerprint in every node hash: a store rebuilt
from the same sources takes the same name, so the grid's node hashes stay the same. Its bytes are
what is checked here. Beside ``NAME.arrow`` lies ``NAME.arrow.sha256.json``, the store's size and
sha256 recorded when it was written.

Why a size, a digest and a stamp. Truncation (a full disk, an interrupted copy of the cache) shows in
the size, at no cost. A changed byte shows only by reading every byte, and the paper's FER+ ∪
AffectNet store is ~19 GB: 17 s at sha256's 1.1 GB/s from the page cache, minutes from a network file
system, on every rerun. So a full check is recorded with the file's size, mtime, ctime and inode, and
until one of them changes the store counts as checked (its Arrow footer is still read, O(1)). Any
write through the file system moves ctime, which no tool can set back (``touch`` sets mtime only); a
store changed within the same clock tick as its last check is hashed again (git's "racy clean" rule:
the stamp counts only if the store's ctime is older than the record file itself). Not caught after the
first check: a disk that flips bits under a file nobody wrote.

A store from before these records (no record file) is checked by its Arrow footer alone, then hashed
and recorded by the first run that may write (not --dry-run).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow as pa

from occkd_core.data.store import FaceData, open_face_store, write_face_store
from occkd_core.files import atomic_write_bytes, file_sha256, sweep_orphaned_temporaries

RECORD_SUFFIX = ".sha256.json"


class DamagedStoreError(ValueError):
    """A damaged cached store that cannot be removed here, so it cannot be rebuilt; the message names it."""


def record_path(store: Path) -> Path:
    """The record of ``store``'s size and sha256, beside it."""
    return store.with_name(store.name + RECORD_SUFFIX)


def write_cached_store(path: Path, data: FaceData) -> Path:
    """:func:`write_face_store` (atomic), then the record of its size and sha256.

    The old record goes first: a crash in between leaves a store without a record (checked as one from
    before records), never a record that vouches for other bytes."""
    path = Path(path)
    record_path(path).unlink(missing_ok=True)
    write_face_store(path, data)
    status = path.stat()
    _write_record(path, status, file_sha256(path))
    return path


def reuse_cached_store(path: Path, *, write: bool, sources: str) -> bool:
    """Whether the cached store at ``path`` can be used as it is: False when there is none, or when it is
    damaged. A damaged store is said in one line on stderr (which file, why, and that it will be rebuilt
    from ``sources``); with ``write`` it is deleted with its record, for the caller to write it again, and
    a sound one gets its check recorded. Without ``write`` nothing is changed (--dry-run).

    Raises :class:`DamagedStoreError` (a ValueError) naming the file to delete when it cannot be deleted.
    """
    path = Path(path)
    if write:  # a conversion killed mid-write left its temporary (GBs at paper scale)
        sweep_orphaned_temporaries(path.parent)
    try:
        status = path.stat()
    except FileNotFoundError:
        return False
    damage, digest = _check(path, status)
    if damage is None:
        if write and not _stamp_holds(path, status):
            _write_record(path, status, digest or file_sha256(path))
        return True
    identity = (str(path.resolve()), *_stamp(status).values())
    if identity not in _REPORTED:
        _REPORTED.add(identity)
        print(f"data store {path} is damaged ({damage}); {'rebuilding it' if write else 'it will be rebuilt'} "
              f"from {sources}", file=sys.stderr, flush=True)
    if write:
        try:
            path.unlink()
            record_path(path).unlink(missing_ok=True)
        except OSError as err:
            raise DamagedStoreError(f"data store {path} is damaged ({damage}) and cannot be deleted here "
                                    f"({err.strerror}); delete it, and the next run rebuilds it") from None
    return False


#: Damaged stores (by path and stat) already said in this process: a grid checks its data once before
#: taking the storage lock and again under it, and the damage is said once.
_REPORTED: set[tuple[object, ...]] = set()


def _stamp(status: os.stat_result) -> dict[str, int]:
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "ctime_ns": status.st_ctime_ns,
            "inode": status.st_ino}


def _write_record(path: Path, status: os.stat_result, digest: str) -> None:
    record = {"size": status.st_size, "sha256": digest, "checked": _stamp(status)}
    atomic_write_bytes(record_path(path), json.dumps(record, indent=1).encode())


def _read_record(path: Path) -> dict | None:
    """The record of ``path`` (None when there is none); ValueError if it is unreadable."""
    try:
        record = json.loads(record_path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"its record {record_path(path).name} is unreadable: {err}") from None
    if not (isinstance(record, dict) and type(record.get("size")) is int and isinstance(record.get("sha256"), str)):
        raise ValueError(f"its record {record_path(path).name} holds no size and sha256")
    return record


def _stamp_holds(path: Path, status: os.stat_result) -> bool:
    """Whether the store is unchanged since a full check recorded with ``status``'s stamp (module docstring)."""
    try:
        record = _read_record(path)
        recorded_at = record_path(path).stat().st_mtime_ns
    except (ValueError, OSError):
        return False
    return (record is not None and record.get("checked") == _stamp(status)
            and status.st_ctime_ns < recorded_at)


def _check(path: Path, status: os.stat_result) -> tuple[str | None, str | None]:
    """(what is wrong with the store or None, its sha256 if it was read)."""
    digest = None
    try:
        record = _read_record(path)
    except ValueError as err:
        return str(err), None
    if record is not None:
        if status.st_size != record["size"]:
            change = "truncated" if status.st_size < record["size"] else "grown"
            return f"{change}: {status.st_size:,} bytes, {record['size']:,} when it was written", None
        if not _stamp_holds(path, status):
            digest = file_sha256(path)
            if digest != record["sha256"]:
                return "its sha256 differs from the one recorded when it was written: bytes changed", None
    try:
        open_face_store(path)  # O(1): the footer and each split's row count
    except (ValueError, pa.ArrowException) as err:
        return str(err).replace(str(path), "the file"), None
    except KeyError as err:
        return f"its schema metadata lacks {err}", None
    return None, digest


__all__ = ["RECORD_SUFFIX", "DamagedStoreError", "record_path", "reuse_cached_store", "write_cached_store"]
