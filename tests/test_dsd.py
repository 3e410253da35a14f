"""Dense-Sparse-Dense schedule and pruner (spec §9, §15 #7)."""

from __future__ import annotations

import pytest
import torch

from occkd_core.dsd import DSDPruner, DSDSchedule
from occkd_core.models import FaceNet, ModelSpec, build_model


def small(arch: str) -> FaceNet:
    return build_model(ModelSpec(arch, 8, width_mult=0.125, dropout=False))


def test_schedule_9_and_10_epochs() -> None:
    # 9 // 3 = 3 epochs per phase; 10 // 3 = 3, the remainder (1) goes to the final dense phase
    assert [DSDSchedule(9).phase(e) for e in range(9)] == ["dense"] * 3 + ["sparse"] * 3 + ["redense"] * 3
    assert [DSDSchedule(10).phase(e) for e in range(10)] == ["dense"] * 3 + ["sparse"] * 3 + ["redense"] * 4
    assert (DSDSchedule(10).sparse_start, DSDSchedule(10).redense_start) == (3, 6)
    # 11 // 3 = 3: 3 / 3 / 5
    assert [DSDSchedule(11).phase(e) for e in range(11)].count("redense") == 5


def test_schedule_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="num_epochs >= 1"):
        DSDSchedule(0)
    with pytest.raises(ValueError, match=r"epoch must be in \[0, 9\)"):
        DSDSchedule(9).phase(9)
    # fewer epochs than phases: only plain dense training is left
    assert [DSDSchedule(2).phase(e) for e in range(2)] == ["redense", "redense"]


def test_vggf_rates_and_exact_sparsity_after_prune() -> None:
    model = small("vggf")
    pruner = DSDPruner(model)
    assert pruner.sparsities == {"features.conv2.weight": 0.2, "features.conv3.weight": 0.3,
                                 "features.conv4.weight": 0.4, "features.conv5.weight": 0.5}
    pruner.prune()
    params = dict(model.named_parameters())
    # conv2 at channel width multiplier 0.125: 32 x 8 x 5 x 5 = 6,400 weights; 20% = 1,280 zeroed exactly
    assert params["features.conv2.weight"].numel() == 6400
    assert int((params["features.conv2.weight"] == 0).sum()) == 1280
    measured = pruner.sparsity()
    for name, rate in pruner.sparsities.items():
        assert measured[name] == pytest.approx(rate, abs=1e-3), name
    # never pruned: the first conv layer and the head
    assert int((params["features.conv1.weight"] == 0).sum()) == 0
    assert int((params["head.weight"] == 0).sum()) == 0


def test_prune_removes_the_smallest_magnitudes() -> None:
    model = small("vggf")
    weight = dict(model.named_parameters())["features.conv3.weight"]
    before = weight.detach().abs().flatten().clone()
    pruner = DSDPruner(model, {"features.conv3.weight": 0.3})
    pruner.prune()
    kept = pruner.masks["features.conv3.weight"].flatten()
    # every pruned magnitude is <= every kept one
    assert before[~kept].max() <= before[kept].min()
    assert int((~kept).sum()) == round(0.3 * weight.numel())


def test_vggface_rates_rise_linearly() -> None:
    pruner = DSDPruner(small("vggface"))
    rates = list(pruner.sparsities.values())
    assert len(rates) == 12 and rates[0] == pytest.approx(0.2) and rates[-1] == pytest.approx(0.7)
    # equal steps of 0.5 / 11 = 0.04545...
    assert all(b - a == pytest.approx(0.5 / 11) for a, b in zip(rates, rates[1:]))


def _sgd_steps(model: FaceNet, optimizer: torch.optim.Optimizer, pruner: DSDPruner | None, steps: int) -> None:
    for _ in range(steps):
        logits, _ = model(torch.rand(4, 3, 40, 40))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if pruner is not None:
            pruner.apply_masks()


def test_masks_hold_through_training_and_release_frees_them() -> None:
    torch.manual_seed(0)
    model = small("vggf")
    pruner = DSDPruner(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.prune()
    masks = pruner.masks
    _sgd_steps(model, optimizer, pruner, steps=3)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.count_nonzero(params[name][~mask]) == 0, name
        assert pruner.sparsity()[name] == pytest.approx(pruner.sparsities[name], abs=1e-3)
    # re-prune after a sparse epoch (spec §15 #7): still exactly the target count of zeros
    pruner.prune()
    assert pruner.sparsity()["features.conv5.weight"] == pytest.approx(0.5, abs=1e-3)
    pruner.release()
    assert pruner.masks == {}
    _sgd_steps(model, optimizer, None, steps=2)
    for name, mask in masks.items():
        assert torch.count_nonzero(params[name][~mask]) > 0, f"{name} stayed pruned after release"
    with pytest.raises(RuntimeError, match="before prune"):
        pruner.apply_masks()


def test_pruner_rejects_bad_layers() -> None:
    with pytest.raises(ValueError, match="DSD is used only for VGG-f and VGG-face"):
        DSDPruner(small("resnet50"))
    model = small("vggf")
    with pytest.raises(ValueError, match="first conv layer"):
        DSDPruner(model, {"features.conv1.weight": 0.1})
    with pytest.raises(ValueError, match="task head"):
        DSDPruner(model, {"head.weight": 0.1})
    with pytest.raises(ValueError, match=r"unknown parameters \['features.conv9.weight'\]"):
        DSDPruner(model, {"features.conv9.weight": 0.1})
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        DSDPruner(model, {"features.conv2.weight": 1.0})
