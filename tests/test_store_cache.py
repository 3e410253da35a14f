"""Issue 28 item 6: a damaged cached store is found before it is used and rebuilt under the same name, so
under the same fingerprint and node hashes; --dry-run only says so; one that cannot be deleted is named in
one line, exit 2. Real files throughout: stores written by the code, damaged on disk, UTKFace folders of
real JPEGs under UTKFace's own file names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
from test_bad_input import run_main, write_utkface

from grid.data import prepare_data
from occkd_core.data import write_face_store
from occkd_core.data.cache import record_path, reuse_cached_store
from occkd_core.data.sources import prepare_synthetic_data
from occkd_core.data.synthetic import make_synthetic_faces
from occkd_core.presets import load_preset

SMOKE_GENERATOR = "the synthetic generator (2400 faces, 32 px, seed 0)"


def truncate(path: Path) -> str:
    """Keep the first half, as a full disk or an interrupted copy leaves it; return the reason expected."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    return f"truncated: {size // 2:,} bytes, {size:,} when it was written"


def flip_middle_bytes(path: Path) -> str:
    """Invert 16 bytes in the middle of the file (pixels), in place: same size, same footer."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        block = handle.read(16)
        handle.seek(-len(block), os.SEEK_CUR)
        handle.write(bytes(255 - byte for byte in block))
    return "its sha256 differs from the one recorded when it was written: bytes changed"


DAMAGES = [truncate, flip_middle_bytes]


def damage_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "is damaged" in line]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__)
def test_a_damaged_synthetic_store_is_rebuilt_under_its_fingerprint(tmp_path: Path, capsys, damage: Callable):
    preset = load_preset("smoke")
    first = prepare_data(preset, ["gender", "age"], tmp_path, archs=())
    store = first["gender"].path
    original = store.read_bytes()
    reason = damage(store)
    capsys.readouterr()
    again = prepare_data(preset, ["gender", "age"], tmp_path, archs=())
    # The same path, fingerprint and training size: the graph gets the same data_fingerprints, so the same node hashes.
    assert again == first
    assert store.read_bytes() == original  # the generator is seeded: the very bytes of the first store
    assert damage_lines(capsys.readouterr().err) == [
        f"data store {store} is damaged ({reason}); rebuilding it from {SMOKE_GENERATOR}"]
    assert prepare_data(preset, ["gender"], tmp_path, archs=())["gender"] == first["gender"]
    assert damage_lines(capsys.readouterr().err) == []  # sound again


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda damage: damage.__name__)
def test_a_damaged_utkface_store_is_converted_again_under_its_fingerprint(tmp_path: Path, capsys, damage: Callable):
    """Before, the run's first data check opened the damaged store and exited 2 on every rerun."""
    folder = tmp_path / "data" / "utkface" / "UTKFace"
    write_utkface(folder, 60)
    preset, storage = load_preset("mini"), tmp_path / "storage"
    first = prepare_data(preset, ["gender", "age"], storage, tmp_path / "data", archs=())
    store = first["gender"].path
    assert first["age"].path == store and store.name.startswith("utkface-")
    original = store.read_bytes()
    reason = damage(store)
    capsys.readouterr()
    again = prepare_data(preset, ["gender", "age"], storage, tmp_path / "data", archs=())
    assert again == first and store.read_bytes() == original
    # gender and age share the store: converted once, said once
    assert damage_lines(capsys.readouterr().err) == [
        f"data store {store} is damaged ({reason}); rebuilding it from {folder}"]


def test_the_dry_run_says_the_store_will_be_rebuilt_and_writes_nothing(tmp_path: Path, capsys):
    folder = tmp_path / "data" / "utkface" / "UTKFace"
    write_utkface(folder, 60)
    storage = tmp_path / "storage"
    first = prepare_data(load_preset("mini"), ["age"], storage, tmp_path / "data", archs=())["age"]
    reason = truncate(first.path)
    files = {path: path.read_bytes() for path in (storage / "data").iterdir()}
    capsys.readouterr()
    dry = prepare_data(load_preset("mini"), ["age"], storage, tmp_path / "data", archs=(), write=False)["age"]
    assert (dry.path, dry.fingerprint, dry.num_train) == (first.path, first.fingerprint, 0)  # 0: as before a conversion
    assert damage_lines(capsys.readouterr().err) == [
        f"data store {first.path} is damaged ({reason}); it will be rebuilt from {folder}"]
    assert {path: path.read_bytes() for path in (storage / "data").iterdir()} == files


def test_run_all_dry_run_says_it_in_one_line_and_leaves_the_store(tmp_path: Path, monkeypatch, capsys):
    store = prepare_data(load_preset("smoke"), ["gender"], tmp_path / "occkd_runs", archs=())["gender"].path
    reason = flip_middle_bytes(store)
    damaged = store.read_bytes()
    capsys.readouterr()
    code, err = run_main(tmp_path, monkeypatch, capsys, ["--preset", "smoke", "--tasks", "gender", "--archs", "vggf",
                                                         "--storage", "occkd_runs", "--dry-run"])
    assert code == 0 and "Traceback" not in err, err
    assert damage_lines(err) == [f"data store {store} is damaged ({reason}); it will be rebuilt from {SMOKE_GENERATOR}"]
    assert store.read_bytes() == damaged


@contextmanager
def undeletable(path: Path) -> Iterator[None]:
    """``path`` cannot be deleted or replaced while inside, even by root: the immutable attribute."""
    try:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot make {path} immutable here (chattr +i: {err})")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_damaged_store_that_cannot_be_deleted_is_named_in_one_line_with_exit_2(tmp_path: Path, monkeypatch, capsys):
    store = prepare_data(load_preset("smoke"), ["gender"], tmp_path / "occkd_runs", archs=())["gender"].path
    reason = truncate(store)
    capsys.readouterr()
    args = ["--preset", "smoke", "--tasks", "gender", "--archs", "vggf", "--storage", "occkd_runs"]
    with undeletable(store):
        code, err = run_main(tmp_path, monkeypatch, capsys, args)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err, err
    assert errors == [f"error: data store {store} is damaged ({reason}) and cannot be deleted here (Operation not "
                      "permitted); delete it, and the next run rebuilds it"], err


def _wait_for_the_file_systems_clock_to_pass(path: Path) -> None:
    """Until a file written now gets a later time than ``path``'s ctime (file times advance by clock ticks)."""
    probe = path.with_name("clock-probe")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        probe.write_bytes(b"")
        if probe.stat().st_mtime_ns > path.stat().st_ctime_ns:
            break
    probe.unlink()


def test_a_recorded_check_holds_until_the_file_changes_and_touch_cannot_hide_a_change(tmp_path: Path, capsys):
    """The full read is recorded with the store's stat; a later check with the same stat reads no pixel
    (shown by a wrong digest put into the record going unnoticed), and any write, even one whose times
    are set back, moves ctime and gets the store read again."""
    path = prepare_synthetic_data(60, 24, 0, tmp_path).path
    _wait_for_the_file_systems_clock_to_pass(path)
    assert reuse_cached_store(path, write=True, sources="its generator")  # read in full, recorded after its ctime
    record = json.loads(record_path(path).read_text())
    assert record["checked"]["ctime_ns"] < record_path(path).stat().st_mtime_ns
    record_path(path).write_text(json.dumps({**record, "sha256": "0" * 64}))
    assert reuse_cached_store(path, write=False, sources="its generator")  # the stamp holds: not read
    status = path.stat()
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))  # the same times set again: only ctime moves
    capsys.readouterr()
    assert not reuse_cached_store(path, write=False, sources="its generator")
    assert damage_lines(capsys.readouterr().err) == [
        f"data store {path} is damaged (its sha256 differs from the one recorded when it was written: bytes "
        "changed); it will be rebuilt from its generator"]


def test_stores_from_before_records_are_kept_if_readable_and_rebuilt_if_not(tmp_path: Path, capsys):
    """A store written before this check existed has no record: a readable one is kept (its digest recorded
    by the first run that may write), an unreadable one rebuilt; an unreadable record means a rebuild too."""
    expected = prepare_synthetic_data(60, 24, 0, tmp_path / "new").path.read_bytes()
    path = tmp_path / "old" / prepare_synthetic_data(60, 24, 0, tmp_path / "new").path.name
    write_face_store(path, make_synthetic_faces(60, image_size=24, seed=0))  # as the code before records wrote it
    assert not record_path(path).exists()
    assert prepare_synthetic_data(60, 24, 0, tmp_path / "old", write=False).path == path
    assert not record_path(path).exists()  # --dry-run writes nothing
    prepare_synthetic_data(60, 24, 0, tmp_path / "old")
    assert json.loads(record_path(path).read_text())["size"] == path.stat().st_size  # recorded, not rebuilt
    assert damage_lines(capsys.readouterr().err) == []

    record_path(path).unlink()
    truncate(path)
    prepare_synthetic_data(60, 24, 0, tmp_path / "old")
    assert path.read_bytes() == expected
    (line,) = damage_lines(capsys.readouterr().err)
    assert line.startswith(f"data store {path} is damaged (the file is not an Arrow IPC file")

    record_path(path).write_text("{")
    prepare_synthetic_data(60, 24, 0, tmp_path / "old")
    assert path.read_bytes() == expected
    (line,) = damage_lines(capsys.readouterr().err)
    assert f"is damaged (its record {record_path(path).name} is unreadable: " in line


WRITER = """
import sys, time
from occkd_core.files import atomic_write
with atomic_write(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 1_000_000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_a_killed_conversions_temporary_is_removed_and_a_live_writers_is_kept(tmp_path: Path, capsys):
    """A writer SIGKILLed mid-write leaves its temporary (at paper scale a 19 GB store); the next run that
    prepares data there deletes it, says so in one line, and keeps what a live writer or another host wrote."""
    cache = tmp_path / "data"
    cache.mkdir()
    killed = subprocess.Popen([sys.executable, "-c", WRITER, str(cache / "fer-0123.arrow")], stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", WRITER, str(cache / "age-4567.arrow")], stdout=subprocess.PIPE, text=True)
    try:
        orphan, running = Path(killed.stdout.readline().strip()), Path(live.stdout.readline().strip())
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert orphan.exists() and running.exists()
        elsewhere = cache / ".gender-89ab.tmp-00000000-1.arrow"  # another host's writer: not checkable here
        elsewhere.write_bytes(b"y")
        capsys.readouterr()
        prepare_synthetic_data(240, 32, 0, cache)
        assert not orphan.exists() and running.exists() and elsewhere.exists()
        err = capsys.readouterr().err
        assert f"removed 1 unfinished file(s) in {cache} left by writers that were killed (1.0 MB)" in err
        prepare_synthetic_data(240, 32, 0, cache, write=False)  # --dry-run: removes nothing, says nothing
        assert running.exists() and "removed" not in capsys.readouterr().err
    finally:
        live.kill()
        live.wait(timeout=30)
        killed.kill()


def test_a_killed_trainers_checkpoint_temporary_is_removed_when_its_node_runs_again(tmp_path: Path, capsys):
    """A trainer SIGKILLed while it replaced ``last.pt`` leaves the temporary beside it (a whole checkpoint);
    the node's next attempt, preparing its folder, deletes it and keeps the finished ``last.pt`` it resumes
    from, a live writer's temporary, and another host's."""
    from grid.artifacts import TRAIN_DIR, node_dir
    from grid.nodes import fresh_node_dir

    storage, node_hash = tmp_path / "runs", "0123456789abcdef"
    train = node_dir(storage, node_hash) / TRAIN_DIR
    train.mkdir(parents=True)
    (train / "last.pt").write_bytes(b"the epoch before")
    killed = subprocess.Popen([sys.executable, "-c", WRITER, str(train / "last.pt")], stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", WRITER, str(train.parent / "predictions.parquet")],
                            stdout=subprocess.PIPE, text=True)
    try:
        orphan, running = Path(killed.stdout.readline().strip()), Path(live.stdout.readline().strip())
        assert orphan.parent == train and orphan.name.startswith(".last.tmp-") and orphan.suffix == ".pt"
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        elsewhere = train / ".best.tmp-00000000-1.pt"
        elsewhere.write_bytes(b"y")
        capsys.readouterr()
        assert fresh_node_dir(storage, node_hash) == train.parent
        assert not orphan.exists() and running.exists() and elsewhere.exists()
        assert (train / "last.pt").read_bytes() == b"the epoch before"
        assert f"removed 1 unfinished file(s) in {train} left by writers that were killed (1.0 MB)" in capsys.readouterr().err
        fresh_node_dir(storage, node_hash)  # nothing left to remove: says nothing
        assert "removed" not in capsys.readouterr().err
    finally:
        for process in (live, killed):
            process.kill()
            process.wait(timeout=30)
