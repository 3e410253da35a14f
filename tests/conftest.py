"""Shared fixtures. Torch uses one thread in tests: on a shared 2-core machine two threads slow tiny
convolutions down by orders of magnitude whenever another process is busy.

The suite runs as a new account would: HOME is an empty folder made for the session (no Ray token, no
caches, nothing an earlier run of anything left in the real home), and every test that starts a Ray
cluster gets an empty HOME of its own (``fresh_home``), so it passes alone, first, or after any other."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ["HOME"] = tempfile.mkdtemp(prefix="occkd-tests-home-")
atexit.register(shutil.rmtree, os.environ["HOME"], ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups (its own hook of the same name)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Two test processes (pytest-xdist, ``-n 2 --dist loadgroup`` in pyproject's addopts): each test file runs
    whole on one of them, so a module's fixtures (``test_grid_e2e``'s sealed grid) are made once, and every
    file marked ``ray_cluster`` (it starts a Ray cluster with ``ray start``, on fixed ports, joined by
    ``--ray-address``) runs on one process, one after another, so no two such clusters ever meet. Beside
    them run grids with a Ray of their own: those listen on ports Ray picks and never join a cluster.

    A grid test waits half its time (Ray and its workers starting, polls, handshakes): a tiny 8-node grid
    used 45 CPU-seconds in 42 s on 2 cores, so two at once fill the machine."""
    clusters = {item.module.__name__ for item in items if item.get_closest_marker("ray_cluster")}
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    for item in items:
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("ray_cluster" if module in clusters else module))
    # Longest first, so that no long file starts last and runs on alone: the clusters' files (~7 min
    # together), then the other files with slow tests, then the fast files, which fill the gaps. xdist's own
    # order (most tests first; off in addopts) put the clusters' few tests last: 1,020 s in CI, 944 s in this.
    items.sort(key=lambda item: (item.module.__name__ not in clusters, item.module.__name__ not in slow))


def use_empty_home(patch: pytest.MonkeyPatch, home: Path) -> Path:
    """Make ``home`` (empty) the HOME of this process and every process it starts, with no Ray token given
    by the environment either: a new account."""
    patch.setenv("HOME", str(home))
    patch.delenv("RAY_AUTH_TOKEN", raising=False)
    patch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return home


@pytest.fixture
def fresh_home(tmp_path_factory, monkeypatch) -> Path:
    """An empty HOME for this test and every process it starts: no ~/.ray/auth_token, as on a new account."""
    return use_empty_home(monkeypatch, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def tiny_faces():
    """300 synthetic faces at 32 px: enough for every stage to run, in a second."""
    from occkd_core.data import make_synthetic_faces

    return make_synthetic_faces(300, image_size=32, seed=3)


_MLFLOW_TEMPLATE: list[Path] = []


def new_mlflow_store(path: Path) -> Path:
    """An empty MLflow SQLite store at ``path``, at MLflow's current schema: a copy of one made once per session.

    A new store runs all of MLflow's schema migrations in the first process that opens it, ~7 s of CPU on a
    2-core machine, paid again by every grid test. Tests of the grid's behaviour start from this copy; the
    tests of a new store itself (``test_tracking``: two drivers opening one at once) and the quick start
    still make theirs from nothing."""
    if not _MLFLOW_TEMPLATE:
        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="occkd-tests-mlflow-")) / "mlflow.db"
        atexit.register(shutil.rmtree, template.parent, ignore_errors=True)
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates the tables, runs the migrations
        _MLFLOW_TEMPLATE.append(template)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_MLFLOW_TEMPLATE[0], path)
    return path
