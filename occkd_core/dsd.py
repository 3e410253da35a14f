"""Dense-Sparse-Dense training (Han et al. 2017; spec §9, §15 #7): the phase schedule and the magnitude pruner.

The pruner keeps its own boolean masks instead of using ``torch.nn.utils.prune``: that module
reparametrises each weight as ``weight_orig * weight_mask`` through a forward pre-hook, which renames
the state-dict keys (so checkpoints and :func:`~occkd_core.loading.load_pretrained` no longer match the
model) and needs ``prune.remove`` before the optimizer sees plain weights again. Here the weights stay
ordinary parameters: pruning zeroes them in place and :meth:`DSDPruner.apply_masks` re-zeroes them
after each optimiser step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from occkd_core.models import FaceNet

DSDPhase = Literal["dense", "sparse", "redense"]


@dataclass(frozen=True)
class DSDSchedule:
    """One DSD cycle: the epochs split equally into dense / sparse / dense, the remainder going to the last."""

    num_epochs: int

    def __post_init__(self) -> None:
        if isinstance(self.num_epochs, bool) or not isinstance(self.num_epochs, int) or self.num_epochs < 1:
            raise ValueError(f"DSDSchedule needs num_epochs >= 1, got {self.num_epochs!r}")

    @property
    def sparse_start(self) -> int:
        """First (0-based) epoch of the sparse phase. With fewer than 3 epochs both earlier phases are empty."""
        return self.num_epochs // 3

    @property
    def redense_start(self) -> int:
        """First (0-based) epoch of the final dense phase."""
        return 2 * (self.num_epochs // 3)

    def phase(self, epoch: int) -> DSDPhase:
        """The phase of 0-based ``epoch``: e.g. 10 epochs -> 0-2 dense, 3-5 sparse, 6-9 redense."""
        if not 0 <= epoch < self.num_epochs:
            raise ValueError(f"epoch must be in [0, {self.num_epochs}) (0-based), got {epoch}")
        if epoch < self.sparse_start:
            return "dense"
        return "sparse" if epoch < self.redense_start else "redense"


class DSDPruner:
    """Per-layer magnitude pruning with masks held through the sparse phase (spec §9).

    Call :meth:`prune` at the start of the sparse phase and after each sparse epoch (the masks are
    recomputed from the current weights, spec §15 #7), :meth:`apply_masks` after every optimiser step
    of the sparse phase, and :meth:`release` when the final dense phase starts. The masks are not
    checkpointed: pruned weights are exactly zero, so calling :meth:`prune` again after a resume rebuilds
    them. Optimiser state (momentum) of pruned weights is left alone; it only acts once they are released.
    """

    def __init__(self, model: FaceNet, sparsities: dict[str, float] | None = None) -> None:
        sparsities = dict(model.dsd_sparsities() if sparsities is None else sparsities)
        if not sparsities:
            raise ValueError(f"no layers to prune for {model.arch}: DSD is used only for VGG-f and VGG-face "
                             f"(spec §9, §15 #7); turn dsd off for this architecture")
        params = dict(model.named_parameters())
        unknown = sorted(set(sparsities) - set(params))
        if unknown:
            prunable = ", ".join(name for name, p in params.items() if p.dim() > 1)
            raise ValueError(f"unknown parameters {unknown} in DSD sparsities; weight parameters: {prunable}")
        first_conv = next(f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
        forbidden = sorted(name for name in sparsities if name == first_conv or name.startswith("head."))
        if forbidden:
            raise ValueError(f"{forbidden} must not be pruned: DSD never prunes the first conv layer "
                             f"({first_conv}) nor the task head (spec §9, §15 #7)")
        for name, rate in sparsities.items():
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"sparsity of {name} must be in [0, 1), got {rate}")
        self._params = {name: params[name] for name in sparsities}
        self._sparsities = sparsities
        self._masks: dict[str, Tensor] = {}

    @property
    def sparsities(self) -> dict[str, float]:
        """Parameter name -> target fraction of zeroed weights."""
        return dict(self._sparsities)

    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name -> boolean mask (True = kept); empty outside the sparse phase."""
        return dict(self._masks)

    @torch.no_grad()
    def prune(self) -> None:
        """Zero the ``round(rate * n)`` smallest-|w| weights of each layer and keep their masks."""
        for name, param in self._params.items():
            num_pruned = round(self._sparsities[name] * param.numel())
            keep = torch.ones(param.numel(), dtype=torch.bool, device=param.device)
            # topk (not a threshold from kthvalue) prunes exactly num_pruned weights even when values tie,
            # as the zeros left by the previous sparse epoch do.
            smallest = torch.topk(param.detach().abs().flatten(), num_pruned, largest=False).indices
            keep[smallest] = False
            self._masks[name] = keep.view(param.shape)
            param.mul_(self._masks[name])

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Re-zero the pruned weights; call after every ``optimizer.step()`` in the sparse phase."""
        if not self._masks:
            raise RuntimeError("apply_masks() before prune(): call prune() when the sparse phase starts")
        for name, mask in self._masks.items():
            self._params[name].mul_(mask)

    def release(self) -> None:
        """Drop the masks (final dense phase): pruned weights restart from zero. Safe to call when none are held."""
        self._masks = {}

    @torch.no_grad()
    def sparsity(self) -> dict[str, float]:
        """Measured fraction of exactly-zero weights per pruned layer."""
        return {name: float((param == 0).float().mean()) for name, param in self._params.items()}
