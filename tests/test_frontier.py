"""The privacy-utility frontier (experiments/frontier.py): its points, their configs, resuming, and its outputs."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments import frontier as fr
from experiments.train import ConfigError, RunFailed
from tests.conftest import REPO

TINY = ["data.num_speakers=6", "data.utterances_per_emotion=2", "partition.num_folds=2", "rounds=1",
        "release.formats=[torchscript]"]


def frontier_config(tmp_path, *overrides):
    """conf/frontier.yaml composed as the frontier's own Hydra job would have it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("frontier", overrides=[f"run_dir={tmp_path / 'frontier'}", f"cache_dir={tmp_path / 'cache'}",
                                              *overrides])


def fake_crossval(attempt, num_folds=2, folds_done=None, uar=0.5, eps=None, groups=True):
    """A crossval.json as experiments.crossval writes it (with or without its per-group figures)."""
    folds = [{"fold": k, "test_speakers": [f"s{k}"], "uar": uar + 0.02 * k, "epsilon_sample_max": eps,
              "epsilon_user": None, "wall_s": 10.0} for k in range(num_folds if folds_done is None else folds_done)]
    result = {"mode": "federated", "privacy": "x", "num_folds": len(folds), "uar_mean": uar + 0.01, "uar_std": 0.014,
              "uar_folds": len(folds), "accuracy_mean": 0.6, "epsilon_sample_max": eps, "folds": folds}
    if groups:
        result.update(uar_new_device_mean=uar - 0.1, uar_new_device_std=0.02, worst_speaker_uar_mean=uar - 0.2,
                      worst_speaker_uar_std=0.05, uar_female_mean=uar + 0.05, uar_female_std=0.01,
                      uar_male_mean=None, uar_male_std=None)
    attempt.mkdir(parents=True, exist_ok=True)
    for fold in folds:
        (attempt / f"fold_{fold['fold']}").mkdir(exist_ok=True)
    (attempt / "crossval.json").write_text(json.dumps(result))
    return result


def test_user_overrides_drop_the_frontier_keys_and_refuse_what_it_sets_per_point():
    assert fr.user_overrides(["data=emodb", "data.root=/x", "frontier.epsilons=[1,2]", "+frontier.x=1",
                              "rounds=3"]) == ["data=emodb", "data.root=/x", "rounds=3"]
    for override in ("privacy=none", "privacy.dp_sgd.target_epsilon=3", "privacy.user_level.target_epsilon=2",
                     "run_dir=/tmp/x", "resume=/tmp/x"):
        with pytest.raises(ConfigError, match="the frontier sets"):
            fr.user_overrides(["rounds=3", override])


def test_plan_composes_each_mode_and_epsilon_with_the_users_overrides(tmp_path):
    user = ["data.num_speakers=8", "rounds=2"]
    cfg = frontier_config(tmp_path, *user, "frontier.modes=[full,dp_sgd,user_level]", "frontier.epsilons=[8,1,16]")
    points, notes = fr.plan(cfg, fr.user_overrides(user))
    out = tmp_path / "frontier"
    assert [(p.mode, p.target_epsilon) for p in points] == [
        ("none", None), *[(m, e) for m in ("full", "dp_sgd", "user_level") for e in (1.0, 8.0, 16.0)]]
    assert [p.dir for p in points[:3]] == [out / "none", out / "full_eps1", out / "full_eps8"]
    assert points[0].overrides == (*user, "privacy=none")
    assert points[1].overrides == (*user, "privacy=full", "privacy.dp_sgd.target_epsilon=1")
    # a target above the lifetime budget (10) raises that point's budget to it, and says so
    assert points[3].overrides == (*user, "privacy=full", "privacy.dp_sgd.epsilon_budget=16",
                                   "privacy.dp_sgd.target_epsilon=16")
    assert any("full" in n and "raised from 10.0" in n for n in notes)
    assert not any(n.startswith("user_level") for n in notes)  # its budget key is not sample-level

    full16 = fr.point_config(cfg, points[3], out / "full_eps16" / "attempt_1")
    assert full16.privacy.name == "full" and full16.privacy.dp_sgd.target_epsilon == 16
    assert full16.privacy.dp_sgd.epsilon_budget == 16 and full16.data.num_speakers == 8 and full16.rounds == 2
    assert full16.run_dir == str(out / "full_eps16" / "attempt_1") and full16.cache_dir == str(tmp_path / "cache")
    assert full16.partition.num_folds == 5 and full16.mode == "federated" and "frontier" not in full16
    none = fr.point_config(cfg, points[0], out / "none" / "attempt_1")
    assert none.privacy.name == "none" and not none.privacy.dp_sgd.enabled
    dp_sgd = fr.point_config(cfg, points[4], out / "x")
    assert dp_sgd.privacy.name == "dp_sgd" and not dp_sgd.privacy.update_clipping.enabled
    user_level = fr.point_config(cfg, points[-1], out / "x")
    assert user_level.privacy.user_level.target_epsilon == 16 and user_level.privacy.name == "user_level"
    assert not user_level.privacy.dp_sgd.enabled and user_level.privacy.dp_sgd.target_epsilon is None


def test_plan_keeps_the_users_budget_and_refuses_unknown_modes_and_bad_epsilons(tmp_path):
    user = ["privacy.dp_sgd.epsilon_budget=12"]
    points, notes = fr.plan(frontier_config(tmp_path, *user, "frontier.modes=full", "frontier.epsilons=[16]",
                                            "frontier.non_private=false"), user)
    assert [p.overrides for p in points] == [(*user, "privacy=full", "privacy.dp_sgd.target_epsilon=16")]
    assert "(yours)" in notes[0]
    with pytest.raises(ConfigError, match="unknown \\['local'\\]; the modes are full, dp_sgd"):
        fr.plan(frontier_config(tmp_path, "frontier.modes=[full,local]"), [])
    for bad in ("[0,1]", "[.inf]", "[x]"):
        with pytest.raises(ConfigError, match=r"frontier\.epsilons must be positive"):
            fr.plan(frontier_config(tmp_path, f"frontier.epsilons={bad}"), [])
    with pytest.raises(ConfigError, match="Could not find 'privacy/nosuch'"):
        fr.compose_config(["privacy=nosuch"])


def test_user_level_is_skipped_below_its_minimum_federation(tmp_path):
    cfg = frontier_config(tmp_path, "frontier.modes=[user_level]", "frontier.epsilons=[4]", "data.num_speakers=14")
    points, _ = fr.plan(cfg, ["data.num_speakers=14"])
    assert fr.training_devices(fr.point_config(cfg, points[1], tmp_path)) == 11  # 14 speakers, 5 folds of <= 3
    ok, skipped = fr.runnable(cfg, points)
    assert ok == points[:1]
    assert skipped[0]["mode"] == "user_level" and "at least 50 devices per fold" in skipped[0]["reason"]
    assert "federates 11" in skipped[0]["reason"]
    big = frontier_config(tmp_path, "data.num_speakers=63", "frontier.modes=[full]")
    none_point = fr.plan(big, ["data.num_speakers=63"])[0][0]
    assert fr.training_devices(fr.point_config(big, none_point, tmp_path)) == 50  # 5 folds of <= 13


def test_points_that_cannot_run_are_refused_before_anything_runs(tmp_path):
    cfg = frontier_config(tmp_path, "data=emodb", "frontier.modes=[full]", "frontier.epsilons=[4]")
    points, _ = fr.plan(cfg, ["data=emodb"])
    with pytest.raises(ConfigError, match="need a path"):
        fr.runnable(cfg, points)


def test_complete_and_incomplete_points_and_fresh_attempt_dirs(tmp_path):
    point = tmp_path / "full_eps8"
    assert fr.completed(point, 2) is None and fr.next_attempt(point) == point / "attempt_1"
    fake_crossval(point / "attempt_1", folds_done=1)  # stopped after fold 0 (as if crossval.json were partial)
    assert fr.completed(point, 2) is None
    assert fr.next_attempt(point) == point / "attempt_2"
    (point / "attempt_2" / "fold_0").mkdir(parents=True)  # killed in its first fold: no crossval.json
    assert fr.completed(point, 2) is None and fr.next_attempt(point) == point / "attempt_3"
    (point / "attempt_3").mkdir()  # an attempt that left nothing at all is reused
    assert fr.next_attempt(point) == point / "attempt_3"
    (point / "attempt_3" / "crossval.json").write_text('{"num_folds": 2, "folds": [')  # torn write
    assert fr.completed(point, 2) is None
    result = fake_crossval(point / "attempt_4")
    assert fr.completed(point, 2) == (point / "attempt_4", result)
    assert fr.completed(point, 3) is None  # a crossval with other folds than this sweep's is not this point
    fake_crossval(point / "attempt_10", uar=0.7)  # numbered, not sorted as text
    assert fr.completed(point, 2)[0] == point / "attempt_10"
    assert fr.next_attempt(point) == point / "attempt_11"


def test_rows_csv_json_and_png_from_every_completed_point(tmp_path):
    out = tmp_path / "frontier"
    fake_crossval(out / "none" / "attempt_1", uar=0.7)
    fake_crossval(out / "full_eps1" / "attempt_1", uar=0.3, eps=0.98)
    fake_crossval(out / "full_eps8" / "attempt_2", uar=0.5, eps=7.9)
    fake_crossval(out / "full_eps4" / "attempt_1", folds_done=1, eps=3.9)  # incomplete: not a row
    fake_crossval(out / "dp_sgd_eps2" / "attempt_1", uar=0.4, eps=2.0, groups=False)  # crossval without groups
    fake_crossval(out / "nosuchmode_eps2" / "attempt_1")  # not a frontier point
    rows = fr.collect_rows(out, 2)
    assert [(r["mode"], r["target_epsilon"]) for r in rows] == [("none", None), ("dp_sgd", 2.0), ("full", 1.0),
                                                                ("full", 8.0)]
    full8 = rows[-1]
    assert full8["epsilon"] == full8["epsilon_sample_max"] == 7.9 and full8["epsilon_user_max"] is None
    assert full8["uar_mean"] == pytest.approx(0.51) and full8["uar_std"] == 0.014
    assert full8["worst_speaker_uar_mean"] == pytest.approx(0.3) and "uar_male_mean" not in full8
    assert full8["num_folds"] == 2 and full8["wall_s"] == 20.0 and full8["dir"] == str(out / "full_eps8" / "attempt_2")
    assert "uar_folds" not in full8 and rows[0]["epsilon"] is None

    fr.write_frontier(out, rows, {"skipped": [], "failed": []})
    table = list(csv.DictReader((out / "frontier.csv").open()))
    assert list(table[0])[:7] == list(fr.COLUMNS) and list(table[0])[-3:] == list(fr.TAIL)
    assert "uar_female_mean" in table[0] and "worst_speaker_uar_std" in table[0]
    assert table[0]["target_epsilon"] == "inf" and math.isinf(float(table[0]["target_epsilon"]))
    assert table[1]["uar_female_mean"] == "" and float(table[3]["epsilon"]) == 7.9
    stored = json.loads((out / "frontier.json").read_text())
    assert stored["points"] == rows and stored["failed"] == []
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frontier_plot_with_and_without_group_panels(tmp_path):
    from server.plots import frontier_groups, plot_frontier

    rows = [{"mode": "none", "target_epsilon": None, "epsilon": None, "uar_mean": 0.7, "uar_std": 0.05},
            *({"mode": m, "target_epsilon": e, "epsilon": e * 0.97, "uar_mean": 0.3 + 0.05 * e, "uar_std": 0.04,
               "uar_female_mean": 0.35, "uar_female_std": 0.02, "worst_speaker_uar_mean": 0.1}
              for m in ("full", "distributed") for e in (1, 2, 4)),
            {"mode": "full", "target_epsilon": 8, "epsilon": None, "uar_mean": 0.6, "uar_std": 0.0}]  # no epsilon
    assert frontier_groups(rows) == ["uar_female_mean", "worst_speaker_uar_mean"]
    plot_frontier(rows, tmp_path / "a" / "frontier.png")
    plot_frontier([rows[0]], tmp_path / "b.png")  # only the non-private point so far
    for path in (tmp_path / "a" / "frontier.png", tmp_path / "b.png"):
        assert path.stat().st_size > 10_000


def test_a_resumed_sweep_keeps_its_overrides(tmp_path):
    out = tmp_path / "frontier"
    fr.record_sweep(out, ["data.num_speakers=8", "verbose=true"], 5)
    fr.record_sweep(out, ["data.num_speakers=8"], 5)  # how it runs may change
    fr.record_sweep(out, ["federation.num_cpus=1", "data.num_speakers=8"], 5)
    with pytest.raises(ConfigError, match="would not be comparable"):
        fr.record_sweep(out, ["data.num_speakers=9"], 5)
    assert json.loads((out / "sweep.json").read_text())["user_overrides"] == ["data.num_speakers=8", "verbose=true"]


def test_the_frontier_refuses_centralised_and_unfolded_crossvals(tmp_path):
    with pytest.raises(ConfigError, match="centralised baseline has no privacy"):
        fr.frontier(frontier_config(tmp_path, "mode=centralised"), ["mode=centralised"])
    with pytest.raises(ConfigError, match="at least 2 folds"):
        fr.frontier(frontier_config(tmp_path, "partition.num_folds=null"), ["partition.num_folds=null"])


def test_the_sweep_runs_what_is_missing_and_a_rerun_retries_it_in_a_fresh_attempt(tmp_path, monkeypatch, capsys):
    """The sweep's bookkeeping, with each point's crossval replaced by one that writes its result at once (the real
    crossval runs in the slow test below): a failed point does not stop the others, the outputs hold every
    completed point, and the same command again runs only the failed one, in attempt_2."""
    import experiments.crossval

    calls, fail_once = [], {2}

    def crossval(cfg):
        calls.append((cfg.privacy.name, cfg.privacy.dp_sgd.target_epsilon, cfg.run_dir))
        eps = cfg.privacy.dp_sgd.target_epsilon
        if eps in fail_once:
            fail_once.remove(eps)
            (Path(cfg.run_dir) / "fold_0").mkdir(parents=True)
            raise RunFailed("the run stopped after 0 of 1 rounds: no round aggregated any update")
        return fake_crossval(Path(cfg.run_dir), num_folds=cfg.partition.num_folds, uar=0.3 + (eps or 10) / 50,
                             eps=eps if cfg.privacy.dp_sgd.enabled else None)

    monkeypatch.setattr(experiments.crossval, "crossval", crossval)
    overrides = [*TINY, "frontier.modes=[full]", "frontier.epsilons=[8,2]"]
    cfg = frontier_config(tmp_path, *overrides)
    out = tmp_path / "frontier"
    with pytest.raises(RunFailed, match=r"1 frontier point\(s\) failed: mode=full eps=2.0: the run stopped"):
        fr.frontier(cfg, overrides)
    assert calls == [("none", None, str(out / "none" / "attempt_1")), ("full", 2, str(out / "full_eps2" / "attempt_1")),
                     ("full", 8, str(out / "full_eps8" / "attempt_1"))]
    printed = capsys.readouterr().out
    assert "frontier: 3 points (3 to run, 0 done earlier) x 2 folds" in printed
    assert "[2/3] mode=full eps=2 -> FAILED: the run stopped" in printed
    assert "[3/3] mode=full eps=8 -> UAR 0.470 +- 0.014, epsilon 8.00 | point " in printed and "ETA 0s" in printed
    stored = json.loads((out / "frontier.json").read_text())
    assert [(r["mode"], r["target_epsilon"]) for r in stored["points"]] == [("none", None), ("full", 8.0)]
    assert stored["failed"][0]["dir"] == str(out / "full_eps2" / "attempt_1")

    calls.clear()
    assert [r["target_epsilon"] for r in fr.frontier(cfg, overrides)["points"]] == [None, 2.0, 8.0]
    assert calls == [("full", 2, str(out / "full_eps2" / "attempt_2"))]
    printed = capsys.readouterr().out
    assert "[1/3] mode=none eps=inf -> UAR 0.510 +- 0.014, epsilon - (done earlier: " in printed
    assert (out / "full_eps2" / "attempt_1" / "fold_0").is_dir()  # the failed attempt is kept
    assert len((out / "frontier.csv").read_text().splitlines()) == 4 and (out / "frontier.png").exists()
    with pytest.raises(ConfigError, match="would not be comparable"):  # the same dir, another experiment
        fr.frontier(frontier_config(tmp_path, *overrides, "rounds=2"), [*overrides, "rounds=2"])


@pytest.mark.slow
def test_a_tiny_sweep_from_the_command_line_and_its_resume(tmp_path):
    """The command line itself (Hydra's job composing the point's config, a real crossval), then the same command
    again: the completed point is kept, not run again, and the outputs are rewritten."""
    out = tmp_path / "frontier"
    command = [sys.executable, "-m", "experiments.frontier", *TINY, "frontier.epsilons=[8]", "frontier.modes=[full]",
               "frontier.non_private=false", f"hydra.run.dir={out}", f"cache_dir={tmp_path / 'cache'}"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[1/1] mode=full eps=8 -> UAR" in first.stdout and "ETA 0s" in first.stdout
    rows = json.loads((out / "frontier.json").read_text())["points"]
    assert [(r["mode"], r["target_epsilon"], r["num_folds"]) for r in rows] == [("full", 8.0, 2)]
    assert 0 < rows[0]["epsilon"] <= 8.0 + 1e-6 and 0 <= rows[0]["uar_mean"] <= 1  # the target is met, not exceeded
    assert rows[0]["dir"] == str(out / "full_eps8" / "attempt_1")
    assert (out / "frontier.png").stat().st_size > 10_000 and len((out / "frontier.csv").read_text().splitlines()) == 2

    (out / "frontier.csv").unlink()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "(1 to run" not in again.stdout and "done earlier" in again.stdout
    assert not (out / "full_eps8" / "attempt_2").exists()
    assert json.loads((out / "frontier.json").read_text())["points"] == rows and (out / "frontier.csv").exists()
