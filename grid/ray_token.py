"""Ray's cluster token: made once, never overwritten, never printed, and the same on every node and client.

Ray 2.60's token authentication (``RAY_AUTH_MODE=token``) needs one shared secret on every node and every
client. Only a local ``ray.init()`` makes one by itself; ``ray start`` does not: with no token it either
refuses (token mode) or starts a cluster anyone on the network can run code on. So every cluster path of
occkd (``grid/local_cluster.py``, ``slurm/occkd.sbatch``, cluster.yaml's steps in docs/clusters.md) calls
:func:`ensure_token` first, and sets ``RAY_AUTH_MODE=token`` wherever it starts Ray or talks to it.

Where Ray looks, in its order: ``$RAY_AUTH_TOKEN`` (the token itself), ``$RAY_AUTH_TOKEN_PATH``, then
``~/.ray/auth_token``.

    python grid/ray_token.py      # make the token if missing; prints where it is, never the token
"""

from __future__ import annotations

import os
import secrets
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

#: The one line a user who lacks the token sees, instead of Ray's paragraph.
MISSING_TOKEN_HINT = ("this Ray cluster uses token authentication and this machine has no token for it: put the "
                      "cluster's token in ~/.ray/auth_token (mode 600) or RAY_AUTH_TOKEN_PATH, set RAY_AUTH_MODE=token, "
                      "and run again (docs/clusters.md, 'The Ray token')")


def token_path() -> Path:
    """Where Ray reads the token file: ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    explicit = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(explicit).expanduser() if explicit else Path.home() / ".ray" / "auth_token"


def ensure_token() -> tuple[Path | None, bool]:
    """Make the token file if there is none; returns ``(path, made)``, ``path`` None when the token comes from
    ``$RAY_AUTH_TOKEN``. An existing file is never overwritten (every node and client of a running cluster
    holds it). The file is created with mode 600 in one step (``O_EXCL``, so two callers racing cannot both
    write); its folder 700. The token has the form of Ray's own (``secrets.token_hex(32)``, 256 bits):
    ``ray get-auth-token --generate`` would print it on stdout and write the file with the umask's mode."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None, False
    path = token_path()
    if path.is_file():
        return path, False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made by another caller meanwhile: theirs stands
        return path, False
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return path, True


def describe(path: Path | None, made: bool) -> str:
    """One line saying where the token is (never what it is)."""
    if path is None:
        return "Ray token: from $RAY_AUTH_TOKEN"
    return f"Ray token: {'made ' if made else ''}{path}{' (mode 600)' if made else ''}"


def token_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``RAY_AUTH_MODE=token``: what ``ray start``, the
    ``ray`` CLI and a driver joining the cluster need."""
    return {**(os.environ if base is None else base), "RAY_AUTH_MODE": "token"}


def is_missing_token_error(err: BaseException) -> bool:
    """Whether ``err`` is Ray's refusal for want of a token (its AuthenticationError, or the same words in a
    RuntimeError from a failed ``ray start``)."""
    return type(err).__name__ == "AuthenticationError" or "no authentication token was found" in str(err)


def init_ray(address: str | None, **kwargs: Any) -> None:
    """``ray.init`` for a grid driver: a Ray of its own (``address`` None; "local", never whatever
    ``/tmp/ray/ray_current_cluster`` names) or a running cluster, in token mode. Joining, it never makes a
    token (a new one could not be the cluster's); a missing or wrong one is a ValueError of one line.
    A Ray of its own listens on loopback only and leaves no process behind its driver, however the driver
    ends (``grid/own_ray.py``); a cluster keeps listening on the node's address, for other hosts join it."""
    import ray

    from grid.code import prefer_this_code_in_workers
    from grid.own_ray import loopback_only, start_reaper

    if address is None:
        ensure_token()  # a local Ray would make one itself, but with the umask's mode
        prefer_this_code_in_workers()  # its workers import the driver's code, not another installed copy
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # a token-mode client also joins a cluster without auth
    try:
        with loopback_only() if address is None else nullcontext():
            ray.init(address=address or "local", **kwargs)
    except Exception as err:
        if is_missing_token_error(err):
            raise ValueError(MISSING_TOKEN_HINT) from None
        if address is not None and isinstance(err, ConnectionError):  # Ray's only word on a wrong token is a log
            raise ValueError(f"cannot join the Ray cluster at {address}: check that it runs and that this machine "
                             f"holds its token ({token_path()} or RAY_AUTH_TOKEN_PATH)") from None
        raise
    if address is None:
        start_reaper()


def main() -> int:
    print(describe(*ensure_token()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
