"""Workers run the driver's code. With occkd importable from one copy (an install, here PYTHONPATH) and
grid/run_all.py run from another, the trials imported the first while MLflow recorded the second's commit.
A grid's own Ray now puts the driver's code first for its workers (tests/test_grid_e2e.py runs its grid
beside such an "installed" copy and checks where every node's code came from); on a running cluster
whose workers import other code, every node refuses in one line (here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grid.code import check_same_code, code_fingerprint
from grid.local_cluster import RAY, marked_ray, ray_is_running
from grid.ray_token import ensure_token
from conftest import new_mlflow_store
from test_grid_e2e import TINY

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray_cluster]  # runs after or before, never beside, the other clusters
PRESET = {**TINY, "name": "tiny-code", "controls": False}


def copy_of_the_code(where: Path, edit: str = "") -> Path:
    for package in ("occkd_core", "grid"):
        shutil.copytree(REPO / package, where / package, ignore=shutil.ignore_patterns("__pycache__"))
    if edit:  # an uncommitted edit: another fingerprint
        with open(where / "occkd_core" / "__init__.py", "a") as handle:
            handle.write(f"\n# {edit}\n")
    return where


def grid(driver_copy: Path, tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(PRESET))
    if not (tmp_path / "mlflow.db").exists():
        new_mlflow_store(tmp_path / "mlflow.db")
    return subprocess.run([sys.executable, str(driver_copy / "grid" / "run_all.py"), "--tasks", "gender", "--archs",
                           "vggf", "--preset", str(tmp_path / "tiny.yaml"), "--storage", str(tmp_path / "runs"),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)


def test_the_check_names_both_codes():
    check_same_code(code_fingerprint(), "here")  # the same code: nothing to say
    with pytest.raises(RuntimeError, match=r"^the trial of x imports occkd from .* \(code \w+\), not the driver's "
                                           r"code \(code 0123\): install the same checkout on every node"):
        check_same_code("0123", "the trial of x")


def test_on_a_cluster_whose_workers_import_other_code_every_node_refuses_in_one_line(tmp_path: Path, fresh_home):
    if ray_is_running():
        pytest.skip("a Ray cluster already runs on this machine; not disturbing it")
    ensure_token()
    installed = copy_of_the_code(tmp_path / "installed", edit="what the cluster's nodes have")
    driver = copy_of_the_code(tmp_path / "clone")
    head = [RAY, "start", "--head", "--port=6397", "--num-cpus=2", "--dashboard-host=127.0.0.1",
            "--include-dashboard=false", "--disable-usage-stats"]
    with marked_ray(head, {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(installed)}) as env:
        out = grid(driver, tmp_path, {**env, "PYTHONPATH": ""}, "--ray-address", "127.0.0.1:6397", "--max-failures", "0")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    failed = [line for line in out.stderr.splitlines() if line.strip().startswith("FAILED")]
    assert failed and all(f"imports occkd from {installed}" in line and "not the driver's code" in line
                          for line in failed), out.stderr[-3000:]
