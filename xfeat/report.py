"""Runs -> tables and plots (matplotlib, written as PNG files)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)


def plot_training_curves(history: list, path, *, title: str = "",
                         best_epoch: Optional[int] = None) -> Path:
    """Accuracy and loss per epoch, train vs val, the kept epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_acc, "accuracy", "accuracy"), (ax_loss, "loss", "loss")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train", ms=3)
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="val", ms=3)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"kept epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
