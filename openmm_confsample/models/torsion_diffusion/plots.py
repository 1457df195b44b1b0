"""The training-loss plot of a torsion diffusion model (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

import numpy as np

from ...errors import ConfSampleError

__all__ = ["plot_loss"]


def plot_loss(history: dict, path) -> None:
    """Write a PNG of the per-epoch training and validation loss.

    history : dict with ``train_loss`` and ``val_loss`` lists (``model.history``).
    path : str or PathLike of the PNG to write.
    """
    if not isinstance(history, dict) or "train_loss" not in history or "val_loss" not in history:
        raise ConfSampleError("history must be a dict with 'train_loss' and 'val_loss' lists (model.history).")
    # The Figure API draws without pyplot, so no GUI backend or global state is touched.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    ax.plot(epochs, history["train_loss"], label="train")
    ax.plot(np.arange(1, len(history["val_loss"]) + 1), history["val_loss"], label="validation")
    if history["val_loss"]:
        best = int(np.argmin(history["val_loss"]))
        ax.axvline(best + 1, color="0.6", ls=":", label=f"best (epoch {best + 1})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("denoising score-matching loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
