"""Input a hostile but realistic user gives the grid (issue 14): refused before any work, with exit status 2,
one line that names the option or file and the value, and nothing written (no storage folder, no MLflow
store). Every case here was a traceback or a late library error before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grid.run_all import main


def write_inputs(folder: Path) -> None:
    (folder / "bad.yaml").write_text("name: [unclosed\n")
    (folder / "empty.yaml").write_text("")
    (folder / "dir.yaml").mkdir()
    (folder / "nostages.yaml").write_text("name: x\nstages:\n")
    (folder / "list.yaml").write_text("- a\n- b\n")
    (folder / "binary.yaml").write_bytes(bytes(range(128, 256)) * 4)
    (folder / "notes.txt").write_text("hello\n")
    torch.save({"weight": torch.zeros(20000)}, folder / "real.pt")
    (folder / "cut.pt").write_bytes((folder / "real.pt").read_bytes()[:20000])  # the first 20 kB of a checkpoint


CASES = [
    (["--preset", "bad.yaml"], "preset 'bad.yaml' is not valid YAML at line 2"),
    (["--preset", "empty.yaml"], "preset 'empty.yaml' is empty"),
    (["--preset", "dir.yaml"], "preset 'dir.yaml' is not a file"),
    (["--preset", "nostages.yaml"], "stages must be a mapping, got None (it is empty)"),
    (["--preset", "list.yaml"], "preset 'list.yaml' holds a list, not a mapping"),
    (["--preset", "binary.yaml"], "preset 'binary.yaml' is not a text file"),
    (["--preset", "paper", "--weights", "vggf_imagenet=notes.txt", "--from-scratch"], "drop --weights vggf_imagenet"),
    (["--preset", "paper", "--weights", "vggf_imagenet=notes.txt"], "notes.txt' as a state dict (KeyError"),
    (["--preset", "paper", "--weights", "vggf_imagenet=cut.pt"], "cut.pt' as a state dict"),
    (["--preset", "paper", "--weights", "vggf_imagenet=/dev/null"], "'/dev/null' for vggf_imagenet is not a regular file"),
    (["--preset", "paper", "--weights", "vggf_imagenet=dir.yaml"], "for vggf_imagenet is a folder"),
    (["--tracking-uri", "foo://bar"], "--tracking-uri 'foo://bar': unknown scheme 'foo'"),
    (["--tracking-uri", "file:///tmp/mlruns"], "MLflow 3 keeps its file store ('mlruns' folders) in maintenance mode"),
    (["--tracking-uri", "./mlruns"], "use a database, e.g. sqlite:///"),
    (["--tasks", "gender,gender"], "--tasks names gender more than once"),
    (["--archs", "vggf,vggf"], "--archs names vggf more than once"),
    (["--storage", "notes.txt/runs"], "notes.txt is a file, so no folder can be made under it"),
    (["--storage", "notes.txt"], "--storage 'notes.txt': exists and is not a folder"),
    (["--storage", "/proc/occkd/runs"], "--storage '/proc/occkd/runs': cannot create it"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_refused_with_one_line_and_nothing_written(tmp_path: Path, monkeypatch, capsys, args, message):
    write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # should anything get as far as Ray, fail rather than start one
    before = set(tmp_path.iterdir())
    argv = ["--tasks", "gender", "--archs", "vggf", *args]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err
    assert set(tmp_path.iterdir()) == before  # no occkd_runs/, no mlflow.db, no data store
