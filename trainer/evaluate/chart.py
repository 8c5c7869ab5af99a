"""The chart of scores over training steps: one panel per score, one line per LoRA scale.

The base model's value (the same prompts without the token) is a dashed line where it exists: likeness should rise
above it and adherence stay near it. The recommended checkpoint and scale is starred.
"""

from __future__ import annotations

import math
from pathlib import Path

from trainer.utils.atomic import atomic_path

PANELS = (
    ("likeness", "likeness (CLIP image sim. to training images)"),
    ("adherence", "prompt adherence (CLIP text sim., no token)"),
    ("diversity", "diversity (mean pairwise CLIP distance)"),
    ("aesthetic", "aesthetic score"),
    ("combined", "combined score (recommendation rule)"),
)


def plot_scores(results: list[dict], path: Path, *, baseline: dict | None = None,
                best: tuple[int, float] | None = None, title: str = "checkpoint evaluation") -> Path:
    """``results``: the report's rows (``step``, ``lora_scale``, ``scores``, ``combined``)."""
    if not results:
        raise ValueError("no results to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in PANELS if any(_value(row, key) is not None for row in results)]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), dpi=100, squeeze=False)
    scales = sorted({row["lora_scale"] for row in results})
    for axis, (key, label) in zip(axes.flat, panels, strict=False):
        for scale in scales:
            points = sorted((row["step"], _value(row, key)) for row in results
                            if row["lora_scale"] == scale and _value(row, key) is not None)
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"scale {scale:g}")
        if baseline is not None and baseline.get(key) is not None:
            axis.axhline(baseline[key], color="grey", linestyle="--", linewidth=1, label="base model")
        if best is not None:
            chosen = [_value(row, key) for row in results if (row["step"], row["lora_scale"]) == best]
            if chosen and chosen[0] is not None:
                axis.plot([best[0]], [chosen[0]], marker="*", markersize=16, color="gold", markeredgecolor="black",
                          linestyle="none", label="recommended")
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    # One legend for the figure: every panel has the same lines, but some lack the base-model line or the star.
    legend: dict[str, object] = {}
    for axis in list(axes.flat)[: len(panels)]:
        for handle, text in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(text, handle)
    figure.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(6, len(legend)), frameon=False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path


def _value(row: dict, key: str) -> float | None:
    return row.get("combined") if key == "combined" else row["scores"].get(key)
