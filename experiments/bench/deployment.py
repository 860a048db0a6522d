"""Deployment Engine vs simulation: round time of the same full-stack experiment with 3 devices, side by side.

Runs the experiment three ways, each as its user would (a subprocess with the
same Hydra overrides and a shared feature cache): Flower simulation; a loopback
lab rehearsal with :mod:`clients.supernode` (short polls, warm ClientApp
processes); and the same rehearsal with Flower's stock ``flower-supernode``
(the "before" figure). A round's time is the median of the recorded round times
after the first (which also fills caches and starts processes).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from experiments.lab.pki import prepare_lab

THREE_DEVICES = ("data.num_speakers=5", "partition.num_test_speakers=2")


def median_round_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(r["seconds"] for r in rows if r["round"] >= 2)


def _run(args: list[str], run_dir: Path, cache: str) -> float:
    cmd = [sys.executable, "-m", *args, *THREE_DEVICES, f"hydra.run.dir={run_dir}", f"cache_dir={cache}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return median_round_s(run_dir)


def deployment_vs_simulation(out: Path, cache: str, rounds: int, stock: bool) -> dict:
    lab = prepare_lab(out / "lab", 3, ["127.0.0.1"], overwrite=True)
    runs = out / "runs"
    sim = _run(["experiments.train", f"rounds={rounds}"], runs / "sim_3_devices", cache)
    fast = _run(["experiments.lab", "rehearse", "--lab", str(lab.root), f"rounds={rounds}"], runs / "lab_3_devices",
                cache)
    before = _run(["experiments.lab", "rehearse", "--lab", str(lab.root), "--stock-supernodes", f"rounds={rounds}"],
                  runs / "lab_3_devices_stock", cache) if stock else None
    return {"deployment_vs_simulation": round(fast / sim, 2), "deployment_round_s": round(fast, 2),
            "deployment_stock_round_s": None if before is None else round(before, 2),
            "simulation_round_s": round(sim, 2)}
