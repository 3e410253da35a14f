"""Stopping a Ray cluster the project started ends its processes and no others: `ray stop --force` ended
every Ray on the machine (another grid's local Ray, another user's), which once killed a running grid."""

from __future__ import annotations

import os
import subprocess
import time

from grid.local_cluster import CLUSTER_MARK, marked_processes, stop_marked


def test_stop_marked_ends_the_marked_processes_and_leaves_the_others():
    ours = subprocess.Popen(["sleep", "120"], env={**os.environ, CLUSTER_MARK: "ours"})
    theirs = subprocess.Popen(["sleep", "120"], env={**os.environ, CLUSTER_MARK: "theirs"})
    unmarked = subprocess.Popen(["sleep", "120"], env={k: v for k, v in os.environ.items() if k != CLUSTER_MARK})
    try:
        deadline = time.monotonic() + 10
        while ours.pid not in marked_processes("ours") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marked_processes("ours") == [ours.pid]
        stop_marked("ours", grace=5)
        assert ours.wait(timeout=10) == -15  # SIGTERM first
        assert theirs.poll() is None and unmarked.poll() is None
        assert marked_processes("ours") == [] and marked_processes("theirs") == [theirs.pid]
    finally:
        for process in (ours, theirs, unmarked):
            process.kill()
            process.wait()
