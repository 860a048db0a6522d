"""Simulation scale: seconds per round and peak memory (driver + Ray + virtual devices) for large federations."""

from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """Samples the resident memory of this process and all its descendants (Ray's included) in the background."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def federation_overrides(devices: int, per_round: int, test_speakers: int = 10) -> list[str]:
    """Hydra overrides for a large synthetic federation: ``devices`` training speakers (one device each) and
    ``test_speakers`` held out, ``per_round`` sampled each round, no release to every device after the last round
    (the scale bench and the soak, ``experiments.soak``, measure rounds)."""
    return [f"data.num_speakers={devices + test_speakers}", f"partition.num_test_speakers={test_speakers}",
            f"clients_per_round={per_round}", "release.deploy=false"]


def simulate_scale(cfg) -> dict:
    """Run a few rounds of the configured federation; per-round time excludes round 1 (feature extraction, start-up)."""
    import json
    from pathlib import Path

    from experiments.train import prepare, run

    with PeakRSS() as mem:
        run(prepare(cfg))
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    later = [r["seconds"] for r in rows if r["round"] >= 2]
    return {"s_per_round": sum(later) / len(later), "first_round_s": rows[1]["seconds"], "peak_gb": mem.peak / 2**30}
