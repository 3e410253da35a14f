"""Figures of a model's test predictions: a confusion matrix (classification) or predicted against true
ages (regression), written as PNG. Grad-CAM maps are in :mod:`occkd_core.gradcam`."""

from __future__ import annotations

from pathlib import Path

from occkd_core.evaluation import Predictions
from occkd_core.files import atomic_write


def save_test_plot(path: Path, preds: Predictions, class_names: tuple[str, ...], title: str) -> Path:
    """Confusion matrix (classification) or predicted-vs-true ages (regression), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(5, 4.5))
    if preds.outputs.shape[1] > 1:
        ConfusionMatrixDisplay.from_predictions(preds.targets, preds.predicted, labels=list(range(len(class_names))),
                                                display_labels=list(class_names), ax=ax, colorbar=False,
                                                xticks_rotation=45)
    else:
        ax.scatter(preds.targets, preds.predicted, s=4, alpha=0.5)
        lim = [0, float(max(preds.targets.max(), preds.predicted.max()) + 5)]
        ax.plot(lim, lim, "k--", lw=1)
        ax.set_xlabel("true age (years)")
        ax.set_ylabel("predicted age (years)")
    ax.set_title(f"{title} ({preds.visible} faces)", fontsize=9)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path
