"""A grid's own local Ray: reachable from this machine only, and gone when its driver is, however it ends.

A grid that starts its own Ray (no ``--ray-address``) needs no other host, yet Ray 2.60's
``ray.init(address="local")`` on Linux listens on every interface: it takes the machine's routable
address as the node's IP, and then the GCS, the raylet, every worker and the dashboard agent bind
``::``/``0.0.0.0`` and the runtime env agent that IP. Ray binds all of them to loopback when the node's
IP is loopback, but it chooses loopback itself only where multi-node clusters are off
(``ray_constants.ENABLE_RAY_CLUSTER``: False on macOS and Windows, from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
read once when ray is imported), and it turns ``ray.init(_node_ip_address="127.0.0.1")`` back into the
routable IP (``services.resolve_ip_for_localhost``). :func:`loopback_only` turns that switch off for the
one ``ray.init`` call, so the node's IP is 127.0.0.1 and nothing listens beyond it.

When the driver is killed (``kill -9``, the OOM killer), the GCS and the raylet die with it (kernel
fate-sharing) and the workers within seconds, but the raylet's two agents (dashboard agent, runtime env
agent) see their raylet die, then wait 60 s for the dead GCS to take their error report (a fixed timeout
in ``ray._private.utils.publish_error_to_driver``) before they exit, listening all the while. Ray's own
reaper (``ray/_private/ray_process_reaper.py``) would end them, but Ray starts it only where the kernel
cannot fate-share, and it kills its whole process group, which needs the driver to leave the terminal's
group (Ctrl-C would no longer reach it). :func:`start_reaper` starts a small reaper of ours instead, scoped
to the processes of this one Ray session: it ends them when the driver is gone or the session has ended,
and then exits. Cluster paths (joining ``--ray-address``, ``grid/local_cluster.py``, Slurm) use neither.

    python grid/own_ray.py DRIVER_PID SESSION_DIR   # the reaper (stdlib only; started by start_reaper)
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

#: Seconds between the reaper's looks at the session's processes (each look reads /proc/*/stat, a few ms).
POLL_S = 1.0
#: Seconds a leftover gets to exit on SIGTERM (both agents exit at once on it) before SIGKILL.
TERM_GRACE_S = 1.0

#: The reapers this driver started; each holds the write end of its reaper's stdin, which the kernel
#: closes when the driver dies, however it dies.
_REAPERS: list[subprocess.Popen] = []


@contextmanager
def loopback_only() -> Iterator[None]:
    """Within it, a ``ray.init`` that starts a local Ray takes 127.0.0.1 as the node's IP, so every process of
    that Ray listens on loopback only. Restored after: a later join of a cluster must use the routable IP."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # services.get_node_ip_address() then answers the loopback IP
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def session_dir() -> str:
    """The session folder of the Ray this process started (``/tmp/ray/session_…``): every Ray process the
    driver starts (GCS, raylet, monitor, log monitor, dashboard) names it on its command line."""
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


def start_reaper() -> subprocess.Popen | None:
    """Start the reaper of the local Ray this process has just started (Linux only: it reads /proc; on macOS
    and Windows Ray's own reaper runs). Returns its process, or None where none is started."""
    if not sys.platform.startswith("linux"):
        return None
    for done in [r for r in _REAPERS if r.poll() is not None]:  # reapers of sessions that ended
        done.stdin.close()
        _REAPERS.remove(done)
    session = session_dir()
    with open(os.path.join(session, "logs", "occkd_reaper.err"), "ab") as errors:  # beside Ray's own logs
        reaper = subprocess.Popen(
            # -I: stdlib only, so it starts in milliseconds and no PYTHONPATH can shadow it.
            [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), session],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors,
            start_new_session=True,  # a Ctrl-C to the terminal's group must not end it before the driver
        )
    _REAPERS.append(reaper)
    return reaper


# ---- the reaper process (stdlib only) ----------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int] | None:
    """``(parent pid, start time)`` of ``pid`` from /proc, None if it is gone or a zombie. The start time tells
    a process from a later one that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) ": state, ppid, ... starttime (22nd)
    if fields[0] in (b"Z", b"X"):  # exited, its parent has not collected it yet
        return None
    return int(fields[1]), int(fields[19])


def _names(pid: int, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False


def session_processes(driver_pid: int, session: str) -> tuple[dict[int, int], dict[int, int]]:
    """``(roots, all)``, each ``{pid: start time}``: the roots are the driver's children that name ``session``
    on their command line (GCS, raylet, monitors, dashboard); all adds every descendant of a root (agents,
    workers, what workers start), which name it no more once Ray retitles them (``ray::DashboardAgent``)."""
    table = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(int(p))) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    me = os.getpid()  # the reaper names the session too
    roots = {pid: table[pid][1] for pid in children.get(driver_pid, []) if pid != me and _names(pid, session)}
    found, todo = dict(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                todo.append(child)
    return roots, found


def _alive(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == started


def end_processes(processes: dict[int, int]) -> None:
    """SIGTERM each process still alive (same pid, same start time), then SIGKILL what is left after
    :data:`TERM_GRACE_S`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = {pid: s for pid, s in processes.items() if _alive(pid, s)}
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:  # gone meanwhile
                pass
        if not left:
            return
        deadline = time.monotonic() + TERM_GRACE_S
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(_alive(p, s) for p, s in left.items()):
            time.sleep(0.05)


def reap(driver_pid: int, session: str) -> None:
    """Watch the session until the driver is gone (its end of stdin closes) or the session's roots have all
    ended (``ray.shutdown``, or the kernel ended GCS and raylet with the driver), then end what is left of it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    known: dict[int, int] = {}
    while True:
        roots, found = session_processes(driver_pid, session)
        known = {pid: s for pid, s in {**known, **found}.items() if _alive(pid, s)}
        if not roots:
            break
        readable, _, _ = select.select([sys.stdin.buffer], [], [], POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 4096):  # EOF: the driver is gone
            break
    end_processes(known)


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2])
