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
    # Preset values that passed --dry-run before and failed at run time, wrote outside --storage, or took
    # minutes and gigabytes to read (issue 28 items 8-10).
    (folder / "oldkey.yaml").write_text("extends: smoke\nresources: {vggf: {cpus: 1, max_workers: 2}}\n")
    (folder / "epochs.yaml").write_text("extends: smoke\nstage_defaults: {student: {epochs: 1.5}}\n")
    (folder / "nan.yaml").write_text("extends: smoke\nstages: {gender: {vggf: {triplet_kd: {margin: [0.1, .nan]}}}}\n")
    (folder / "seed.yaml").write_text("extends: smoke\ndata: {seed: -1}\n")
    (folder / "escape.yaml").write_text('extends: smoke\nname: "x/../../../../tmp/escape"\n')
    bomb = ['_a0: &a0 ["lol"]'] + [f"_a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (folder / "bomb.yaml").write_text("extends: smoke\n" + "\n".join(bomb) + "\ndescription: *a9\n")  # 9**9 values
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
    (["--tracking-uri", "sqlite:///notes.txt"], "notes.txt is not an SQLite database"),
    (["--tasks", "gender,gender"], "--tasks names gender more than once"),
    (["--archs", "vggf,vggf"], "--archs names vggf more than once"),
    (["--storage", "notes.txt/runs"], "notes.txt is a file, so no folder can be made under it"),
    (["--storage", "notes.txt"], "--storage 'notes.txt': exists and is not a folder"),
    (["--storage", "/proc/occkd/runs"], "--storage '/proc/occkd/runs': cannot create it"),
    (["--preset", "epochs.yaml"], "preset epochs.yaml: stage_defaults.student: epochs must be a whole number, got 1.5"),
    (["--preset", "nan.yaml"], "preset nan.yaml: stages.gender.vggf.triplet_kd: margin must be a finite number, got nan"),
    (["--preset", "seed.yaml"], "preset seed.yaml: data: seed must be >= 0, got -1"),
    (["--preset", "escape.yaml"], "name must be one folder name of at most 100 letters, digits, '.', '_' and '-'"),
    (["--experiment", "../../escape"], "--experiment must be one folder name"),
    (["--preset", "bomb.yaml"], "preset 'bomb.yaml' holds more than 100,000 values once its aliases (*name) are expanded"),
    (["--seeds", "two"], "argument --seeds: invalid int value: 'two'"),
    (["--max-failures", "-1"], "--max-failures must be >= 0 (retries of a failed node), got -1"),
    # Names changed before 1.0 (issue 29): the old ones are refused, never read as the new ones.
    (["--ray-train", "multi"], "argument --ray-train: invalid choice: 'multi'"),
    (["--widths", "auto"], "unrecognized arguments: --widths auto"),
    (["--preset", "oldkey.yaml"], "preset oldkey.yaml: resources.vggf.max_workers is now called max_ddp_workers"),
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
    assert "usage:" not in err and len(err.splitlines()) <= 2, err  # the line, and at most a --help hint
    assert set(tmp_path.iterdir()) == before  # no occkd_runs/, no mlflow.db, no data store


# -- resources: a request no node can hold is refused naming the preset entry; CPUs beyond every node are capped --

@pytest.mark.parametrize("dry_run", [True, False])
def test_a_gpu_request_no_node_can_hold_is_refused_naming_the_preset_entry(tmp_path: Path, monkeypatch, capsys, dry_run):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # this machine, as a local Ray would see it: 1 GPU
    (tmp_path / "gpus.yaml").write_text("extends: smoke\nname: gpus\nresources: {vggf: {cpus: 1, gpus: 2}}\n")
    code, err = run_main(tmp_path, monkeypatch, capsys, ["--tasks", "gender", "--archs", "vggf", "--preset", "gpus.yaml",
                                                         *(["--dry-run"] if dry_run else [])])
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1, err
    assert "preset 'gpus': resources.vggf (cpus: 1, gpus: 2) cannot run here: no node can hold" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpus.yaml"]  # refused before data, storage or MLflow


def test_cpus_beyond_every_node_are_capped_and_the_plan_names_the_preset_value(tmp_path: Path, monkeypatch, capsys):
    """Capped, not refused: paper and mid ask 4-8 CPUs per node and run on a 2-core machine (docs/scheduling.md)."""
    import os

    (tmp_path / "cpus.yaml").write_text("extends: smoke\nresources: {vggf: {cpus: 100000}}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["--tasks", "gender", "--archs", "vggf", "--preset", "cpus.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (f"resources.vggf.cpus: 100000 is more than any node has: its nodes ask for {os.cpu_count()} CPUs "
            "(the largest node's)") in out
    assert "gender/vggf/teacher" in out and f"cpu={os.cpu_count()} " in out


# -- degenerate data: refused with the counts and the minimum, in --dry-run already ----------------------

def fer_rows(train: int, val: int, test: int) -> list:
    """FER+ rows whose votes give a clear majority, alternating neutral and happiness."""
    rows = []
    for usage, count in (("Training", train), ("PublicTest", val), ("PrivateTest", test)):
        for _ in range(count):
            votes = [10, 0, 0, 0, 0, 0, 0, 0, 0, 0] if len(rows) % 2 == 0 else [0, 10, 0, 0, 0, 0, 0, 0, 0, 0]
            rows.append((usage, f"fer{len(rows):07d}.png", votes))
    return rows


def write_utkface(folder: Path, count: int, ages=None, genders=None) -> None:
    """``count`` UTKFace faces named AGE_GENDER_RACE_DATETIME.jpg.chip.jpg, as the data set names them."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        age = 20 + i if ages is None else ages[i]
        gender = i % 2 if genders is None else genders[i]
        Image.new("RGB", (200, 200), (i * 20 % 256, 80, 120)).save(
            folder / f"{age}_{gender}_0_2017011617{i:05d}.jpg.chip.jpg")


def run_main(tmp_path: Path, monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    try:
        code = main(args)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("dry_run", [True, False])
def test_six_utkface_images_are_refused_with_the_counts(tmp_path: Path, monkeypatch, capsys, dry_run):
    write_utkface(tmp_path / "data" / "utkface" / "UTKFace", 6)
    code, err = run_main(tmp_path, monkeypatch, capsys, ["--tasks", "gender", "--archs", "vggf", "--preset", "mini",
                                                         "--data-root", "data", *(["--dry-run"] if dry_run else [])])
    assert code == 2 and "Traceback" not in err
    # mini mines pools of 20 % of the training rows: of 4 rows, a pool of 1, in which no anchor ever finds a triplet
    assert "task 'gender': the train split has 4 rows, too few for gender/vggf/triplet_kd: a mining pool of 1 rows" in err
    assert "with probability 1, so one of its 5 epochs trains on nothing" in err
    assert not (tmp_path / "occkd_runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("dry_run", [True, False])
def test_44_utkface_faces_that_pass_the_split_minimums_are_refused_for_what_triplet_mining_needs(
        tmp_path: Path, monkeypatch, capsys, dry_run):
    """Issue 28 item 11: the first 44 files of a UTKFace folder sorted by name, 43 ten-year-olds and one aged
    100. Before, --dry-run accepted them and both age triplet-KD nodes failed after a minute inside
    scikit-learn ("Found array with 0 sample(s)"): no pool of 5 held a triplet, so an epoch trained on nothing."""
    write_utkface(tmp_path / "data" / "utkface" / "UTKFace", 44, ages=[10] * 43 + [100], genders=[0] * 43 + [1])
    code, err = run_main(tmp_path, monkeypatch, capsys, ["--tasks", "age", "--archs", "vggf", "--preset", "mini",
                                                         "--data-root", "data", *(["--dry-run"] if dry_run else [])])
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert ("task 'age': the train split has 26 rows, too few for age/vggf/triplet_kd: a mining pool of 5 rows "
            "(pool_fraction 0.2) gives no anchor a triplet") in errors[0]
    assert "train split needs at least" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no store, no storage, no MLflow


def test_a_data_set_whose_every_age_lies_within_the_threshold_can_never_mine(tmp_path: Path, monkeypatch, capsys):
    write_utkface(tmp_path / "data" / "utkface" / "UTKFace", 300, ages=[30 + i % 5 for i in range(300)])
    code, err = run_main(tmp_path, monkeypatch, capsys, ["--tasks", "age", "--archs", "vggf", "--preset", "mini",
                                                         "--data-root", "data", "--dry-run"])
    assert code == 2 and "the train split has 180 rows, too few for age/vggf/triplet_kd" in err
    assert "no number of rows with these labels suffices" in err
    # the same faces for gender (alternating) are enough: the check is per task
    assert main(["--tasks", "gender", "--archs", "vggf", "--preset", "mini", "--data-root", "data", "--dry-run"]) == 0


def test_the_refusal_follows_the_miner_exactly():
    """The chance that a pool gives no anchor a triplet, against the miner itself on every pool of small sets
    (ages with their 5-year threshold, and classes), and one value by hand."""
    import itertools

    import numpy as np

    from occkd_core.data.checks import no_triplet_chance
    from occkd_core.mining import mine_hard_triplets

    rng = np.random.default_rng(0)
    for _ in range(4):
        ages, classes = rng.integers(20, 36, 9).astype(np.float32), rng.integers(0, 3, 9)
        for labels, threshold in ((ages, 5.0), (classes, None)):
            embeddings = torch.randn(9, 3)
            for size in (1, 2, 3, 4):
                pools = list(itertools.combinations(range(9), size))
                empty = sum(len(mine_hard_triplets(embeddings, embeddings, torch.as_tensor(labels), torch.tensor(pool),
                                                   age_threshold=threshold)) == 0 for pool in pools)
                assert no_triplet_chance(labels, size, threshold) == pytest.approx(empty / len(pools), abs=1e-12)
    # 13 men and 13 women, pools of 5: one gender only in 2 · C(13, 5) of the C(26, 5) pools
    assert no_triplet_chance(np.array([0, 1] * 13), 5, None) == pytest.approx(2 * 1287 / 65780)


def test_fer_without_its_test_rows_is_refused_in_the_dry_run(tmp_path: Path, monkeypatch, capsys):
    from test_loaders import write_fer_pair

    write_fer_pair(tmp_path / "data" / "ferplus", fer_rows(train=40, val=0, test=0))
    code, err = run_main(tmp_path, monkeypatch, capsys, ["--tasks", "fer", "--archs", "vggf", "--preset", "mini",
                                                         "--data-root", "data", "--dry-run"])
    assert code == 2 and "{'train': 40, 'val': 0, 'test': 0} per split" in err and "short: val, test" in err


def test_a_truncated_fer_csv_gz_is_named(tmp_path: Path, monkeypatch, capsys):
    from test_loaders import write_fer_pair

    fer, _ = write_fer_pair(tmp_path / "data" / "ferplus", fer_rows(train=130, val=4, test=4), gz=True)
    fer.write_bytes(fer.read_bytes()[: len(fer.read_bytes()) // 2])
    code, err = run_main(tmp_path, monkeypatch, capsys, ["--tasks", "fer", "--archs", "vggf", "--preset", "mini",
                                                         "--data-root", "data"])
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1, err
    assert "fer2013.csv.gz is not a valid FER2013 CSV" in errors[0]


def test_a_web_server_that_is_not_mlflow_is_refused_in_one_line_before_anything_is_written(tmp_path: Path, monkeypatch,
                                                                                           capsys):
    """Issue 28 item 13: another web app on the port answers /health with 200 and everything else with an HTML
    page. The grid used to prepare the data store first, then dump that page in its error."""
    import http.server
    import threading

    class AnyPage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            body = b"<!DOCTYPE html><html><head><title>Welcome</title></head><body>" + b"<p>hello</p>\n" * 500
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AnyPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        before = set(tmp_path.iterdir())
        code, err = run_main(tmp_path, monkeypatch, capsys, ["--tasks", "gender", "--archs", "vggf",
                                                             "--tracking-uri", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "answers, but not as an MLflow tracking server" in err and "HTTP 200, text/html" in err
    assert "<" not in err and "hello" not in err
    assert set(tmp_path.iterdir()) == before  # no data store, no storage
