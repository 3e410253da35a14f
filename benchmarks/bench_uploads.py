"""Does the scheduler wait for MLflow uploads? The driver's Tune callback records each sealed node; the
next node is handed out only when the callback returns. Before, it uploaded the node's files (a ResNet-50
``best.pt`` is ~95 MB at full channel width, VGG-face's ~60 MB) inside the callback; now a background thread does.

On a real ``mlflow server`` over HTTP (its artifacts proxied to local disk), a chain of training nodes with
checkpoints of the papers' sizes is recorded two ways with the same :class:`grid.tracking.Tracker`:

- **inline** (the old behaviour): each ``finish_node`` is followed by ``drain()``, so the caller waits for
  the node's upload, as the callback did;
- **background** (now): ``finish_node`` alone; the driver drains once at the end.

Per node it reports how long the caller (the scheduler's thread) was held, and the time to drain at the end.

    python benchmarks/bench_uploads.py [--nodes 6] [--sizes-mb 95,60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_line, markdown_table  # noqa: E402
from grid.graph import expand_graph  # noqa: E402
from grid.local_cluster import mlflow_server  # noqa: E402
from grid.mlflow_content import DataRecord  # noqa: E402
from grid.results import ScoreRow, TrainNodeResult, TrainTiming  # noqa: E402
from grid.tracking import Tracker  # noqa: E402
from occkd_core.presets import load_preset  # noqa: E402


def sealed_nodes(folder: Path, count: int, sizes_mb: list[int]):
    """``count`` training nodes of a real graph, each with a checkpoint of one of ``sizes_mb`` (random bytes:
    an upload does not care what the tensors are) and the small files a node seals."""
    graph = expand_graph(load_preset("paper"), ["fer", "gender", "age"], ["resnet50", "vggface"],
                         train_sizes={t: 1000 for t in ("fer", "gender", "age")},
                         data_fingerprints={t: "0123456789abcdef" for t in ("fer", "gender", "age")},
                         from_scratch=True)
    train = [n for n in graph.nodes.values() if n.kind == "train"][:count]
    nodes = []
    for index, node in enumerate(train):
        directory = folder / node.hash
        (directory / "train").mkdir(parents=True, exist_ok=True)
        size = sizes_mb[index % len(sizes_mb)] * 1_000_000
        with open(directory / "train" / "best.pt", "wb") as handle:
            handle.write(os.urandom(size))
        (directory / "predictions.parquet").write_bytes(os.urandom(200_000))
        (directory / "result.json").write_text("{}")
        nodes.append((node, directory, size))
    return graph, nodes


def record_chain(uri: str, graph, nodes, *, inline: bool) -> dict[str, float]:
    data = {t: DataRecord("synthetic", "0123456789abcdef", "/data/synthetic.arrow", {"train": 600, "val": 200,
                                                                                      "test": 200})
            for t in ("fer", "gender", "age")}
    tracker = Tracker(uri, f"bench-uploads-{'inline' if inline else 'background'}-{time.time():.0f}",
                      run_name="bench", params={}, grid_id=f"bench-{time.time()}", data=data)
    held = []
    started = time.perf_counter()
    for node, directory, _ in nodes:
        result = TrainNodeResult(
            key=node.key, hash=node.hash, stage=node.stage, metrics={"best_epoch": 1, "val_score": 70.0},
            scores=(ScoreRow(model=node.stage, test_set="test", visible="full", metric="accuracy", value=70.0),),
            val_score=70.0, best_epoch=1, epochs_run=1, max_epochs=1, seconds=1.0, history=(), placement={},
            timing=TrainTiming(started_at=0.0, first_step_at=0.1, last_step_at=0.9, finished_at=1.0))
        tracker.start_node(node)
        begin = time.perf_counter()
        tracker.finish_node(node, result, directory, ["train/best.pt", "predictions.parquet"])
        if inline:
            tracker.drain()
        held.append(time.perf_counter() - begin)
    chain_done = time.perf_counter() - started
    begin = time.perf_counter()
    errors = tracker.drain()
    if errors:
        raise RuntimeError(f"uploads failed: {errors}")
    return {"held_median": statistics.median(held), "held_max": max(held), "held_total": sum(held),
            "chain": chain_done, "drain": time.perf_counter() - begin}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--sizes-mb", default="95,60", help="checkpoint sizes, cycled over the nodes")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes_mb.split(",")]
    with tempfile.TemporaryDirectory(prefix="occkd-bench-uploads-") as tmp:
        folder = Path(tmp)
        graph, nodes = sealed_nodes(folder / "nodes", args.nodes, sizes)
        total_mb = sum(size for *_, size in nodes) / 1e6
        (folder / "server").mkdir()
        with mlflow_server(folder / "server") as uri:
            rows = []
            for inline in (True, False) * args.repeats:  # alternated: the first round also warms the server
                numbers = record_chain(uri, graph, nodes, inline=inline)
                rows.append(["inline (before)" if inline else "background (now)", numbers["held_median"],
                             numbers["held_max"], numbers["held_total"], numbers["drain"]])
    print(machine_line())
    print(f"{len(nodes)} training nodes, checkpoints {args.sizes_mb} MB ({total_mb:.0f} MB in all), "
          f"real mlflow server over HTTP on 127.0.0.1, artifacts proxied to local disk\n")
    print(markdown_table(["uploads", "scheduler held per node, median (s)", "max (s)", "held in all (s)",
                          "drain at exit (s)"], rows))


if __name__ == "__main__":
    main()
