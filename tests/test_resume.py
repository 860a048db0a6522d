"""A run survives a server crash: SIGKILL after round k of n, ``resume=RUN_DIR``, and nothing is lost or counted twice.

Also: a run dir that holds a run is never reused, a resume refuses overrides that change the experiment, the
server state round-trips with the server optimiser's moments, and a resumed recorder drops the in-flight round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from experiments.train import ConfigError, announce, resumed
from server import checkpoint
from server.records import RunDirInUse, RunRecorder, RunStopped
from tests.conftest import REPO, make_config

REPORT = {"uar": 0.5, "accuracy": 0.5, "macro_f1": 0.5, "confusion": [[1, 0], [0, 1]]}


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def record(rec: RunRecorder, rounds, participants=1, sampled=("1",)):
    for r in rounds:
        if r:
            rec.aggregate_fit_metrics([(1, {})] * participants)
        rec.round_done(r, 1.0, REPORT, [np.full(2, float(r))], outcome={"sampled": list(sampled)} if r else None)


@pytest.fixture
def flower_env(monkeypatch):
    """announce() sets Flower's and Ray's environment for the run; restore it after the test."""
    for name in ("FLWR_HOME", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "RAY_DEDUP_LOGS",
                 "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"):
        monkeypatch.setenv(name, os.environ.get(name, ""))


def test_a_run_dir_that_holds_a_run_is_refused_and_never_emptied(tmp_path, flower_env):
    run_dir = tmp_path / "run"
    rec = RunRecorder(run_dir, 3, lambda r: None)
    record(rec, range(2))
    before = sorted(p.name for p in run_dir.rglob("*"))
    with pytest.raises(RunDirInUse, match=f"resume={run_dir}"):
        RunRecorder(run_dir, 3, lambda r: None)
    with pytest.raises(ConfigError, match="another dir"):
        announce(make_config(tmp_path))
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_a_resumed_recorder_drops_the_round_in_flight_and_appends(tmp_path):
    rec = RunRecorder(tmp_path, 4, lambda r: None)
    record(rec, range(3))
    state = rec.state()
    record(rec, [3])  # round 3 reached the metrics, but the server died before saving its state
    resumed_rec = RunRecorder(tmp_path, 4, lambda r: None, restored=state)
    assert [r["round"] for r in rows_of(tmp_path)] == [0, 1, 2]
    assert not (tmp_path / "checkpoints" / "round_003.npz").exists()
    record(resumed_rec, [3, 4])
    assert [r["round"] for r in rows_of(tmp_path)] == [0, 1, 2, 3, 4]
    csv_rounds = [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert csv_rounds == ["0", "1", "2", "3", "4"]
    assert resumed_rec.outcome()["resumed_after"] == [2]


def test_empty_rounds_are_reported_and_stop_the_run(tmp_path, capsys):
    rec = RunRecorder(tmp_path, 9, lambda r: None, max_empty_rounds=3)
    record(rec, [0, 1])
    rec.check_progress(1)
    for r in (2, 3):
        rec.aggregate_fit_metrics([])
        rec.round_done(r, 1.0, REPORT, [np.zeros(2)], outcome={"sampled": ["1", "2"], "dropped": {"fit": ["1", "2"]},
                                                               "causes": {"code 105": 2}})
        rec.check_progress(r)
    assert "updates 0/2 EMPTY" in capsys.readouterr().out
    rec.aggregate_fit_metrics([])
    rec.round_done(4, 1.0, REPORT, [np.zeros(2)], outcome={"sampled": ["1", "2"], "causes": {"code 105": 2}})
    with pytest.raises(RunStopped, match=r"rounds 2\.\.4 aggregated no update.*code 105 x6.*resume="):
        rec.check_progress(4)
    out = rec.outcome()
    assert out["empty_rounds"] == [2, 3, 4] and out["trained"] and out["silent_devices"] == ["2"]
    assert any("3 of 4 rounds aggregated no update" in w for w in out["warnings"])


def test_a_run_that_aggregated_nothing_says_so(tmp_path):
    rec = RunRecorder(tmp_path, 2, lambda r: None, max_empty_rounds=0)
    record(rec, [0])
    for r in (1, 2):
        rec.aggregate_fit_metrics([])
        rec.round_done(r, 1.0, REPORT, [np.zeros(2)], outcome={"sampled": ["1"]})
        rec.check_progress(r)
    out = rec.outcome()
    assert not out["trained"] and "untrained" in out["warnings"][0]


def test_server_state_round_trips_with_fedadams_moments(tmp_path):
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAdam, FedAvg

    weights = [np.ones((2, 3), np.float32), np.zeros(3, np.float32)]
    adam = FedAdam(initial_parameters=ndarrays_to_parameters(weights))
    adam.m_t = [w + 1 for w in weights]
    adam.v_t = [w + 2 for w in weights]
    checkpoint.save(tmp_path, checkpoint.ServerState(7, weights, {"rows": [{"round": 7}]},
                                                     checkpoint.optimiser_state(adam)))
    state = checkpoint.load(tmp_path)
    assert state.round == 7 and state.records == {"rows": [{"round": 7}]}
    fresh = FedAdam(initial_parameters=ndarrays_to_parameters(weights))
    checkpoint.restore_optimiser(fresh, state.optimiser)
    assert all(np.array_equal(a, b) for a, b in zip(fresh.v_t, adam.v_t, strict=True))
    with pytest.raises(checkpoint.StateError, match="FedAvg"):
        checkpoint.restore_optimiser(FedAvg(), state.optimiser)
    (tmp_path / checkpoint.STATE_FILE).write_bytes(b"truncated")
    with pytest.raises(checkpoint.StateError, match="cannot be read"):
        checkpoint.load(tmp_path)


def test_resume_refuses_overrides_that_change_the_experiment(tmp_path, flower_env):
    cfg = make_config(tmp_path)
    run_dir = Path(cfg.run_dir)
    announce(cfg)
    ask = OmegaConf.create({**OmegaConf.to_container(cfg), "resume": str(run_dir)})
    with pytest.raises(ConfigError, match=r"overriding rounds, privacy\.dp_sgd\.noise_multiplier would change"):
        resumed(ask, ["resume=x", "rounds=50", "privacy.dp_sgd.noise_multiplier=0.1"])
    ask.federation.reply_timeout_s = 33
    again = resumed(ask, [f"resume={run_dir}", "federation.reply_timeout_s=33"])
    assert again.federation.reply_timeout_s == 33 and again.run_uid == cfg.run_uid
    assert again.resume == str(run_dir.resolve())


def wait_for(predicate, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def session_members(sid: int) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc.pid)
        except OSError:
            pass
    return found


def training_events(ledger: Path) -> int:
    try:
        return sum(e["kind"] == "training" for e in json.loads(ledger.read_text())["events"])
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_sigkill_after_round_k_then_resume_loses_nothing_and_counts_nothing_twice(tmp_path):
    from fl_ser.privacy.accountant import epsilon, user_level_epsilon
    from fl_ser.privacy.ledger import LifetimeLedger

    run_dir, n, k = tmp_path / "run", 4, 2
    overrides = ["privacy=full", "model=mlp", "data.num_speakers=5", "partition.num_test_speakers=2", f"rounds={n}",
                 "strategy=fedadam", "release.formats=[torchscript]",
                 "privacy.user_level.noise_multiplier=0.7", f"cache_dir={tmp_path / 'cache'}",
                 f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "experiments.train"]
    console = tmp_path / "first.log"
    with console.open("w") as out:
        server = subprocess.Popen([*cmd, *overrides], cwd=REPO, env=env, start_new_session=True, stdout=out,
                                  stderr=subprocess.STDOUT)
    state = run_dir / checkpoint.STATE_FILE
    wait_for(lambda: (state.exists() and checkpoint.load(run_dir).round >= k) or server.poll() is not None,
             f"round {k}'s checkpoint")
    assert server.poll() is None, console.read_text()[-3000:]
    os.killpg(server.pid, signal.SIGKILL)  # the server and every process of its session: no polite stop
    server.wait()
    wait_for(lambda: not session_members(server.pid), "Ray's processes to go with the server", timeout=30)
    ledgers = sorted(p for p in (run_dir / "devices").glob("*.json") if p.name != "index.json")
    at_kill = checkpoint.load(run_dir).round
    in_flight = {p.name: training_events(p) - at_kill for p in ledgers}  # 1 where round at_kill+1 had trained
    assert set(in_flight.values()) <= {0, 1} and not (run_dir / "summary.json").exists()

    done = subprocess.run([*cmd, f"resume={run_dir}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "fl-ser: resuming privacy=full" in console and f"after round {at_kill} of {n}" in console

    rows = rows_of(run_dir)
    assert [r["round"] for r in rows] == list(range(n + 1))  # every round once
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round_*.npz")) == [
        f"round_{r:03d}.npz" for r in range(n + 1)]
    cfg = OmegaConf.load(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_after"] == [at_kill]
    devices = len(ledgers)
    user = cfg.privacy.user_level
    uninterrupted = [user_level_epsilon(float(user.noise_multiplier), 1.0, r, float(user.delta), str(user.accountant))
                     for r in range(1, n + 1)]
    assert [r["epsilon_user"] for r in rows[1:]] == pytest.approx(uninterrupted)
    assert summary["epsilon_user"] == pytest.approx(uninterrupted[-1])

    from clients.client_app import dp_config
    from fl_ser.training import LocalTrainConfig, planned_entries

    train = LocalTrainConfig(**OmegaConf.to_container(cfg.train))
    lifetimes = []
    for path in ledgers:
        events = json.loads(path.read_text())["events"]
        assert {e["run"] for e in events} == {cfg.run_uid}  # one fl-ser run across the crash
        trained = [e for e in events if e["kind"] == "training"]
        assert len(trained) == n + in_flight[path.name]  # the round in flight counts as spent
        size = len(json.loads(path.read_text())["cohorts"][trained[0]["cohort"]])
        dp = dp_config(cfg, size)
        spend = epsilon(planned_entries(size, train, dp.noise_multiplier) * len(trained), dp.delta, dp.accountant)
        with LifetimeLedger(path.parent, path.stem).open() as book:
            ids = book.cohorts[trained[0]["cohort"]]
            lifetime = book.epsilon(ids, dp.delta, dp.accountant)
        assert lifetime == pytest.approx(spend)  # the lifetime epsilon is exactly what was spent
        lifetimes.append(lifetime)
    assert summary["epsilon_sample_max"] == pytest.approx(max(lifetimes))
    assert devices == summary["num_devices"]


def test_a_resume_logs_into_its_runs_dir_and_a_new_run_gets_a_fresh_one():
    from hydra import compose, initialize_config_dir

    import experiments  # noqa: F401  (registers the run-dir resolver, as every entry point does)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        fresh = compose("config", return_hydra_config=True).hydra
        again = compose("config", overrides=["resume=/runs/a"], return_hydra_config=True).hydra
    assert fresh.run.dir.startswith("outputs/") and fresh.output_subdir == ".hydra"
    assert again.run.dir == "/runs/a" and again.output_subdir.startswith(".hydra/resumed-")  # the first's is kept
