"""A grid's own local Ray: reachable from this machine only.

A grid that starts its own Ray (no ``--ray-address``) needs no other host, yet Ray 2.60's
``ray.init(address="local")`` on Linux listens on every interface: it takes the machine's routable
address as the node's IP, and then the GCS, the raylet, every worker and the dashboard agent bind
``::``/``0.0.0.0`` and the runtime env agent that IP. Ray binds all of them to loopback when the node's
IP is loopback, but it chooses loopback itself only where multi-node clusters are off
(``ray_constants.ENABLE_RAY_CLUSTER``: False on macOS and Windows, from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
read once when ray is imported), and it turns ``ray.init(_node_ip_address="127.0.0.1")`` back into the
routable IP (``services.resolve_ip_for_localhost``). :func:`loopback_only` turns that switch off for the
one ``ray.init`` call, so the node's IP is 127.0.0.1 and nothing listens beyond it.

Cluster paths (joining ``--ray-address``, ``grid/local_cluster.py``, Slurm) do not use it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


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
