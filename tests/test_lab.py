"""Lab trials on the Deployment Engine: key material, TLS and node authentication, rehearsals with faults: a
device that vanishes, a device that restarts, a ServerApp that dies and is resumed."""

from __future__ import annotations

import itertools
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from omegaconf import OmegaConf

from experiments.deployment import CONNECTION, flwr_cli, flwr_env
from experiments.lab.pki import Lab, LabError, prepare_lab
from experiments.lab.processes import ProcessError, Processes, flower_bin, free_port
from experiments.lab.rehearsal import (
    READY,
    DeviceFault,
    ServerFault,
    check_faults,
    leaked_keys,
    start_superlink,
    training_rounds,
)
from tests.conftest import REPO

SMALL = ["data.num_speakers=5", "partition.num_test_speakers=2"]  # 3 devices, 2 held out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return prepare_lab(tmp_path_factory.mktemp("lab") / "lab", 3, ["127.0.0.1", "superlink.lab.example"])


def test_prepare_writes_a_ca_a_server_certificate_and_device_keys(lab):
    ca = x509.load_pem_x509_certificate(lab.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(lab.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"superlink.lab.example", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert isinstance(load_pem_private_key(lab.server_key.read_bytes(), None), ec.EllipticCurvePrivateKey)
    for device in lab.devices:
        key = load_ssh_private_key(lab.device_key(device).read_bytes(), None)
        assert isinstance(key.curve, ec.SECP384R1)  # a NIST curve, as Flower's node auth requires
        assert lab.enrolled_key(device).read_bytes() == (lab.device_dir(device) / "node.pub").read_bytes()
    # aggregation=ckks: one CKKS key, the same on every device (read_secret_context checks mode 0600 and params)
    from fl_ser.privacy.ckks import CKKSParams, key_id, read_secret_context

    assert len({key_id(read_secret_context(lab.ckks_key(d), CKKSParams())) for d in lab.devices}) == 1
    for secret in lab.secrets:  # private keys: owner-only files in owner-only folders
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    assert "PRIVATE" not in (lab.root / "lab.json").read_text()
    assert Lab.load(lab.root) == lab


def test_prepare_refuses_bad_requests(tmp_path, lab):
    with pytest.raises(LabError, match="already holds a lab"):
        prepare_lab(lab.root, 3, ["127.0.0.1"])
    with pytest.raises(LabError, match="at least 2 devices"):
        prepare_lab(tmp_path / "one", 1, ["127.0.0.1"])
    with pytest.raises(LabError, match="not a lab folder"):
        Lab.load(tmp_path)


def test_leak_check_finds_a_private_key_anywhere_in_the_outputs(tmp_path, lab):
    (tmp_path / "log.txt").write_text("all fine\n")
    assert leaked_keys(lab, tmp_path) == []
    body = lab.device_key(lab.devices[1]).read_text().splitlines()[1:-1]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "dump.json").write_text(json.dumps({"key": "\n".join(body)}))  # re-wrapped, JSON-escaped
    assert leaked_keys(lab, tmp_path) == ["sub/dump.json"]


def test_fault_options_parse_and_are_checked_against_the_rehearsal():
    assert DeviceFault.parse("device-02@3") == DeviceFault("device-02", 3)
    assert DeviceFault.parse("device-01@2", restart=True) == DeviceFault("device-01", 2, restart=True)
    with pytest.raises(LabError, match="--drop 'device-2': expected DEVICE@ROUND"):
        DeviceFault.parse("device-2")
    with pytest.raises(LabError, match="--restart 'device-01@0'"):
        DeviceFault.parse("device-01@0", restart=True)
    assert ServerFault.parse("3") == ServerFault(3) and ServerFault.parse("2", superlink=True) == ServerFault(2, True)
    with pytest.raises(LabError, match="--kill-superlink 'x': expected a round number"):
        ServerFault.parse("x", superlink=True)
    devices = ("device-00", "device-01", "device-02")
    check_faults((DeviceFault("device-00", 2), DeviceFault("device-01", 1, True)), ServerFault(3), devices, rounds=4)
    with pytest.raises(LabError, match="not one of this rehearsal's devices"):
        check_faults((DeviceFault("device-07", 1),), None, devices, rounds=4)
    with pytest.raises(LabError, match="only 4 rounds"):
        check_faults((DeviceFault("device-00", 5, True),), None, devices, rounds=4)
    with pytest.raises(LabError, match="device-01: one fault per device"):
        check_faults((DeviceFault("device-01", 1), DeviceFault("device-01", 2, True)), None, devices, rounds=4)
    for fault in (ServerFault(4), ServerFault(4, superlink=True)):  # after the last round: nothing to resume
        with pytest.raises(LabError, match=f"{fault.option} 4: give a round from 1 to 3"):
            check_faults((), fault, devices, rounds=4)


def test_processes_restart_as_started_and_kill_a_helper_by_program_name(tmp_path):
    procs = Processes(dict(os.environ))
    helper = "import subprocess, time; subprocess.Popen(['sleep', '60']).wait(); time.sleep(60)"  # reaps it
    try:
        first = procs.start("parent", [sys.executable, "-c", helper], tmp_path / "parent.log")
        deadline = time.monotonic() + 30
        while not psutil.Process(first.popen.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        (sleeper,) = psutil.Process(first.popen.pid).children()
        assert procs.kill_descendants("parent", "python") == []  # the parent itself is not its own descendant
        assert procs.kill_descendants("parent", "sleep") == [sleeper.pid]
        sleeper.wait(timeout=10)
        assert first.popen.poll() is None  # only the helper went
        with pytest.raises(ProcessError, match="still running"):
            procs.restart("parent")
        procs.kill("parent")
        first.popen.wait(timeout=10)
        second = procs.restart("parent")
        assert second.popen.pid != first.popen.pid and second.args == first.args and second.env == first.env
        assert second.popen.poll() is None and procs.dead() == []
    finally:
        procs.stop()
    assert procs.dead() == ["parent"]


@pytest.mark.slow
def test_superlink_refuses_plaintext_and_unenrolled_supernodes(tmp_path, lab):
    port = free_port()
    env = flwr_env(tmp_path, f"127.0.0.1:{port}", lab.ca_cert)
    procs = Processes(env)
    enrolled, stranger = lab.devices[0], lab.devices[1]

    def supernode(name, *args):
        return procs.start(name, [flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                                  "--port", str(free_port()), "--max-retries", "2", *args], tmp_path / f"{name}.log",
                           env={**env, "FLWR_HOME": str(tmp_path / name)})

    try:
        start_superlink(procs, lab, port, tmp_path / "superlink.log")
        flwr_cli(["supernode", "register", str(lab.enrolled_key(enrolled)), CONNECTION], env, "enrolling")
        ca = ["--root-certificates", str(lab.ca_cert)]
        supernode("enrolled", *ca, "--auth-supernode-private-key", str(lab.device_key(enrolled)))
        supernode("stranger", *ca, "--auth-supernode-private-key", str(lab.device_key(stranger)))
        supernode("plaintext", "--insecure")
        procs.wait_for_log("enrolled", READY["supernode"], timeout=60)
        for name in ("stranger", "plaintext"):
            assert procs.started[name].popen.wait(timeout=60) != 0, f"{name} SuperNode was admitted"
        assert "Failed to activate SuperNode" in procs.started["stranger"].output()
        assert "could not establish a connection" in procs.started["plaintext"].output()
        assert "SuperNode ID" not in procs.started["stranger"].output() + procs.started["plaintext"].output()
    finally:
        procs.stop()
    assert all(p.popen.poll() is not None for p in procs.started.values())
    assert leaked_keys(lab, tmp_path) == []


@pytest.fixture(scope="module")
def device_cache(tmp_path_factory):
    """The devices' feature caches, filled once (as on devices that already took part in a trial)."""
    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.data.partition import split_from_config
    from fl_ser.task import speaker_data
    from tests.conftest import make_config

    tmp = tmp_path_factory.mktemp("devices")
    cfg = make_config(tmp, *SMALL)
    for speaker in split_from_config(cfg, corpus_from_config(cfg)).train:
        speaker_data(cfg, speaker)
    return tmp / "cache"


def rehearse(tmp_path, lab, cache, *args, rounds=2):
    from tests.conftest import local_stack

    run_dir = tmp_path / "run"
    overrides = [*args, *SMALL, f"rounds={rounds}", f"hydra.run.dir={run_dir}", f"cache_dir={cache}"]
    cmd = [sys.executable, "-m", "experiments.lab", "rehearse", "--lab", str(lab.root),
           *local_stack([o for o in overrides if not o.startswith("--")]), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def no_flower_processes_left(run_dir) -> bool:
    import psutil

    return not [p for p in psutil.process_iter(["cmdline"])
                if any(str(run_dir) in part for part in (p.info["cmdline"] or []))]


@pytest.mark.slow
def test_rehearsal_runs_the_full_stack_and_leaves_the_model_on_every_device(tmp_path, lab, device_cache):
    # Distributed DP on the Deployment Engine: each device reads SecAgg+'s grid from its node state.
    run_dir = rehearse(tmp_path, lab, device_cache, "privacy=distributed", f"privacy.audit_dir={tmp_path / 'audit'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["privacy"] == "distributed" and summary["aggregation"] == "secagg_plus"
    assert summary["rounds"] == 2 and summary["num_devices"] == 3 and summary["dropouts"] == {}
    assert 0.95 * 8 <= summary["epsilon_sample_max"] <= 8 and np.isfinite(summary["uar"])
    # Both rounds took their DP-GD step (no accuracy bar: 2 noisy steps on 3 tiny devices may land near chance).
    models = [np.load(run_dir / "checkpoints" / f"round_{r:03d}.npz") for r in range(3)]
    for before, after in itertools.pairwise(models):
        assert any(not np.array_equal(before[k], after[k]) for k in before.files)
    assert summary["epsilon_sample"]["local"] > summary["epsilon_sample_max"]
    for name in ("metrics.csv", "metrics.jsonl", "plots/rounds.png", "plots/confusion.png",
                 "release/emotion_model.pt", "lab/rehearsal.json"):
        assert (run_dir / name).is_file(), name
    assert len(summary["device_reports"]) == 3
    record = json.loads((run_dir / "lab" / "rehearsal.json").read_text())
    assert record["leaked_private_keys"] == [] and record["dropped"] == {}
    release = (run_dir / "release" / "emotion_model.pt").read_bytes()
    wav = tmp_path / "hello.wav"
    sf.write(wav, 0.1 * np.sin(np.linspace(0, 2000, 32000)) * np.random.default_rng(0).uniform(0.5, 1, 32000), 16000)
    for device, info in record["devices"].items():
        store = run_dir / "devices" / device / "model_store"
        released = json.loads((store / "v0001" / "meta.json").read_text())
        assert released["round"] == 2 and released["version"] == 1 and len(released["config_hash"]) == 16
        assert (store / "v0001" / "emotion_model.pt").read_bytes() == release  # the exact released artifact
        # public normalisation: the release is used as it came (no per-device adaptation to store)
        assert not (store / "v0002").exists()
        assert info["report"]["released_version"] == 1 and info["report"]["version"] == 1
        ledger = json.loads((run_dir / "devices" / device / "privacy" / "ledger.json").read_text())
        assert [e["kind"] for e in ledger["events"]] == ["training", "training"]  # on the device's own disk
        pred = subprocess.run([sys.executable, "-m", "clients.predict", "--store", str(store), str(wav),
                               "--json"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
        (result,) = json.loads(pred.stdout)
        assert set(result["probabilities"]) == set(summary["labels"])
        assert result["top"] == max(result["probabilities"], key=result["probabilities"].get)
    # Every device's audit lists only SecAgg+ stages and the release report: nothing else left a device.
    stages = {json.loads(line).get("stage") for f in (tmp_path / "audit").glob("*.jsonl") for line in f.open()}
    assert stages == {"setup", "share_keys", "collect_masked_vectors", "unmask", None}
    assert no_flower_processes_left(run_dir)


def dropped_nodes(row: dict) -> set[str]:
    return {node for nodes in row["dropped"].values() for node in nodes}


@pytest.mark.slow
def test_a_restarted_device_rejoins_and_a_killed_server_resumes_without_losing_anything(tmp_path, lab,
                                                                                         device_cache):
    """One rehearsal, two faults: device-01's SuperNode is killed while it trains in round 2 (after the SecAgg+
    key exchange: the round must still aggregate from the others) and started again;
    the ServerApp is SIGKILLed after round 3 and the run resumed as a new Flower run on the same lab. Five rounds,
    so that the device (back ~20 s after its kill, when the SuperLink counts it offline: clients.supernode heartbeats
    every 10 s) is surely in the last."""
    from fl_ser.privacy.accountant import epsilon, user_level_epsilon

    z_user = 0.1  # user-level noise on, small: 3 devices' mean with more noise leaves SecAgg+'s quantisation range
    run_dir = rehearse(tmp_path, lab, device_cache, "--restart", "device-01@2", "--kill-server", "3",
                       "federation=deployment", "federation.reply_timeout_s=20",
                       f"privacy.user_level.noise_multiplier={z_user}", rounds=5)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    record = json.loads((run_dir / "lab" / "rehearsal.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    # The server: killed after round 3's checkpoint, resumed from it, every round recorded once.
    kill = record["server_kill"]
    assert kill["killed"] == "ServerApp" and kill["checkpointed_round"] == 3 and len(kill["pids"]) == 1
    assert list(kill["status_after_kill"].values()) == ["running"]  # Flower has not noticed yet: we stop it
    assert str(kill["resumed_flower_run_id"]) != kill["stopped_flower_runs"][0]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert summary["status"] == "completed" and summary["resumed_after"] == [3] and summary["rounds_completed"] == 5
    user = cfg.privacy.user_level
    assert summary["epsilon_user"] == pytest.approx(user_level_epsilon(z_user, 1.0, 5, user.delta, user.accountant),
                                                    rel=1e-9)

    # The device: dropped from the round it was killed in, back under the same node id, a participant again.
    (fault,) = record["faults"]
    node = record["devices"]["device-01"]["node_id"]
    assert (fault["device"], fault["kind"], fault["round"]) == ("device-01", "restart", 2)
    assert fault["restarted_at_s"] > fault["killed_at_s"] and fault["node_id_after_restart"] == node
    assert "device-01" in record["dropped"]["2"]
    # Killed after the key exchange, mid-round: the round still aggregates from the other two (masks recovered).
    assert rows[2]["participants"] == 2 and node in rows[2]["dropped"]["collect_masked_vectors"]
    assert rows[5]["participants"] == 3 and node not in dropped_nodes(rows[5])
    # The summary reports the resumed run's final model, as its last round recorded it. No accuracy bar here:
    # 3 devices at local DP-SGD z 4.5 for 5 rounds sit near chance (one CI run: 0.125 < 1/7).
    assert np.isfinite(summary["uar"]) and summary["uar"] == pytest.approx(rows[5]["uar"], abs=1e-9)

    # Every device's ledger: one run uid, every round whose update arrived recorded, nothing lost across the kill.
    for device, info in record["devices"].items():
        ledger = json.loads((Path(info["device_dir"]) / "privacy" / "ledger.json").read_text())
        assert {e["run"] for e in ledger["events"]} == {cfg.run_uid}
        trained = training_rounds(info["device_dir"])
        arrived = [r["round"] for r in rows[1:] if info["node_id"] not in dropped_nodes(r)]
        assert set(arrived) <= set(trained), (device, arrived, trained)
        if device == "device-01":
            before = fault["ledger_training_rounds_before_kill"]
            assert trained[:len(before)] == before and 5 in trained  # append-only; it trained again after restart
        else:
            assert len(trained) in (5, 6), trained  # 6: round 4 of the killed run had trained (spent, so counted)
        spent = [tuple(m) for e in ledger["events"] for m in e["mechanisms"]]
        reported = info["report"]["global_model_on_own_data"]["epsilon"]
        assert reported == pytest.approx(epsilon(spent, cfg.privacy.dp_sgd.delta, cfg.privacy.dp_sgd.accountant))
    assert no_flower_processes_left(run_dir)


def test_progress_reads_whole_rounds_only_while_the_server_appends(tmp_path, capsys):
    """The deployment driver prints rounds from metrics.jsonl while the ServerApp appends to it: a line still
    being written is left for the next poll, not parsed (it was a JSONDecodeError that killed a rehearsal)."""
    from experiments.deployment import _show_rounds

    row = {"round": 1, "uar": 0.5, "accuracy": 0.5, "loss": 1.0, "participants": 3, "sampled": 3, "seconds": 1.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "round": 2})[:20])
    assert _show_rounds(tmp_path, 0, 3) == 1
    assert "round   1/3" in capsys.readouterr().out
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "round": 2}) + "\n")
    assert _show_rounds(tmp_path, 1, 3) == 2
    assert "round   2/3" in capsys.readouterr().out
