"""Lab trials on the Deployment Engine: key material, TLS and node authentication, rehearsals with dropouts."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from experiments.deployment import CONNECTION, flwr_cli, flwr_env
from experiments.lab.pki import Lab, LabError, prepare_lab
from experiments.lab.processes import Processes, flower_bin, free_port
from experiments.lab.rehearsal import READY, Dropout, leaked_keys, start_superlink
from tests.conftest import REPO

SMALL = ["data.num_speakers=5", "partition.num_test_speakers=2", "rounds=2"]  # 3 devices, 2 held out


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


def test_dropout_option_parsing():
    assert Dropout.parse("device-02@3") == Dropout("device-02", 3)
    with pytest.raises(LabError, match="DEVICE@ROUND"):
        Dropout.parse("device-2")


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


def rehearse(tmp_path, lab, cache, *args):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.lab", "rehearse", "--lab", str(lab.root), *args, *SMALL,
           f"hydra.run.dir={run_dir}", f"cache_dir={cache}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def no_flower_processes_left(run_dir) -> bool:
    import psutil

    return not [p for p in psutil.process_iter(["cmdline"])
                if any(str(run_dir) in part for part in (p.info["cmdline"] or []))]


@pytest.mark.slow
def test_rehearsal_runs_the_full_stack_and_leaves_the_model_on_every_device(tmp_path, lab, device_cache):
    run_dir = rehearse(tmp_path, lab, device_cache, f"privacy.audit_dir={tmp_path / 'audit'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["privacy"] == "full" and summary["aggregation"] == "secagg_plus"
    assert summary["rounds"] == 2 and summary["num_devices"] == 3 and summary["dropouts"] == {}
    assert 0 < summary["epsilon_sample_max"] <= 10 and summary["uar"] > 1 / 7
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


@pytest.mark.slow
def test_a_device_that_vanishes_mid_run_does_not_corrupt_the_round(tmp_path, lab, device_cache):
    run_dir = rehearse(tmp_path, lab, device_cache, "--drop", "device-02@2", "federation=deployment",
                       "federation.reply_timeout_s=20")
    summary = json.loads((run_dir / "summary.json").read_text())
    record = json.loads((run_dir / "lab" / "rehearsal.json").read_text())
    assert record["dropped"] == {"2": ["device-02"]}
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rounds] == [0, 3, 2]
    assert np.isfinite(summary["uar"]) and summary["uar"] > 1 / 7  # the round with 2 devices still aggregated
    assert no_flower_processes_left(run_dir)
