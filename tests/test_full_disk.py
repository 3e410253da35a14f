"""A full disk says so, naming the file: torch's checkpoint writer reports a failed write as
"[enforce fail at inline_container.cc] unexpected pos"; occkd turns it into the OSError behind it.

On a real 1 MiB tmpfs, which the test mounts itself where the machine lets it (root, as CI runs here);
skipped elsewhere."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

from occkd_core.checkpoints import atomic_torch_save
from occkd_core.files import atomic_write_bytes


@pytest.fixture
def tiny_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_checkpoint_on_a_full_disk_says_no_space_left_and_names_the_file(tiny_disk: Path):
    target = tiny_disk / "nodes" / "abc" / "train" / "best.pt"
    with pytest.raises(OSError) as caught:
        atomic_torch_save({"weights": torch.zeros(1_000_000)}, target)  # 4 MB on a 1 MiB disk
    assert caught.value.errno == errno.ENOSPC and str(target.resolve()) in str(caught.value)
    assert "No space left on device" in str(caught.value) and "unexpected pos" not in str(caught.value)
    assert not list(target.parent.iterdir())  # no half-written or temporary file is left behind
    with pytest.raises(OSError, match="No space left on device") as caught:
        atomic_write_bytes(tiny_disk / "result.json", b"x" * 2_000_000)
    assert str((tiny_disk / "result.json").resolve()) in str(caught.value)


def test_a_small_checkpoint_still_fits(tiny_disk: Path):
    target = atomic_torch_save({"weights": torch.zeros(1000)}, tiny_disk / "small.pt")
    assert torch.load(target, weights_only=True)["weights"].shape == (1000,)
