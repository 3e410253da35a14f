"""Triplet mining: the vectorised miner against a plain per-anchor loop, and its share of a triplet-KD
epoch at the mini preset (issue 5, target 2).

Part 1 runs both miners on the same embeddings, labels and pool. The vectorised miner
(``mine_hard_triplets``) mines every anchor; the per-anchor loop (``mine_hard_triplets_reference``)
is timed on a random sample of anchors and scaled to all of them, since its cost is one independent
iteration per anchor (its results on the sample are checked against the vectorised ones).
Embeddings are random unit vectors of the architecture's embedding size; labels are the task's real
training labels when ../shared/data is present, else synthetic ones of the same size.

Part 2 runs one real triplet-KD epoch of VGG-f at the mini preset, piece by piece as
``TripletKDStrategy`` does: the student re-embeds every occluded training face, the miner picks the
triplets, then the epoch trains on them. VGG-f is the fastest network to train, so mining's share is
largest there (its embeddings are also the smallest: 64-d at 1/4 channel width).

    python benchmarks/bench_mining.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHARED_DATA, machine_line, markdown_table  # noqa: E402
from occkd_core.data import FaceData, make_synthetic_faces, open_face_store  # noqa: E402
from occkd_core.data.sources import prepare_real_data  # noqa: E402
from occkd_core.mining import draw_pool, mine_hard_triplets, mine_hard_triplets_reference  # noqa: E402
from occkd_core.models import build_model  # noqa: E402
from occkd_core.preprocess import input_spec_for  # noqa: E402
from occkd_core.presets import load_preset  # noqa: E402
from occkd_core.strategies import BatchContext, TripletKDStrategy  # noqa: E402
from occkd_core.tasks import get_task  # noqa: E402
from occkd_core.embeddings import embed  # noqa: E402
from occkd_core.stage_state import make_optimizer  # noqa: E402
from occkd_core.training import StageSpec, _run_epoch  # noqa: E402


def mini_data(data_root: Path, cache: Path) -> tuple[dict[str, FaceData], str]:
    preset = load_preset("mini")
    if data_root.is_dir():
        largest = max(settings.input_size for settings in preset.models.values())
        fer = open_face_store(prepare_real_data("fer", data_root, cache))
        utk = open_face_store(prepare_real_data("gender", data_root, cache, max_input_size=largest))
        return {"fer": fer, "gender": utk, "age": utk}, "real FER+ / UTKFace"
    synthetic = make_synthetic_faces(6000, 48, seed=0)
    return {"fer": synthetic, "gender": synthetic, "age": synthetic}, "synthetic faces (real data absent)"


def _time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def speedup_rows(data: dict[str, FaceData], sample: int) -> list[list]:
    rows = []
    cases = [("fer", 64, "mini VGG-f"), ("gender", 64, "mini VGG-f"), ("age", 64, "mini VGG-f"),
             ("fer", 4096, "paper VGG-f/VGG-face")]
    for task_name, dim, label in cases:
        task = get_task(task_name)
        labels = torch.as_tensor(data[task_name].split("train").labels(task_name))
        num = len(labels)
        fraction = load_preset("mini").grid(task_name, "vggf", "triplet_kd")[0].pool_fraction
        generator = torch.Generator().manual_seed(0)
        student = F.normalize(torch.randn(num, dim, generator=generator), dim=1)
        teacher = F.normalize(torch.randn(num, dim, generator=generator), dim=1)
        pool = draw_pool(num, fraction, generator)
        kwargs = {"age_threshold": task.age_threshold}
        fast_seconds, mined = _time(lambda: mine_hard_triplets(student, teacher, labels, pool, **kwargs), 7)
        anchors = torch.randperm(num, generator=generator)[:sample].sort().values
        start = time.perf_counter()
        reference = mine_hard_triplets_reference(student, teacher, labels, pool, anchors=anchors, **kwargs)
        per_anchor = (time.perf_counter() - start) / len(anchors)
        # Same triplets on the sample (rows where the vectorised miner kept the anchor).
        position = torch.full((num,), -1, dtype=torch.long)
        position[mined.anchors] = torch.arange(len(mined.anchors))
        at = position[reference.anchors]
        assert (at >= 0).all() and torch.equal(mined.positives[at], reference.positives) and \
            torch.equal(mined.negatives[at], reference.negatives), f"{task_name}: miners disagree"
        loop_seconds = per_anchor * num
        rows.append([task_name, label, f"{num:,} × {len(pool):,} pool, {dim}-d", fast_seconds, loop_seconds,
                     f"{loop_seconds / fast_seconds:,.0f}×"])
        print(" | ".join(str(v) for v in rows[-1]), flush=True)
    return rows


def epoch_rows(data: dict[str, FaceData], tasks: list[str]) -> list[list]:
    preset = load_preset("mini")
    settings = preset.arch("vggf")
    rows = []
    for task_name in tasks:
        task = get_task(task_name)
        train = preset.grid(task_name, "vggf", "triplet_kd")[0]
        spec = StageSpec(task=task_name, arch="vggf", stage="triplet_kd", train_visible=task.main_visible,
                         input_size=settings.input_size, width_mult=settings.width_mult, train=train,
                         dropout=settings.dropout)
        split = data[task_name].split("train")
        device = torch.device("cpu")
        torch.manual_seed(0)
        student, teacher = build_model(spec.model_spec), build_model(spec.model_spec).eval()
        input_spec = input_spec_for("vggf", settings.input_size)
        teacher_embeddings = embed(teacher, split, task, "full", input_spec, device)
        ctx = BatchContext(task=task, train=train, split=split, targets=torch.as_tensor(split.labels(task_name)),
                           visible=task.main_visible, input_spec=input_spec, device=device, channels_last=False,
                           teacher=teacher)
        timings: dict[str, float] = {}

        def embed_student(model):
            start = time.perf_counter()
            out = embed(model, split, task, task.main_visible, input_spec, device)
            timings["embed"] = time.perf_counter() - start
            return out

        strategy = TripletKDStrategy(ctx, teacher_embeddings, embed_student)
        order = strategy.epoch_order(1, student, torch.Generator().manual_seed(0))
        mining = strategy.mining_seconds - timings["embed"]  # the distances and the arg-max/min alone
        optimizer = make_optimizer(student, train)
        start = time.perf_counter()
        student.train()
        _run_epoch(student, strategy, order, optimizer, train.batch_size, torch.Generator().manual_seed(1), 1,
                   None, False)
        training = time.perf_counter() - start
        rows.append([task_name, f"{len(split):,} anchors, pool {train.pool_fraction:g}", training, timings["embed"],
                     mining, f"{100 * mining / training:.2f} %", f"{100 * timings['embed'] / training:.1f} %"])
        print(" | ".join(str(v) for v in rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=400, help="anchors the per-anchor loop is timed on")
    parser.add_argument("--epoch-tasks", default="fer,gender", help="tasks of part 2 (age mines like gender)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a grid node with cpus: 1)")
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA)
    parser.add_argument("--cache", type=Path, default=Path("occkd_runs/data"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data, source = mini_data(args.data_root, args.cache)
    print(machine_line())
    print(f"{args.threads} CPU thread(s); labels and faces: {source}")
    speed = speedup_rows(data, args.sample)
    epoch = epoch_rows(data, [t.strip() for t in args.epoch_tasks.split(",") if t.strip()])
    print("\nPart 1: mining one epoch's triplets (the per-anchor loop timed on "
          f"{args.sample} anchors, scaled to all)\n")
    print(markdown_table(["task", "embeddings of", "anchors × pool", "vectorised s", "per-anchor loop s", "speed-up"],
                         speed))
    print("\nPart 2: one triplet-KD epoch of VGG-f at the mini preset\n")
    print(markdown_table(["task", "epoch", "training s", "student re-embedding s", "mining s",
                          "mining / training", "re-embedding / training"], epoch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
