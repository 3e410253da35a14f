"""The MLflow tracking store before the driver writes anything: its URI checked (scheme, a server that answers
as MLflow, a file that is SQLite), the default store, and the lock that serialises creating a new SQLite
store's schema. Imports no MLflow, so a bad URI is refused at once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def schema_lock(uri: str) -> Iterator[None]:
    """Hold an OS lock beside a SQLite store while MLflow first opens it: MLflow creates the schema on first
    use, and two processes doing so at once crash with "table ... already exists" (seen with two grids
    started together on a new mlflow.db). Other stores serialise this themselves."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(f"{uri[len('sqlite:///'):]}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


#: Tracking-store schemes MLflow 3 serves runs from (its SQLAlchemy databases, a server, Databricks).
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def check_tracking_uri(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, before anything is written, when the tracking store cannot be reached (MLflow's own
    client retries a dead server for minutes)."""
    scheme = uri.partition("://")[0].split("+")[0].lower() if "://" in uri else ""
    if scheme in ("", "file"):
        raise RuntimeError(f"--tracking-uri {uri!r}: MLflow 3 keeps its file store ('mlruns' folders) in maintenance "
                           f"mode; use a database, e.g. sqlite:///{Path.cwd() / 'mlflow.db'}, or an MLflow server "
                           f"(http://HOST:PORT)")
    if scheme not in TRACKING_SCHEMES:
        raise RuntimeError(f"--tracking-uri {uri!r}: unknown scheme {scheme!r}; use sqlite:///PATH/mlflow.db, "
                           f"http(s)://HOST:PORT (an MLflow server) or {', '.join(s for s in TRACKING_SCHEMES if s not in ('sqlite', 'http', 'https'))}")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                response.read()
        except (OSError, urllib.error.URLError) as err:
            raise RuntimeError(f"cannot reach the MLflow tracking server {uri!r} ({err}); start it, or check "
                               f"the port-forward, or pass another --tracking-uri") from None
        _check_mlflow_api(uri, timeout)
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if path.exists():  # an existing file must be a SQLite database (MLflow would fail after the data store)
            try:
                with open(path, "rb") as file:
                    header = file.read(16)
            except OSError as err:
                raise RuntimeError(f"cannot read the MLflow store {uri!r}: {err.strerror}") from None
            if header != b"SQLite format 3\x00":
                raise RuntimeError(f"--tracking-uri {uri!r}: {path} is not an SQLite database; name a new file or an "
                                   f"existing MLflow store")
        elif not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise RuntimeError(f"cannot create the MLflow store {uri!r}: {path.parent} is not a writable directory")


#: An MLflow server answers this with JSON (the experiment, or RESOURCE_DOES_NOT_EXIST); other servers don't.
API_PROBE = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"


def _check_mlflow_api(uri: str, timeout: float) -> None:
    """A server that answers /health may still not be MLflow (another web app on that port): ask MLflow's REST
    API and expect JSON. A server asking for credentials is taken on trust here; MLflow's client sends them."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + API_PROBE, timeout=timeout) as response:
            status, kind, body = response.status, response.headers.get_content_type(), response.read(65536)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return
        status, kind, body = err.code, err.headers.get_content_type(), err.read(65536)
    except (OSError, urllib.error.URLError) as err:
        raise RuntimeError(f"cannot reach the MLflow tracking server {uri!r} ({err})") from None
    try:
        json.loads(body)
    except ValueError:
        raise RuntimeError(f"{uri} answers, but not as an MLflow tracking server (GET {API_PROBE.split('?')[0]}: "
                           f"HTTP {status}, {kind}); check the host and port of --tracking-uri") from None


def one_line(err: BaseException, limit: int = 300) -> str:
    """An error as one line a user reads: its first line, markup stripped, cut to ``limit`` characters (a web
    server's error page would otherwise fill the terminal)."""
    text = re.sub(r"<[^>]+>", " ", str(err))
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    first = re.sub(r"\s+", " ", first)
    return first if len(first) <= limit else first[: limit - 3] + "..."


def default_tracking_uri(workdir: Path) -> str:
    """A SQLite store in the working directory, so ``mlflow ui`` opens it (MLflow's default store since 3.7)."""
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
