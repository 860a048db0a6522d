"""PNG plots of a run (UAR and epsilon per round, the held-out confusion matrix) and of the privacy-utility
frontier (:mod:`experiments.frontier`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator, NullFormatter


def plot_rounds(rounds: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    r = [row["round"] for row in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(r, [row["uar"] for row in rounds], marker="o", label="UAR")
    ax1.plot(r, [row["accuracy"] for row in rounds], marker=".", alpha=0.6, label="accuracy")
    if rounds:
        ax1.axhline(1.0 / len(rounds[0]["confusion"]), color="grey", ls="--", label="chance")
    ax1.set(xlabel="round", ylabel="held-out speakers", ylim=(0, 1), title="global model")
    ax1.legend()
    for key, label in (("epsilon_sample_max", "sample-level (max device)"), ("epsilon_user", "user-level")):
        vals = [row[key] for row in rounds]
        if any(v is not None for v in vals):
            ax2.plot(r, [np.nan if v is None else v for v in vals], marker="o", label=label)
    ax2.set(xlabel="round", ylabel="epsilon", title="privacy spent (cumulative)")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, label="recall share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_groups(rows: list[dict]) -> list[str]:
    """The per-group UAR figures the frontier's rows hold (``uar_female_mean``, ``worst_speaker_uar_mean``, ...)."""
    return sorted({k for row in rows for k, v in row.items()
                   if k.endswith("_mean") and "uar" in k and k != "uar_mean" and v is not None})


def plot_frontier(rows: list[dict], path: Path) -> None:
    """UAR against the achieved epsilon (log scale), one line per privacy mode with the std across folds as error
    bars, the non-private row (``target_epsilon`` None) as a dashed line with its +-std band; then one panel per
    group figure the rows hold."""
    path.parent.mkdir(parents=True, exist_ok=True)
    private = [r for r in rows if r["target_epsilon"] is not None]
    baseline = next((r for r in rows if r["target_epsilon"] is None), None)
    modes = list(dict.fromkeys(r["mode"] for r in private))
    panels = [("uar_mean", "all held-out speakers")]
    panels += [(key, key.removesuffix("_mean").replace("uar_", "").replace("_uar", "").replace("_", " "))
               for key in frontier_groups(rows)]
    cols = min(3, len(panels))
    lines = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(5.5 * cols, 4.2 * lines), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        std = key.removesuffix("_mean") + "_std"
        ticks = set()
        for i, mode in enumerate(modes):
            points = sorted((r for r in private if r["mode"] == mode and r.get(key) is not None), key=_frontier_x)
            if points:
                ax.errorbar([_frontier_x(r) for r in points], [r[key] for r in points],
                            yerr=[r.get(std) or 0.0 for r in points], marker="o", capsize=3, color=f"C{i}", label=mode)
                ticks.update(_frontier_x(r) for r in points)
        if baseline is not None and baseline.get(key) is not None:
            mean, spread = baseline[key], baseline.get(std) or 0.0
            ax.axhline(mean, color="black", ls="--", label="no DP (epsilon = inf)")
            ax.axhspan(mean - spread, mean + spread, color="black", alpha=0.1, lw=0)
        ax.set_xscale("log")
        if ticks:
            ax.set_xticks(sorted(ticks), [f"{x:.3g}" for x in sorted(ticks)])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="epsilon achieved (max over folds and devices)", ylabel="UAR (mean over folds)", ylim=(0, 1),
               title=title)
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(loc="best")
    fig.suptitle("privacy-utility frontier (speaker k-fold)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _frontier_x(row: dict) -> float:
    """Where a private point lies: the epsilon it achieved, or its target where none was reported."""
    return row["epsilon"] if row.get("epsilon") else row["target_epsilon"]
