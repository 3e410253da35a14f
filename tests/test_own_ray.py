"""A grid's own local Ray listens on loopback only and leaves nothing listening after ``ray.shutdown()``
(issue 28, item 12)."""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from pathlib import Path

import pytest

import grid.own_ray as own_ray

REPO = Path(__file__).resolve().parents[1]

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="Linux: elsewhere Ray binds loopback by itself")


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
