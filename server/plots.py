"""PNG plots of a run: UAR and epsilon per round, and the held-out confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator


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
