"""A grid's own local Ray listens on loopback only and leaves nothing listening when it ends (issue 28, item 12):
after ``ray.shutdown()``, and after its driver is killed with SIGKILL. The reaper that ends what a dead driver
leaves is tested on stand-in processes too: it ends its own session's processes, SIGKILL after a SIGTERM
that is ignored, and never another session's."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import grid.own_ray as own_ray

REPO = Path(__file__).resolve().parents[1]

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="Linux: elsewhere Ray binds loopback by itself, and the reaper reads /proc")


def _psutil():
    import ray  # noqa: F401 - Ray ships psutil (ray/thirdparty_files) and puts it on the path when imported
    import psutil

    return psutil


def ray_processes(driver_pid: int, session: str) -> dict:
    """``{pid: psutil.Process}``: the driver's descendants and every process naming ``session`` (with theirs);
    the driver itself is left out."""
    psutil = _psutil()
    found = {p.pid: p for p in psutil.Process(driver_pid).children(recursive=True)}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(session in arg for arg in proc.info["cmdline"] or []):
                found.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
        except psutil.Error:
            pass
    found.pop(driver_pid, None)
    return found


def listening(processes) -> list[tuple[str, int, str]]:
    """``(address, port, process name)`` of every TCP socket these processes listen on."""
    psutil = _psutil()
    out = []
    for proc in processes:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            out += [(c.laddr.ip, c.laddr.port, proc.name()) for c in proc.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:  # gone meanwhile
            pass
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # an IPv6 socket bound to ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def wait_until(condition, timeout_s: float) -> float:
    """Seconds until ``condition()`` held, or ``timeout_s`` if it never did."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(0.25)
    return timeout_s


@pytest.mark.slow
@linux_only
def test_a_grids_own_ray_listens_on_loopback_only_and_not_after_shutdown(fresh_home):
    import ray

    from grid.ray_token import init_ray

    me = _psutil().Process()
    driver_before = set(listening([me]))
    init_ray(None, include_dashboard=False, log_to_driver=False, logging_level="ERROR")  # as run_on_ray does
    try:
        assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker, with its own listener, has started
        session = own_ray.session_dir()
        processes = ray_processes(os.getpid(), session)
        ray_sockets = listening(processes.values())
        driver_sockets = set(listening([me])) - driver_before
        names = {name for _, _, name in ray_sockets}
        assert {"gcs_server", "raylet"} <= names, ray_sockets  # the ones that listened on every interface
        assert any(name.startswith("ray::") for name in names), ray_sockets  # agents and workers
        wide = [s for s in [*ray_sockets, *driver_sockets] if not is_loopback(s[0])]
        assert not wide, f"listening beyond loopback: {wide}"
    finally:
        ray.shutdown()
    waited = wait_until(lambda: not listening(processes.values()), 30)
    assert not listening(processes.values()), f"still listening {waited:.0f} s after ray.shutdown()"
    assert not set(listening([me])) - driver_before


DRIVER = """
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import ray
from grid.ray_token import init_ray
from grid.own_ray import session_dir
init_ray(None, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
ray.get([ray.remote(lambda: 1).remote() for _ in range(2)])
print(json.dumps(session_dir()), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
@linux_only
def test_nothing_of_a_grids_own_ray_listens_soon_after_its_driver_is_killed(fresh_home):
    """Without the reaper the two agents listened for 60 s after ``kill -9`` (measured here)."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        session = json.loads(driver.stdout.readline())
        processes = ray_processes(driver.pid, session)
        before = listening(processes.values())
        assert {"gcs_server", "raylet"} <= {name for _, _, name in before}, before
        assert all(is_loopback(address) for address, _, _ in before), before
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    waited = wait_until(lambda: not listening(processes.values()), 30)
    left = listening(processes.values())
    assert not left, f"{waited:.0f} s after the driver's SIGKILL its Ray still listens: {left}"
    gone = wait_until(lambda: not any(p.is_running() and p.status() != "zombie" for p in processes.values()), 10)
    assert gone < 10, [p for p in processes.values() if p.is_running()]


# ---- the reaper on stand-ins ------------------------------------------------------------------------------

#: A stand-in for a Ray root process (its command line names the session, as GCS and raylet do); it starts a
#: child that ignores SIGTERM and names no session, as a retitled agent (``ray::DashboardAgent``) does.
ROOT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print(flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    return own_ray._stat(pid) is not None


@pytest.fixture
def spawned():
    """Processes a test starts (Popen objects and bare pids), killed at its end whatever happened."""
    procs: list = []
    yield procs
    for proc in procs:
        if isinstance(proc, int):
            if alive(proc):
                os.kill(proc, signal.SIGKILL)
        else:
            proc.kill()
            proc.wait()


def start_root(session: str, spawned: list) -> tuple[subprocess.Popen, int]:
    root = subprocess.Popen([sys.executable, "-c", ROOT, session], stdout=subprocess.PIPE, text=True)
    spawned.append(root)
    child = int(root.stdout.readline())
    spawned.append(child)
    return root, child


def start_reaper(session: str, spawned: list) -> subprocess.Popen:
    reaper = subprocess.Popen([sys.executable, "-I", own_ray.__file__, str(os.getpid()), session],
                              stdin=subprocess.PIPE)
    spawned.append(reaper)
    return reaper


@linux_only
def test_the_reaper_ends_its_sessions_processes_when_the_driver_goes_and_no_others(tmp_path, spawned):
    ours, theirs = str(tmp_path / "session_ours"), str(tmp_path / "session_theirs")
    (root, child), (other_root, other_child) = start_root(ours, spawned), start_root(theirs, spawned)
    roots, found = own_ray.session_processes(os.getpid(), ours)
    assert set(roots) == {root.pid} and set(found) == {root.pid, child}
    reaper = start_reaper(ours, spawned)
    time.sleep(0.5)  # the reaper has looked once
    reaper.stdin.close()  # what the kernel does when the driver dies
    assert reaper.wait(timeout=10) == 0
    root.wait(timeout=5)
    assert not alive(child)  # it ignored SIGTERM, so SIGKILL
    assert other_root.poll() is None and alive(other_child)  # another session's processes stay


@linux_only
def test_the_reaper_ends_what_outlives_its_sessions_roots_and_exits(tmp_path, spawned):
    """``ray.shutdown()``, or the kernel ending GCS and raylet with their driver: the roots end, a leftover
    child does not; the reaper ends it and exits while the driver lives on."""
    session = str(tmp_path / "session_x")
    root, child = start_root(session, spawned)
    reaper = start_reaper(session, spawned)
    time.sleep(0.5)
    root.kill()
    root.wait()
    assert reaper.wait(timeout=10) == 0
    assert not alive(child)
