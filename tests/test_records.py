"""A run dir holds one run: a second run into the same dir replaces the first run's rounds instead of appending."""

import json

import numpy as np

from server.records import RunRecorder

REPORT = {"uar": 0.5, "accuracy": 0.5, "macro_f1": 0.5, "confusion": [[1, 0], [0, 1]]}


def record(run_dir, rounds):
    rec = RunRecorder(run_dir, rounds, lambda r: None)
    for r in range(rounds + 1):
        rec.round_done(r, 1.0, REPORT, [np.zeros(2)])


def test_rerun_into_the_same_dir_starts_fresh_files(tmp_path):
    record(tmp_path, 3)
    record(tmp_path, 1)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("round,") and len(csv_lines) == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round_000.npz", "round_001.npz"]
