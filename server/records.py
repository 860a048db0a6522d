"""What a run leaves behind, written as it goes: per-round metrics, checkpoints, progress, summary and plots.

``metrics.jsonl`` (one JSON object per round) and ``metrics.csv`` hold the
per-round figures, ``checkpoints/round_NNN.npz`` the global classifier after
each round, ``summary.json`` the final figures, and ``plots/`` the PNGs.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from fl_ser.protocol import EPSILON_METRICS

log = logging.getLogger("fl_ser.server")

CSV_FIELDS = ["round", "uar", "accuracy", "macro_f1", "loss", "epsilon_sample_max", "epsilon_sample_run_max",
              "epsilon_user", "participants",
              "declined", "seconds"]


def _clean(x):
    """JSON-safe: NaN becomes null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


class RunRecorder:
    def __init__(self, run_dir: str | Path, total_rounds: int, user_epsilon_after):
        self.dir = Path(run_dir)
        (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        earlier = [p for p in (self.dir / "metrics.jsonl", self.dir / "metrics.csv", self.dir / "summary.json",
                               *(self.dir / "checkpoints").glob("round_*.npz")) if p.exists()]
        if earlier:  # a run dir holds one run: never mix this run's rounds with an earlier run's
            log.warning("run dir %s held an earlier run's results; replacing them (%d files)", self.dir, len(earlier))
            for p in earlier:
                p.unlink()
        self.total_rounds = total_rounds
        self.user_epsilon_after = user_epsilon_after  # rounds -> epsilon or None
        self.rounds: list[dict] = []
        self.epsilons: dict[str, float] = {}  # the largest of each reported epsilon: lifetime, run, parts
        self._fit: dict = {}
        self._t0 = self._last = time.monotonic()

    @property
    def epsilon_sample_max(self) -> float | None:
        """The largest lifetime sample-level epsilon any device reported (None: none did)."""
        return self.epsilons.get("epsilon")

    def epsilon_split(self) -> dict[str, float] | None:
        """The largest lifetime epsilon, this run's, and the normalisation and training parts (None: no DP-SGD)."""
        names = dict(zip(EPSILON_METRICS, ("lifetime", "this_run", "normalization", "training"), strict=True))
        return {names[k]: v for k, v in self.epsilons.items()} or None

    # Flower's fit_metrics_aggregation_fn: the devices' plain-text metrics for this round.
    def aggregate_fit_metrics(self, results: list[tuple[int, dict]]) -> dict:
        for key in EPSILON_METRICS:
            eps = [float(m[key]) for _, m in results if key in m]
            if eps:
                self.epsilons[key] = max([*eps, self.epsilons.get(key, 0.0)])
        self._fit = {"participants": len(results), "declined": int(sum(int(m.get("declined", 0)) for _, m in results))}
        return {"epsilon_sample_max": self.epsilon_sample_max or 0.0, **self._fit}

    def round_done(self, server_round: int, loss: float, report: dict, arrays: list[np.ndarray],
                   dropped: list[str] | None = None) -> None:
        """Record one round; ``dropped`` names the sampled devices (node ids) whose update never arrived."""
        now = time.monotonic()
        row = {
            "round": server_round, "uar": report["uar"], "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"], "loss": loss, "epsilon_sample_max": self.epsilon_sample_max,
            "epsilon_sample_run_max": self.epsilons.get("epsilon_run"),
            "epsilon_user": self.user_epsilon_after(server_round) if server_round else None,
            "participants": self._fit.get("participants", 0) if server_round else 0,
            "declined": self._fit.get("declined", 0) if server_round else 0,
            "dropped": dropped, "seconds": round(now - self._last, 3), "uar_by_group": report.get("uar_by_group"),
            "confusion": report["confusion"],
        }
        self._last = now
        self._fit = {}
        self.rounds.append(_clean(row))
        with (self.dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(self.rounds[-1]) + "\n")
        new = not (self.dir / "metrics.csv").exists()
        with (self.dir / "metrics.csv").open("a", newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(self.rounds[-1])
        np.savez(self.dir / "checkpoints" / f"round_{server_round:03d}.npz", *arrays)
        eps_s = "-" if row["epsilon_sample_max"] is None else f"{row['epsilon_sample_max']:.2f}"
        run_eps = row["epsilon_sample_run_max"]
        if run_eps is not None and abs(run_eps - row["epsilon_sample_max"]) > 5e-3:  # devices that trained before
            eps_s += f" (this run {run_eps:.2f})"
        eps_u = "-" if row["epsilon_user"] is None else f"{row['epsilon_user']:.2f}"
        declined = f" | declined {row['declined']}" if row["declined"] else ""
        declined += f" | dropped {', '.join(dropped)}" if dropped else ""
        print(f"round {server_round:3d}/{self.total_rounds} | UAR {report['uar']:.3f} | acc {report['accuracy']:.3f} "
              f"| loss {loss:.3f} | eps_sample {eps_s} | eps_user {eps_u}{declined} | {row['seconds']:.1f} s",
              flush=True)

    def dropouts(self) -> dict[str, list[str]]:
        """Round -> the node ids that dropped out of it (only rounds with dropouts)."""
        return {str(r["round"]): r["dropped"] for r in self.rounds if r.get("dropped")}

    def write_summary(self, summary: dict) -> dict:
        summary = _clean({**summary, "wall_s": round(time.monotonic() - self._t0, 2)})
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        from server.plots import plot_confusion, plot_rounds

        plot_rounds(self.rounds, self.dir / "plots" / "rounds.png")
        plot_confusion(summary["confusion"], summary["labels"], self.dir / "plots" / "confusion.png",
                       title=f"held-out speakers, UAR {summary['uar']:.3f}")
        return summary
