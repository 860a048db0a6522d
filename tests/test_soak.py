"""The soak's analysis (experiments/soak.py): growth slopes, flatness verdict and the rounds check, on fabricated
windows and run dirs. The soak itself is `make soak`, not a test."""

import json

import numpy as np
import pytest

from experiments import soak


def windows(rss, fds=None, threads=None, every=20):
    fds = fds or [300] * len(rss)
    threads = threads or [150] * len(rss)
    return [{"round": every * (i + 1), "rss_peak_mib": r, "fds_max": f, "threads_max": t}
            for i, (r, f, t) in enumerate(zip(rss, fds, threads, strict=True))]


def test_slope_is_least_squares_per_100_rounds():
    rounds = [40, 60, 80, 100, 120]
    values = [1000 + 0.5 * r + e for r, e in zip(rounds, [3, -2, 0, 4, -5], strict=True)]
    expected = 100 * np.polyfit(rounds, values, 1)[0]
    assert soak.slope_per_100(rounds, values) == pytest.approx(expected)
    assert soak.slope_per_100([20], [5.0]) is None
    assert soak.slope_per_100([20, 40, 60], [None, 5.0, None]) is None  # windows without samples are skipped


def test_flat_windows_pass_and_the_warm_up_window_is_ignored():
    rss = [2500, 3500, 3520, 3490, 3510, 3505, 3480, 3515, 3500, 3495]  # round 20 is warm-up: +1 GB then flat
    g = soak.growth(windows(rss, fds=[100, 320, 318, 321, 320, 319, 322, 320, 318, 321]))
    assert g["windows_used"] == 9 and abs(g["rss_mib_per_100_rounds"]) < 20
    assert soak.growth_failures(g) == []


def test_a_leak_of_two_mib_a_round_fails():
    rss = [3500 + 2 * 20 * i for i in range(10)]
    g = soak.growth(windows(rss))
    assert g["rss_mib_per_100_rounds"] == pytest.approx(200)
    [failure] = soak.growth_failures(g)
    assert "peak RSS" in failure and "200.0" in failure


def test_leaked_descriptors_and_threads_fail():
    fds = [300 + 5 * i for i in range(10)]  # 5 per window of 20 rounds: 25 per 100 rounds
    threads = [150 + 4 * i for i in range(10)]
    failures = soak.growth_failures(soak.growth(windows([3500] * 10, fds=fds, threads=threads)))
    assert len(failures) == 2 and "descriptors" in failures[0] and "threads" in failures[1]


def test_too_few_windows_cannot_show_flatness():
    assert "cannot be measured" in soak.growth_failures(soak.growth(windows([3500, 3500])))[0]


def fabricate_run(tmp_path, rounds, checkpoints, participants=50):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    lines = [json.dumps({"round": r, "participants": 0 if r == 0 else participants, "declined": 0, "seconds": 1.0})
             for r in rounds]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"round": 9')  # a line still being written
    for r in checkpoints:
        (run / "checkpoints" / f"round_{r:03d}.npz").write_bytes(b"")
    return run


def test_every_round_once_is_complete(tmp_path):
    run = fabricate_run(tmp_path, range(0, 6), range(0, 6))
    check = soak.rounds_check(run, 5)
    assert check["complete"] and check["participants"] == 250
    assert soak.rounds_failures(check) == []


def test_missing_duplicated_and_empty_rounds_are_named(tmp_path):
    run = fabricate_run(tmp_path, [0, 1, 2, 2, 4, 5, 7], [0, 1, 2, 3, 5])
    check = soak.rounds_check(run, 5)
    assert not check["complete"]
    assert check["metrics"] == {"missing": [3], "duplicated": [2], "unexpected": [7]}
    assert check["checkpoints"] == {"missing": [4], "duplicated": [], "unexpected": []}
    failures = soak.rounds_failures(check)
    assert "metrics: rounds missing: [3]" in failures and "checkpoints: rounds missing: [4]" in failures

    empty = soak.rounds_check(fabricate_run(tmp_path / "empty", range(0, 4), range(0, 4), participants=0), 3)
    assert not empty["complete"] and empty["empty_rounds"] == [1, 2, 3]
