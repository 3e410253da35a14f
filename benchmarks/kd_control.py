"""Standard KD's control: the student trained on for the KD stage's epochs with the teacher's term off (λ = 0).

A grid's standard-KD node starts from the student's best checkpoint and trains it for more epochs; its gain
over the student mixes what the teacher adds with what more training adds. This script trains, from the
same student and with the same settings (optimizer, lr, epochs, batch, flips, seed), the λ = 0 version of
the node that validation chose, on a finished grid's storage, and tests it on the students' half against
the student (McNemar) and against the KD node (McNemar), on the same test faces. It reads the grid's
outputs and writes only under ``--out``.

    python benchmarks/kd_control.py --preset mid --tasks fer --archs vggf --data-root ../shared/data \\
        --storage /path/occkd_runs --out /tmp/kd_control

Not part of the grid (the control is not a method of the papers) nor of the test suite (it trains).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grid.artifacts import node_dir, read_predictions, read_result  # noqa: E402
from grid.data import prepare_data  # noqa: E402
from grid.graph import expand_graph  # noqa: E402
from occkd_core.checkpoints import checkpoint_input_spec, load_model  # noqa: E402
from occkd_core.data import open_face_store  # noqa: E402
from occkd_core.evaluation import evaluate_conditions  # noqa: E402
from occkd_core.presets import load_preset  # noqa: E402
from occkd_core.stats import mcnemar_test  # noqa: E402
from occkd_core.training import StageSpec, train_stage  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--tasks", default="fer")
    parser.add_argument("--archs", default="vggf")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--storage", type=Path, required=True, help="the finished grid's --storage")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    preset = load_preset(args.preset)
    tasks, archs = args.tasks.split(","), args.archs.split(",")
    prepared = prepare_data(preset, tasks, args.storage, args.data_root, write=False)
    graph = expand_graph(preset, tasks, archs, train_sizes={t: p.num_train for t, p in prepared.items()},
                         data_fingerprints={t: p.fingerprint for t, p in prepared.items()}, from_scratch=True)
    lines = []
    for task in tasks:
        data = open_face_store(prepared[task].path)
        for arch in archs:
            student = graph.nodes[f"{task}/{arch}/student"]
            kd_points = [n for n in graph.nodes.values() if (n.task, n.arch, n.strategy) == (task, arch, "standard_kd")]
            results = {n.key: read_result(node_dir(args.storage, n.hash)) for n in [student, *kd_points]}
            if any(r is None for r in results.values()):
                print(f"{task}/{arch}: the grid on {args.storage} has not finished its students and standard KD",
                      file=sys.stderr)
                return 2
            chosen = max(kd_points, key=lambda n: results[n.key]["val_score"])  # the grid's choice: validation
            spec = StageSpec.from_dict(chosen.params)
            control = dataclasses.replace(spec, train=dataclasses.replace(spec.train, lam=0.0))
            started = time.perf_counter()
            teacher = next(e.key for e in chosen.parents if e.role == "teacher")
            result = train_stage(control, data, args.out / f"{task}-{arch}" / "train",
                                 init_checkpoint=node_dir(args.storage, student.hash) / "train" / "best.pt",
                                 teacher_checkpoint=node_dir(args.storage, graph.nodes[teacher].hash) / "train" / "best.pt")
            seconds = time.perf_counter() - started
            model, checkpoint = load_model(result.best_checkpoint, "cpu")
            visible = spec.train_visible
            preds, values = evaluate_conditions(model, data.split("test"), spec.task_info,
                                                checkpoint_input_spec(checkpoint, spec.input_size),
                                                visibles=(visible,))[visible]
            correct = {"control": preds.predicted == preds.targets}
            for name, node in (("student", student), ("kd", chosen)):
                table = read_predictions(node_dir(args.storage, node.hash) / "predictions.parquet",
                                         test_set="test", visible=visible, model=node.strategy)
                correct[name] = table["correct"].to_numpy()
            line = {"node": chosen.key, "control": "lam=0.0", "val_score": result.best_val_score,
                    "best_epoch": result.best_epoch, "test_" + visible: values, "seconds": round(seconds, 1),
                    "student_val_score": results[student.key]["val_score"],
                    "kd_val_score": results[chosen.key]["val_score"]}
            for name in ("student", "kd"):
                test = mcnemar_test(correct["control"], correct[name])
                line[f"vs_{name}"] = {"p": test.pvalue, "control_better": bool(test.improved)}
            lines.append(line)
            print(json.dumps(line, default=float))
    (args.out / "control.json").write_text(json.dumps(lines, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
