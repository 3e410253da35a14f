"""Training throughput: occkd's loop against a bare PyTorch loop over the same model (issue 5, target 1).

occkd side: ``occkd_core.training._run_epoch``, the loop every stage trains with, on a student stage:
rows gathered from the memory-mapped Arrow store, uint8 batch to the device, resize, occlusion,
normalisation and flips there, the strategy's loss, the optimiser step, the finiteness check, and the
epoch's train metrics from the collected outputs.
Bare side: the same architecture, channel width multiplier, optimiser and loss, on float tensors already at the input size
in memory (prepared once, outside the timing): forward, loss, zero_grad, backward, step.
A third loop, occkd's with the input path swapped for the bare loop's tensors, shows what the loop's
own bookkeeping costs; "input path ms/batch" times the input path alone.

The loops alternate in rounds of timed runs, so a machine that speeds up or slows down during the run
affects every loop of a round; the reported ratio is the median over rounds of bare time ÷ occkd time
(images/s are each loop's median).

    python benchmarks/bench_throughput.py                  # smoke and mini sizes on the CPU
    python benchmarks/bench_throughput.py --sizes paper    # 224 px with AMP (needs a GPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHARED_DATA, machine_line, markdown_table  # noqa: E402
from occkd_core.data import FaceData, make_synthetic_faces, open_face_store, write_face_store  # noqa: E402
from occkd_core.data.sources import prepare_real_data  # noqa: E402
from occkd_core.evaluation import task_metrics  # noqa: E402
from occkd_core.losses import supervised_loss  # noqa: E402
from occkd_core.models import build_model  # noqa: E402
from occkd_core.preprocess import input_spec_for, prepare_batch, random_flips  # noqa: E402
from occkd_core.presets import load_preset  # noqa: E402
from occkd_core.strategies import BatchContext, SupervisedStrategy  # noqa: E402
from occkd_core.models import ARCHITECTURES  # noqa: E402
from occkd_core.tasks import get_task  # noqa: E402
from occkd_core.stage_state import make_optimizer  # noqa: E402
from occkd_core.training import StageSpec, _as_predictions, _run_epoch  # noqa: E402


@dataclass(frozen=True)
class Setting:
    size: str  # preset name: smoke | mini | paper
    task: str
    arch: str
    data: FaceData
    data_label: str


def _store(data: FaceData, path: Path) -> FaceData:
    """Write once and reopen memory-mapped, as a grid node reads its data."""
    if not path.exists():
        write_face_store(path, data)
    return open_face_store(path)


def load_settings(sizes: list[str], archs: list[str], cache: Path, data_root: Path | None) -> list[Setting]:
    settings = []
    cache.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        preset = load_preset(size)
        if size == "smoke":
            data = _store(make_synthetic_faces(preset.data.num_faces, preset.data.image_size, seed=0),
                          cache / f"bench-synthetic-{preset.data.image_size}.arrow")
            sources = [("gender", data, f"synthetic {preset.data.image_size} px (smoke's own data)")]
        elif data_root is not None and data_root.is_dir():
            fer = open_face_store(prepare_real_data("fer", data_root, cache))
            largest = max(settings.input_size for settings in preset.models.values())  # as grid/data.py does
            utk = open_face_store(prepare_real_data("gender", data_root, cache, max_input_size=largest))
            sources = [("fer", fer, "FER+ real, stored 48 px grey"),
                       ("gender", utk, f"UTKFace real, stored {utk.split('train').images.shape[1]} px")]
        else:  # no real data here: synthetic faces of the same stored sizes stand in
            side = 224 if size == "paper" else 48
            data = _store(make_synthetic_faces(3000, side, seed=0), cache / f"bench-synthetic-{side}.arrow")
            sources = [("gender", data, f"synthetic {side} px (real data absent)")]
        for task, data, label in sources:
            settings.extend(Setting(size, task, arch, data, label) for arch in archs)
    return settings


def stage_spec(setting: Setting) -> StageSpec:
    preset = load_preset(setting.size)
    arch = preset.arch(setting.arch)
    info = get_task(setting.task)
    return StageSpec(task=setting.task, arch=setting.arch, stage="student", train_visible=info.main_visible,
                     input_size=arch.input_size, width_mult=arch.width_mult,
                     train=preset.train_spec(setting.task, setting.arch, "student"), dropout=arch.dropout)


def _memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on a GPU, for the model and its inputs alike, as ``train_stage`` trains there."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def batch_rows(num_train: int, num_images: int, seed: int) -> np.ndarray:
    """``num_images`` training rows in shuffled order, cycling through the set if it is smaller."""
    generator = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(num_train, generator=generator).numpy() for _ in range(-(-num_images // num_train))]
    return np.concatenate(perms)[:num_images]


class OcckdLoop:
    def __init__(self, spec: StageSpec, data: FaceData, device: torch.device) -> None:
        task = spec.task_info
        self.task, self.spec, self.device = task, spec, device
        self.split = data.split("train")
        self.labels = self.split.labels(task.name)
        self.model = build_model(spec.model_spec).to(device, memory_format=_memory_format(device))
        self.optimizer = make_optimizer(self.model, spec.train)
        targets = torch.as_tensor(self.labels).to(device)
        self.ctx = BatchContext(task=task, train=spec.train, split=self.split, targets=targets,
                                visible=spec.train_visible, input_spec=input_spec_for(spec.arch, spec.input_size),
                                device=device, channels_last=device.type == "cuda")
        self.strategy = SupervisedStrategy(self.ctx)
        self.flips = torch.Generator().manual_seed(1)

    def run(self, rows: np.ndarray) -> None:
        self.model.train()
        _, outputs, rows = _run_epoch(self.model, self.strategy, rows, self.optimizer, self.spec.train.batch_size,
                                      self.flips, epoch=1, dsd=None, on_gpu=self.device.type == "cuda")
        task_metrics(self.task, _as_predictions(outputs, self.labels[rows], self.spec.train_visible))


class ReadyInputs(SupervisedStrategy):
    """The occkd loop's strategy with the input path swapped for the bare loop's ready tensors: what the
    loop's own bookkeeping (loss terms, finiteness checks, outputs, metrics) costs."""

    def __init__(self, ctx: BatchContext, bare: "BareLoop", rows: np.ndarray) -> None:
        super().__init__(ctx)
        batch = bare.spec.train.batch_size
        self.inputs = {int(rows[i]): bare.inputs[i:i + batch] for i in range(0, len(rows), batch)}

    def loss_terms(self, model, rows, flip):
        outputs, _ = model(self.inputs[int(rows[0])])
        return {"supervised": supervised_loss(outputs, self.ctx.targets[rows], self.ctx.task.kind)}, outputs


class BareLoop:
    def __init__(self, spec: StageSpec, data: FaceData, rows: np.ndarray, device: torch.device) -> None:
        task = spec.task_info
        self.spec, self.device = spec, device
        self.model = build_model(spec.model_spec).to(device, memory_format=_memory_format(device))
        self.optimizer = make_optimizer(self.model, spec.train)
        split = data.split("train")
        input_spec = input_spec_for(spec.arch, spec.input_size)
        memory_format = _memory_format(device)
        # Inputs made once, outside the timing: the bare loop never touches the store or preprocessing.
        chunks = [prepare_batch(torch.from_numpy(split.images[np.sort(rows[i:i + 256])]).to(device),
                                spec.train_visible, input_spec) for i in range(0, len(rows), 256)]
        self.inputs = torch.cat(chunks).contiguous(memory_format=memory_format)
        self.targets = torch.as_tensor(split.labels(task.name)[rows]).to(device)
        self.regression = not task.is_classification

    def run(self, rows: np.ndarray) -> None:
        self.model.train()
        batch = self.spec.train.batch_size
        for start in range(0, len(rows), batch):
            x, y = self.inputs[start:start + batch], self.targets[start:start + batch]
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                outputs, _ = self.model(x)
                loss = F.l1_loss(outputs[:, 0].float(), y) if self.regression else F.cross_entropy(outputs.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def _timed(loop, rows: np.ndarray, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loop.run(rows)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(setting: Setting, device: torch.device, seconds: float, rounds: int) -> dict[str, float]:
    spec = stage_spec(setting)
    batch = spec.train.batch_size
    num_train = len(setting.data.split("train"))
    torch.manual_seed(0)
    occkd = OcckdLoop(spec, setting.data, device)
    warm = batch_rows(num_train, 3 * batch, seed=0)
    # The first run pays for lazy initialisation (on a GPU: the CUDA context, cuDNN's kernel choice); the
    # second, warm, sizes the timed runs, which would otherwise be too short to time reliably.
    _timed(occkd, warm, device)
    probe = _timed(occkd, warm, device)
    num_batches = max(3, round(seconds / (probe / 3)))
    rows = batch_rows(num_train, num_batches * batch, seed=1)
    torch.manual_seed(0)
    bare = BareLoop(spec, setting.data, rows, device)
    bare.run(rows[: 3 * batch])
    torch.manual_seed(0)
    ready = OcckdLoop(spec, setting.data, device)
    ready.strategy = ReadyInputs(ready.ctx, bare, rows)
    ready.run(rows[: 3 * batch])
    occkd_times, bare_times, ready_times = [], [], []
    for index in range(rounds):
        # Adjacent runs share the machine's state of the moment; alternate which side goes first.
        order = (bare, occkd, ready) if index % 2 == 0 else (ready, occkd, bare)
        times = {id(loop): _timed(loop, rows, device) for loop in order}
        bare_times.append(times[id(bare)])
        occkd_times.append(times[id(occkd)])
        ready_times.append(times[id(ready)])
    # The input path alone (gather from the store, flips, resize, occlusion, normalisation), without the
    # model: small fixed work, so it is far less noisy than the ratio on this shared machine.
    ctx = occkd.ctx
    start = time.perf_counter()
    for begin in range(0, len(rows), batch):
        chunk = rows[begin:begin + batch]
        prepare_batch(ctx.images(chunk), ctx.visible, ctx.input_spec, random_flips(len(chunk), occkd.flips, device),
                      ctx.channels_last)
    if device.type == "cuda":
        torch.cuda.synchronize()
    input_ms = 1e3 * (time.perf_counter() - start) / num_batches
    ratios = sorted(b / o for b, o in zip(bare_times, occkd_times))
    return {"images": len(rows), "bare": len(rows) / statistics.median(bare_times),
            "input_ms": input_ms, "bare_step_ms": 1e3 * statistics.median(bare_times) / num_batches,
            "ratio_spread": (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]),
            "ready_ratio": statistics.median(b / r for b, r in zip(bare_times, ready_times)),
            "occkd": len(rows) / statistics.median(occkd_times),
            # The median of per-pair ratios: a slow spell on this shared machine hits both halves of a pair.
            "ratio": statistics.median(b / o for b, o in zip(bare_times, occkd_times))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="smoke,mini", help="presets whose sizes to measure (smoke, mini, paper)")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (a grid node with cpus: 1 trains with 1)")
    parser.add_argument("--seconds", type=float, default=1.5, help="target length of each timed run")
    parser.add_argument("--rounds", type=int, default=11, help="rounds of alternating timed runs (medians taken)")
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA,
                        help="real data for the mini size (absent: synthetic faces of the same size)")
    parser.add_argument("--cache", type=Path, default=Path("occkd_runs/data"),
                        help="where prepared stores are cached (the grid's default, so they are shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if "paper" in sizes and device.type != "cuda":
        parser.error("--sizes paper (224 px, full channel width) needs a GPU: pass --device cuda on a machine with one")
    settings = load_settings(sizes, [a.strip() for a in args.archs.split(",")], args.cache, args.data_root)
    print(machine_line())
    print(f"device {device}, {args.threads} CPU thread(s), student stage, {args.rounds} rounds of timed runs "
          f"of ~{args.seconds:g} s" + (", AMP bf16 + channels_last" if device.type == "cuda" else ""))
    rows = []
    for setting in settings:
        spec = stage_spec(setting)
        result = measure(setting, device, args.seconds, args.rounds)
        low, high = result["ratio_spread"]
        rows.append([setting.size, setting.task, setting.arch, setting.data_label,
                     f"{spec.input_size} px, width {spec.width_mult:g}, batch {spec.train.batch_size}",
                     result["bare"], result["occkd"], f"{result['bare_step_ms']:.1f}", f"{result['input_ms']:.2f}",
                     f"{result['ready_ratio']:.3f}", f"{low:.2f}-{high:.2f}", f"{result['ratio']:.3f}"])
        print(" | ".join(str(v) for v in rows[-1]), flush=True)
    print()
    print(markdown_table(["size", "task", "arch", "data", "model", "bare img/s", "occkd img/s", "bare step ms",
                          "input path ms/batch", "loop on ready inputs ratio", "pair ratios IQR",
                          "ratio (median)"], rows))
    worst = min(float(r[-1]) for r in rows)
    print(f"\nlowest ratio {worst:.3f} (target >= 0.90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
