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
