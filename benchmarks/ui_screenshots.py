"""What a user sees in the MLflow UI: headless Chromium screenshots of a grid's experiment.

Serves the store with a real ``mlflow server`` (as ``mlflow ui`` does), then opens, as the grid prints
them, the runs table (``?workflowType=machine_learning``: MLflow 3 otherwise lands on its GenAI view),
one node's run page and the experiment's logged models, and saves a PNG of each. Without Chromium it says
so and exits 0 (``apt-get install chromium``).

    python benchmarks/ui_screenshots.py --tracking-uri sqlite:///$PWD/mlflow.db --experiment occkd-smoke --out docs/
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grid.local_cluster import mlflow_server  # noqa: E402
from grid.tracking import ui_link  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _chromium(browser: str, url: str, *extra: str, budget_ms: int = 20000, size: str = "1600,1000") -> str:
    """Run headless Chromium on ``url`` for ``budget_ms`` of virtual time (the UI's scripts run and fetch)."""
    with tempfile.TemporaryDirectory(prefix="occkd-chromium-") as profile:
        done = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--user-data-dir={profile}", f"--window-size={size}",
                               f"--virtual-time-budget={budget_ms}", *extra, url],
                              capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"{browser} failed on {url}: {done.stderr[-1000:]}")
    return done.stdout


def screenshot(browser: str, url: str, out: Path, **options) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    _chromium(browser, url, f"--screenshot={out}", **options)
    return out


def rendered_text(browser: str, url: str, **options) -> str:
    """The page's DOM after its scripts ran (what a user's browser shows, as HTML)."""
    return _chromium(browser, url, "--dump-dom", **options)


def pages(server: str, tracking_uri: str, experiment: str) -> dict[str, str]:
    """runs table, a node's run page (the first distilled student found, else any node) and the models tab."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} in {tracking_uri}")
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=500)
    nodes = [r for r in runs if "occkd.node" in r.data.tags]
    run = next((r for r in nodes if r.data.tags.get("occkd.strategy") == "triplet_kd"), nodes[0] if nodes else None)
    base = f"{server}/#/experiments/{found.experiment_id}"
    out = {"runs_table": ui_link(server, found.experiment_id)}
    if run is not None:
        out["run_page"] = f"{base}/runs/{run.info.run_id}?workflowType=machine_learning"
    out["models"] = f"{base}/models?workflowType=machine_learning"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    parser.add_argument("--experiment", default="occkd-smoke")
    parser.add_argument("--out", type=Path, default=Path("ui_screenshots"))
    args = parser.parse_args()
    browser = find_browser()
    if browser is None:
        print("no Chromium found (apt-get install chromium); nothing to do")
        return 0
    with tempfile.TemporaryDirectory(prefix="occkd-ui-") as workdir:
        with mlflow_server(Path(workdir), store_uri=args.tracking_uri) as server:
            for name, url in pages(server, args.tracking_uri, args.experiment).items():
                size = "1600,1700" if name == "run_page" else "1600,1000"  # down to its metrics and their links
                path = screenshot(browser, url, args.out / f"{name}.png", size=size)
                print(f"{path}  <- {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
