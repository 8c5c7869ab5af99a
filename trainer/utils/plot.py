"""The loss plot written beside loss.csv."""

from __future__ import annotations

from pathlib import Path

from trainer.utils.atomic import atomic_path


def plot_losses(rows: list[tuple[int, float]], path: Path, title: str = "training loss") -> Path | None:
    """Plot raw losses and their moving average; returns None when there is nothing to plot."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.array([s + 1 for s, _ in rows])
    values = np.array([v for _, v in rows], dtype=float)
    window = max(1, len(values) // 20)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    figure, axis = plt.subplots(figsize=(8, 4), dpi=100)
    axis.plot(steps, values, alpha=0.35, linewidth=0.8, label="loss")
    if window > 1:
        axis.plot(steps[window - 1 :], smooth, linewidth=1.8, label=f"moving average ({window})")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path
