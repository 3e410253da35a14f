"""GPU check (issue 27): occkd's CUDA path in one command, bounded to ~8 minutes on one H100/H200.

    PYTHONPATH=. python benchmarks/gpu_check.py --data-root DIR --out OUT

DIR holds ``utkface/UTKFace/*.jpg`` (default ``../shared/data``). OUT receives ``gpu_check.md`` and
``gpu_check.json`` (the same figures), rewritten after every part so that a run stopped half-way leaves
what it measured. Checkpoints and prepared stores go under ``--work`` and ``--cache``, never under OUT.
It needs the core only: no Ray, no MLflow, nothing outside what the lent GPU image holds.

Parts, in the order they run (``--parts`` picks some):

1. ``ddp``: the DDP code path on the device: a process group (NCCL on a GPU, world size 1: NCCL allows one
   rank per GPU), a teacher stage trained under it for 1 epoch and then resumed from its last checkpoint
   to 2, and ResNet-50 with its BatchNorm layers converted to SyncBatchNorm inside
   DistributedDataParallel for a few of the training loop's steps (``train_stage`` itself wraps only at
   world size > 1).
2. ``throughput``: occkd's training loop against a bare PyTorch loop (``benchmarks/bench_throughput.py``'s
   measurement) at the ``paper`` sizes, 224 px and full channel width, bf16 autocast and channels_last, VGG-f,
   VGG-face and ResNet-50 on UTKFace; img/s and their ratio (target >= 0.90).
3. ``chain``: the ``mid`` preset's chain for gender on the UTKFace faces with ``occkd_core`` alone:
   teacher -> student -> every later stage of the core's registry (standard KD, triplet KD) and each one's
   teacher-free control -> fusion (with the control fusion) -> McNemar against the student and against the
   controls, each stage's epochs, seconds and test accuracy.

Time. On a GPU the parts are bounded by: ``ddp`` two epochs of a 64 px ResNet-50 on the training faces and
a few steps (tens of seconds); ``throughput`` 3 loops x (2 warm-up runs of 3 batches + ``--tp-rounds`` x
``--tp-seconds``) per architecture (~20 s each at the defaults); ``chain`` the preset's epochs (``mid``:
teacher up to 40 and student up to 30, each stopped 5 epochs after its best, standard KD 5, triplet KD 2 x 4,
and the two controls as their stages) over the training faces (3,600 of the
6,000-face UTKFace subset), estimated at ~1 min per architecture from VGG-face's ~4 GFLOP per 64 px
training image (~1 PFLOP for its chain) and ~2,000 optimiser steps. ``--budget-s`` (default 450) is a hard
guard: past it no epoch, stage, fusion or architecture starts, and the tables say what was left out.
``--max-epochs``, ``--grid-points`` and ``--max-faces`` shrink the chain further. The plan with these
bounds is printed first, and the chain's estimate is refined from the measured 224 px throughput.

Without a GPU the same command runs a reduced CPU version, ~30 s of CPU time (tests/test_gpu_check.py runs
it): the smoke preset's sizes (32-48 px, 1/8 channel width) for both the throughput and the chain, 240 faces,
1 epoch per stage, the first point of each grid, gloo instead of NCCL, fp32 without channels_last, and no
SyncBatchNorm (PyTorch's is GPU-only). Every output says which it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_throughput import Setting, measure, stage_spec  # noqa: E402
from benchmarks.common import SHARED_DATA, machine_line, markdown_table  # noqa: E402
from benchmarks.gpu_check_chain import ChainSettings, run_chain  # noqa: E402
from occkd_core.data import FaceData, open_face_store  # noqa: E402
from occkd_core.data.sources import prepare_real_data  # noqa: E402
from occkd_core.data.utkface import parse_utkface_name  # noqa: E402
from occkd_core.models import ARCHITECTURES, build_model  # noqa: E402
from occkd_core.preprocess import input_spec_for  # noqa: E402
from occkd_core.presets import Preset, load_preset  # noqa: E402
from occkd_core.stages import STAGES, stage_starting_from  # noqa: E402
from occkd_core.strategies import BatchContext, SupervisedStrategy  # noqa: E402
from occkd_core.tasks import get_task  # noqa: E402
from occkd_core.stage_state import make_optimizer  # noqa: E402
from occkd_core.training import StageSpec, _run_epoch, train_stage  # noqa: E402

PARTS = ("ddp", "throughput", "chain")
#: FER+ training faces (majority labels), RESULTS.md section 10: docs/results.md's `mid` GPU estimate is for FER+.
FER_TRAIN_FACES = 25_057


@dataclass(frozen=True)
class Mode:
    """The sizes of one run: the real check on a GPU, or its reduced CPU version."""

    on_gpu: bool
    max_faces: int | None
    max_epochs: int | None
    grid_points: int | None
    tp_seconds: float
    tp_rounds: int
    budget_s: float
    throughput_size: str  # preset whose sizes the throughput measures
    description: str


GPU_MODE = Mode(True, max_faces=None, max_epochs=None, grid_points=None, tp_seconds=1.0, tp_rounds=5, budget_s=450,
                throughput_size="paper",
                description="GPU: paper sizes (224 px, full channel width) for the throughput, the mid preset for the "
                            "chain, bf16 autocast, channels_last, NCCL")
CPU_MODE = Mode(False, max_faces=240, max_epochs=1, grid_points=1, tp_seconds=0.1, tp_rounds=1, budget_s=120,
                throughput_size="smoke",
                description="CPU, a REDUCED setting that only shows the check runs: smoke sizes (32-48 px, 1/8 "
                            "channel width) for the throughput and the chain, 240 faces, 1 epoch per stage, first grid "
                            "point; fp32 without autocast or channels_last; gloo instead of NCCL; no SyncBatchNorm")


# -- the report ---------------------------------------------------------------------------------------------

@dataclass
class Report:
    """Everything measured, written as Markdown and JSON after each part."""

    out: Path
    meta: dict[str, Any]
    plan: list[dict[str, Any]] = field(default_factory=list)
    parts: list[dict[str, Any]] = field(default_factory=list)
    ddp: dict[str, Any] = field(default_factory=dict)
    throughput: list[dict[str, Any]] = field(default_factory=list)
    chain: dict[str, Any] = field(default_factory=dict)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        values = {"meta": self.meta, "plan": self.plan, "parts": self.parts, "ddp": self.ddp,
                  "throughput": self.throughput, "chain": self.chain}
        (self.out / "gpu_check.json").write_text(json.dumps(values, indent=1, default=_plain))
        (self.out / "gpu_check.md").write_text(self.markdown())

    def markdown(self) -> str:
        meta = self.meta
        lines = ["# occkd GPU check", "", meta["machine"], "", f"**Mode: {meta['mode']}**", "",
                 markdown_table(["", ""], [[k, meta[k]] for k in ("device", "torch", "torchvision", "cuda", "cudnn",
                                                                   "command")]),
                 "", "## Plan and time per part", "",
                 markdown_table(["part", "bound / estimate", "status", "seconds"],
                                [[p["part"], p["estimate"], *_part_status(self.parts, p["part"])] for p in self.plan]),
                 "", "## 1. DDP code path and resume", ""]
        lines.append(markdown_table(["check", "result"], [[k, _cell(v)] for k, v in self.ddp.items()])
                     if self.ddp else "not run")
        lines += ["", f"## 2. Training loop vs bare loop ({meta['throughput_size']} sizes)", ""]
        if self.throughput:
            lines.append(markdown_table(
                ["arch", "model", "precision", "bare img/s", "occkd img/s", "ratio (median)", "pair ratios IQR",
                 "target >= 0.90", "GPU", "torch"],
                [[r["arch"], r.get("model", ""), r.get("precision", ""), r.get("bare", "–"), r.get("occkd", "–"),
                  _cell(r.get("ratio", r.get("status"))), r.get("ratio_iqr", ""), r.get("target_met", ""),
                  meta["device"], meta["torch"]] for r in self.throughput]))
        else:
            lines.append("not run")
        lines += ["", f"## 3. The `{meta['chain_preset']}` chain, {meta['task']}, UTKFace", ""]
        chain = self.chain
        if "timing" not in chain:
            lines.append("not run")
        else:
            lines += [chain.get("data", ""), ""]
            lines.append("no stage ran" if not chain["stages"] else markdown_table(
                ["arch", "stage", "grid point", "status", "chosen", "epochs (run / planned)", "best epoch",
                 "train s", "s / epoch", "val", "test full", f"test {chain['main_visible']}"],
                [[r["arch"], r["stage"], r.get("point", ""), r["status"], "yes" if r.get("chosen") else "",
                  f"{r['epochs_run']} / {r['epochs_planned']}" if "epochs_run" in r else "", r.get("best_epoch", ""),
                  _cell(r.get("train_seconds", "")), _cell(r.get("seconds_per_epoch", "")), _cell(r.get("val_score", "")),
                  _cell(r.get("test_full", "")), _cell(r.get(f"test_{chain['main_visible']}", ""))]
                 for r in chain["stages"]]))
            lines += ["", "Fusion (SVM on the distilled students' embeddings, C chosen on validation):", ""]
            lines.append("none" if not chain["fusion"] else markdown_table(
                ["arch", "model", "status", "C", "val", f"test {chain['main_visible']}"],
                [[r["arch"], r["model"], r["status"], _cell(r.get("C", "")), _cell(r.get("val_score", "")),
                  _cell(r.get(f"test_{chain['main_visible']}", ""))] for r in chain["fusion"]]))
            lines += ["", f"Against the student on the {chain['main_visible']} half of the test faces (paired test; "
                          "the papers' rule: raw p < 0.05; Holm over each architecture's comparisons):", ""]
            lines.append(markdown_table(
                ["arch", "model", "test", "model", "student", "b", "c", "p", "p Holm", "papers' rule", "Holm"],
                [[r["arch"], r["model"], r["test"], _cell(r["model_value"]), _cell(r["baseline_value"]),
                  r.get("b", ""), r.get("c", ""), _cell(r["pvalue"]), _cell(r["pvalue_holm"]), r["verdict_paper"],
                  r["verdict_holm"]] for r in chain["comparisons"]]) if chain["comparisons"] else "none")
            lines += ["", "Time per architecture:", ""]
            lines.append(markdown_table(
                ["arch", "status", "chain s", "training s", "fusion s", "weighted image passes", "estimate s",
                 f"FER+ at {meta['chain_preset']}, scaled (min)"],
                [[r["arch"], r["status"], _cell(r.get("seconds", "")), _cell(r.get("train_seconds", "")),
                  _cell(r.get("fusion_seconds", "")), _cell(r.get("image_passes", "")), _cell(r.get("estimate_s", "")),
                  _cell(r.get("fer_minutes", ""))] for r in chain["timing"]]))
            lines += ["", chain.get("scaling_note", "")]
            lines += [f"- {note}" for note in chain.get("notes", [])]
        return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _cell(value: Any) -> Any:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return value if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return value


def _part_status(parts: list[dict[str, Any]], name: str) -> list[Any]:
    done = next((p for p in parts if p["part"] == name), None)
    return [done["status"], done["seconds"]] if done else ["not run", ""]


# -- data ---------------------------------------------------------------------------------------------------

def utkface_root(data_root: Path, cache: Path, max_faces: int | None) -> Path:
    """``data_root``, or with ``max_faces`` a data root under ``cache`` that links that many of its UTKFace
    files, evenly spread over the sorted names (so over ages and genders), for a short run."""
    folders = [data_root / "utkface" / "UTKFace", data_root / "utkface"]
    folder = next((f for f in folders if f.is_dir() and any(n.lower().endswith(".jpg") for n in os.listdir(f))), None)
    if folder is None:
        raise SystemExit(f"no UTKFace faces under {data_root} (expected utkface/UTKFace/*.jpg). On the GPU machine "
                         f"copy them into the repository, e.g. `mkdir -p occkd_runs/gpu_data && cp -r "
                         f"../shared/data/utkface occkd_runs/gpu_data/`, and pass --data-root occkd_runs/gpu_data")
    names = sorted(n for n in os.listdir(folder) if parse_utkface_name(n) is not None)
    if max_faces is None or max_faces >= len(names):
        return data_root
    chosen = [names[i * len(names) // max_faces] for i in range(max_faces)]
    subset = cache / f"utkface-subset-{max_faces}"
    target = subset / "utkface" / "UTKFace"
    if not target.is_dir() or sorted(os.listdir(target)) != chosen:
        shutil.rmtree(subset, ignore_errors=True)
        target.mkdir(parents=True)
        for name in chosen:
            os.symlink((folder / name).resolve(), target / name)
    return subset


def load_faces(root: Path, cache: Path, max_input_size: int, log: Callable[[str], None]) -> FaceData:
    started = time.perf_counter()
    data = open_face_store(prepare_real_data("gender", root, cache, max_input_size=max_input_size))
    sizes = {name: len(data.split(name)) for name in ("train", "val", "test")}
    log(f"UTKFace store at {data.split('train').images.shape[1]} px: {sizes} faces ({time.perf_counter() - started:.1f} s)")
    return data


# -- part 1: DDP and resume ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_ddp_and_resume(data: FaceData, preset: Preset, task: str, arch: str, device: torch.device, work: Path,
                         log: Callable[[str], None]) -> dict[str, Any]:
    on_gpu = device.type == "cuda"
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    out = work / "ddp-resume"
    shutil.rmtree(out, ignore_errors=True)
    try:
        settings, info = preset.arch(arch), get_task(task)
        teacher = stage_starting_from("weights")
        train = replace(preset.train_spec(task, arch, teacher), epochs=1)
        spec = StageSpec(task=task, arch=arch, stage=teacher, train_visible="full", input_size=settings.input_size,
                         width_mult=settings.width_mult, train=train, dropout=settings.dropout)
        first = train_stage(spec, data, out, device=device)
        seen: list[int] = []
        resumed = train_stage(replace(spec, train=replace(train, epochs=2)), data, out, device=device,
                              on_epoch=lambda record: seen.append(record.epoch))
        resumed_ok = (seen == [2] and [r.epoch for r in resumed.history] == [1, 2]
                      and resumed.history[0] == first.history[0])
        log(f"ddp: train_stage under {backend} (world 1): epoch 1, then resumed for epochs {seen}")

        # train_stage wraps a model in DDP only at world size > 1, which one GPU cannot host under NCCL (one rank
        # per GPU): wrap here as it does there, SyncBatchNorm first on a GPU, and run the loop's own steps.
        model = build_model(spec.model_spec).to(device, memory_format=torch.channels_last if on_gpu
                                                else torch.contiguous_format)
        num_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if on_gpu:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        num_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()]
                                                            if on_gpu else None)
        split = data.split("train")
        ctx = BatchContext(task=info, train=train, split=split, targets=torch.as_tensor(split.labels(task)).to(device),
                           visible="full", input_spec=input_spec_for(arch, settings.input_size), device=device,
                           channels_last=on_gpu)
        optimizer = make_optimizer(model, train)
        before = next(model.parameters()).detach().clone()
        rows = np.arange(min(len(split), 3 * train.batch_size))
        sums, _, _ = _run_epoch(wrapped, SupervisedStrategy(ctx), rows, optimizer, train.batch_size,
                                torch.Generator().manual_seed(0), 1, None, on_gpu)
        steps = -(-len(rows) // train.batch_size)
        changed = not torch.equal(before, next(model.parameters()).detach())
        probe = torch.full((1,), 3.0, device=device)
        dist.all_reduce(probe)
        all_reduce_ok = float(probe) == 3.0  # world size 1: the sum is the value itself
        log(f"ddp: {num_sync}/{num_bn} BatchNorm layers as SyncBatchNorm, {steps} DDP steps, loss {sums}")
    finally:
        dist.destroy_process_group()
    checks = {"resume": resumed_ok, "weights changed by the DDP steps": changed, "all_reduce": all_reduce_ok,
              "loss finite": all(np.isfinite(v) for v in sums.values())}
    if on_gpu:
        checks["SyncBatchNorm conversion"] = num_bn > 0 and num_sync == num_bn
    return {
        "backend": backend + ("" if on_gpu else " (CPU: NCCL needs a GPU)"), "world size": 1,
        "model": f"{arch}, {settings.input_size} px, width {settings.width_mult:g}, batch {train.batch_size}",
        "train_stage under the process group": f"epoch 1, then resumed from last.pt: epochs trained {seen}, history "
                                                f"{[r.epoch for r in resumed.history]}",
        "BatchNorm layers": num_bn,
        "SyncBatchNorm layers": num_sync if on_gpu else "skipped (PyTorch's SyncBatchNorm is GPU-only)",
        "DDP steps of the training loop": steps,
        **checks,
        "ok": all(checks.values()),
    }


# -- part 2: throughput -------------------------------------------------------------------------------------

def measure_throughput(data: FaceData, mode: Mode, task: str, archs: list[str], device: torch.device,
                       deadline: float, report: Report, log: Callable[[str], None]) -> None:
    label = f"UTKFace real, stored {data.split('train').images.shape[1]} px"
    precision = "bf16 autocast, channels_last" if mode.on_gpu else "fp32, contiguous (CPU)"
    for arch in archs:
        if time.monotonic() > deadline:
            report.throughput.append({"arch": arch, "status": "not run (time budget)"})
            continue
        setting = Setting(mode.throughput_size, task, arch, data, label)
        spec = stage_spec(setting)
        result = measure(setting, device, mode.tp_seconds, mode.tp_rounds)
        low, high = result["ratio_spread"]
        row = {"arch": arch, "model": f"{spec.input_size} px, width {spec.width_mult:g}, batch {spec.train.batch_size}",
               "precision": precision, "bare": result["bare"], "occkd": result["occkd"], "ratio": result["ratio"],
               "ratio_iqr": f"{low:.2f}-{high:.2f}", "target_met": "yes" if result["ratio"] >= 0.90 else "NO",
               "input_size": spec.input_size, "images_per_run": result["images"],
               "bare_step_ms": result["bare_step_ms"], "input_ms": result["input_ms"]}
        report.throughput.append(row)
        log(f"throughput {arch}: bare {result['bare']:,.0f} img/s, occkd {result['occkd']:,.0f} img/s, "
            f"ratio {result['ratio']:.3f}")
        report.write()


# -- the plan -----------------------------------------------------------------------------------------------

def chain_image_passes(preset: Preset, task: str, arch: str, num_train: int, mode: Mode) -> float:
    """Training images the chain pushes through, weighted by each stage's relative cost (its registry entry)."""
    total = 0.0
    for name, stage in STAGES.items():
        for train in preset.grid(task, arch, name)[: mode.grid_points or None]:
            epochs = min(train.epochs, mode.max_epochs) if mode.max_epochs else train.epochs
            total += epochs * num_train * stage.cost
    return total


def chain_estimates(report: Report, preset: Preset, archs: list[str]) -> dict[str, float]:
    """Seconds per architecture's chain from the measured throughput, scaled by pixels to the chain's input
    size (a rough guide: small inputs use a GPU less well, and validation and checkpoints add to it)."""
    estimates = {}
    measured = {r["arch"]: r for r in report.throughput if "occkd" in r}
    for arch in archs:
        if arch in measured:
            row, size = measured[arch], preset.arch(arch).input_size
            rate = row["occkd"] * (row["input_size"] / size) ** 2
            estimates[arch] = report.meta["chain_passes"][arch] / rate
    return estimates


# -- main ---------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Defaults marked GPU/CPU differ between the real check and its reduced "
                                            "CPU version.")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA,
                        help="folder holding utkface/UTKFace/*.jpg (default: ../shared/data beside the repository)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run, of {', '.join(PARTS)}")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help="architectures, for the throughput and the chain")
    parser.add_argument("--task", default="gender", choices=("gender", "age"), help="the UTKFace task of the chain")
    parser.add_argument("--preset", default="mid", help="the chain's preset (name or YAML path)")
    parser.add_argument("--max-faces", type=int, default=None,
                        help="use this many UTKFace files, spread over the sorted names (GPU: all; CPU: 240)")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="cap every chain stage's epochs (GPU: the preset's; CPU: 1)")
    parser.add_argument("--grid-points", type=int, default=None,
                        help="train the first N points of each stage's grid (GPU: all; CPU: 1)")
    parser.add_argument("--tp-seconds", type=float, default=None, help="length of each timed throughput run "
                                                                       "(GPU: 1.0; CPU: 0.1)")
    parser.add_argument("--tp-rounds", type=int, default=None, help="rounds of alternating timed runs (GPU: 5; CPU: 1)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="past this many seconds no new epoch, stage or architecture starts (GPU: 450; CPU: 120)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU default: 1)")
    parser.add_argument("--cache", type=Path, default=Path("occkd_runs/data"),
                        help="prepared stores (the grid's default folder, so they are shared)")
    parser.add_argument("--work", type=Path, default=Path("occkd_runs/gpu_check"),
                        help="checkpoints of the chain and the DDP check (emptied per run)")
    return parser.parse_args(argv)


def resolve_mode(args: argparse.Namespace, on_gpu: bool) -> Mode:
    base = GPU_MODE if on_gpu else CPU_MODE
    given = {"max_faces": args.max_faces, "max_epochs": args.max_epochs, "grid_points": args.grid_points,
             "tp_seconds": args.tp_seconds, "tp_rounds": args.tp_rounds, "budget_s": args.budget_s}
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device and DDP's device_ids need the index
        device = torch.device("cuda", torch.cuda.current_device())
    mode = resolve_mode(args, device.type == "cuda")
    deadline = started + mode.budget_s
    if args.threads or not mode.on_gpu:
        torch.set_num_threads(args.threads or 1)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = sorted(set(parts) - set(PARTS)) + sorted(set(archs) - set(ARCHITECTURES))
    if unknown:
        raise SystemExit(f"unknown part(s) or architecture(s) {unknown}; parts: {', '.join(PARTS)}; "
                         f"architectures: {', '.join(ARCHITECTURES)}")

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {line}", flush=True)

    # On the CPU both parts run at the smoke preset's sizes (tiny), the chain with the chain preset's settings.
    preset = load_preset(args.preset)
    if not mode.on_gpu:
        preset = replace(preset, models=load_preset("smoke").models)
    gpu = torch.cuda.get_device_name(device) if mode.on_gpu else "no GPU (CPU run)"
    report = Report(out=args.out, meta={
        "machine": machine_line(), "mode": mode.description, "device": gpu, "torch": torch.__version__,
        "torchvision": _version("torchvision"), "cuda": torch.version.cuda or "–",
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "–",
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": asdict(mode), "task": args.task, "chain_preset": preset.name,
        "throughput_size": mode.throughput_size, "archs": archs,
    })
    log(f"mode: {mode.description}")
    log(f"device {device} ({gpu}), torch {torch.__version__}, budget {mode.budget_s:g} s")

    root = utkface_root(args.data_root, args.cache, mode.max_faces)
    chain_size = max(preset.arch(a).input_size for a in ARCHITECTURES)  # as grid/data.py stores it
    chain_data = load_faces(root, args.cache, chain_size, log)
    num_train = len(chain_data.split("train"))
    report.meta["chain_passes"] = {arch: chain_image_passes(preset, args.task, arch, num_train, mode) for arch in archs}
    tp_bound = len(archs) * 3 * mode.tp_rounds * mode.tp_seconds
    report.plan = [
        {"part": "ddp", "estimate": "2 epochs of a teacher + 3 DDP steps (tens of seconds on a GPU)"},
        {"part": "throughput", "estimate": f"{tp_bound:.0f} s of timed runs ({len(archs)} archs x 3 loops x "
                                           f"{mode.tp_rounds} rounds x {mode.tp_seconds:g} s) + warm-ups"},
        {"part": "chain", "estimate": "; ".join(f"{arch}: {p:,.0f} weighted image passes"
                                                for arch, p in report.meta["chain_passes"].items())},
    ]
    report.plan = [p for p in report.plan if p["part"] in parts]
    for item in report.plan:
        log(f"plan {item['part']}: {item['estimate']}")
    args.work.mkdir(parents=True, exist_ok=True)
    report.write()

    def run_part(name: str, body: Callable[[], None]) -> None:
        part_started = time.perf_counter()
        log(f"== {name}")
        try:
            body()
            status = "ok"
        except Exception as err:  # one broken part must not hide what the others measure
            traceback.print_exc()
            status = f"FAILED: {type(err).__name__}: {err}"
        report.parts.append({"part": name, "status": status, "seconds": round(time.perf_counter() - part_started, 1)})
        report.write()
        log(f"== {name}: {status} ({report.parts[-1]['seconds']} s)")

    if "ddp" in parts:
        def ddp() -> None:
            arch = "resnet50" if "resnet50" in archs else archs[0]  # ResNet-50: the architecture with BatchNorm
            report.ddp = check_ddp_and_resume(chain_data, preset, args.task, arch, device, args.work, log)
            if not report.ddp["ok"]:
                raise RuntimeError("a DDP or resume check failed: " + ", ".join(
                    k for k, v in report.ddp.items() if v is False))
        run_part("ddp", ddp)
    if "throughput" in parts:
        def throughput() -> None:
            size = max(load_preset(mode.throughput_size).arch(a).input_size for a in archs)
            data = chain_data if size <= chain_size else load_faces(root, args.cache, size, log)
            measure_throughput(data, mode, args.task, archs, device, deadline, report, log)
        run_part("throughput", throughput)
    if "chain" in parts:
        def chain() -> None:
            estimates = chain_estimates(report, preset, archs)
            for arch, seconds in estimates.items():
                log(f"estimate chain {arch}: ~{seconds:.0f} s of training (from the measured throughput, by pixels)")
            split_sizes = {name: len(chain_data.split(name)) for name in ("train", "val", "test")}
            report.chain = {"main_visible": get_task(args.task).main_visible, "split_sizes": split_sizes,
                            "data": f"UTKFace ({root}), stored {chain_data.split('train').images.shape[1]} px: "
                                    f"{split_sizes} faces; preset {preset.name}"
                                    + ("" if mode.on_gpu else " with the smoke preset's sizes (reduced CPU setting)")}
            settings = ChainSettings(preset=preset, task=args.task, archs=tuple(archs), device=device,
                                     work=args.work / "chain", deadline=deadline, max_epochs=mode.max_epochs,
                                     grid_points=mode.grid_points)
            run_chain(chain_data, settings, log, result=report.chain, progress=report.write)
            full_chain = mode.max_epochs is None and mode.grid_points is None
            for row in report.chain["timing"]:
                row["estimate_s"] = estimates.get(row["arch"])
                if full_chain and row["status"] == "ran":  # every stage and the fusion, none cut short
                    ablation = row["student_train_seconds"]
                    row["fer_minutes"] = (row["train_seconds"] + ablation) * FER_TRAIN_FACES / row["num_train"] / 60
            report.chain["scaling_note"] = (
                f"FER+ column: this chain's training time plus the student's once more (the grid's ablation student), "
                f"scaled by FER+'s {FER_TRAIN_FACES:,} training faces over this run's {num_train:,}: docs/results.md's "
                f"`mid` FER+ estimate, from a measurement of the same stages on UTKFace (same epochs; FER+ mines "
                f"10 % pools instead of 20 %; its fusion is not included)."
                + ("" if full_chain else " Not given here: epochs or grid points were capped in this run.")
                + " Not given for an architecture whose chain the time budget cut short.")
        run_part("chain", chain)

    total = time.monotonic() - started
    report.meta["total_seconds"] = round(total, 1)
    report.write()
    print()
    print(report.markdown())
    log(f"wrote {args.out / 'gpu_check.md'} and {args.out / 'gpu_check.json'} in {total:.0f} s")
    return 0 if all(p["status"] == "ok" for p in report.parts) else 1


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    sys.exit(main())
