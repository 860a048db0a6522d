"""End-to-end federated runs on Flower's simulation engine: the synthetic corpus and the real EmoDB."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from experiments.train import run
from fl_ser.privacy.boundary import EVALUATE_METRICS, TRAIN_METRICS
from tests.conftest import ALL_FORMATS, EMODB, make_config, needs_emodb

SUMMARY_KEYS = {"uar", "accuracy", "macro_f1", "uar_by_group", "epsilon_sample_max", "epsilon_user", "delta", "rounds",
                "wall_s", "num_devices", "num_test_speakers", "num_utterances"}


def check_release(run_dir, num_classes, formats):
    from fl_ser.protocol import MODEL_FILES

    names = {p.name for p in (run_dir / "release").iterdir()}
    assert names == {MODEL_FILES[f] for f in formats} | {"labels.json", "config.yaml"}
    summary = json.loads((run_dir / "summary.json").read_text())["release"]
    assert not summary["unavailable"] and all(d <= 1e-4 for d in summary["max_difference"].values())
    model = torch.jit.load(str(run_dir / "release" / "emotion_model.pt"))
    labels = json.loads((run_dir / "release" / "labels.json").read_text())
    assert len(labels) == num_classes
    wave = torch.from_numpy(np.random.default_rng(0).normal(0, 0.05, 16000 * 2).astype(np.float32))[None]
    probs = model(wave)
    assert probs.shape == (1, num_classes) and abs(float(probs.sum()) - 1) < 1e-5


@pytest.mark.slow
def test_synthetic_full_privacy_stack_and_the_boundary_audit(tmp_path):
    audit = tmp_path / "audit"
    cfg = make_config(tmp_path, "data.num_speakers=7", "partition.num_test_speakers=2", "rounds=3", ALL_FORMATS,
                      f"privacy.audit_dir={audit}", "privacy.user_level.noise_multiplier=0.5",
                      "privacy.user_level.placement=distributed")
    summary = run(cfg)
    run_dir = tmp_path / "run"
    assert SUMMARY_KEYS <= set(summary)
    assert summary["num_devices"] == 5 and summary["rounds"] == 3 and summary["num_test_speakers"] == 2
    assert 0 < summary["epsilon_sample_max"] <= cfg.privacy.dp_sgd.epsilon_budget
    assert summary["epsilon_user"] is not None and summary["epsilon_user"] > 0
    assert set(summary["uar_by_group"]) == {"f", "m"}
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4  # round 0 (initial model) + 3
    for name in ("config.yaml", "metrics.csv", "plots/rounds.png", "plots/confusion.png", "checkpoints/round_003.npz"):
        assert (run_dir / name).exists(), name
    check_release(run_dir, len(cfg.labels), cfg.release.formats)
    assert len(summary["device_reports"]) == 5

    # The privacy boundary, observed: every reply of every device, all of which the boundary mod checked.
    entries = [json.loads(line) for f in sorted(audit.glob("node_*.jsonl")) for line in f.read_text().splitlines()]
    assert len({e["node"] for e in entries}) == 5
    stages = [e["stage"] for e in entries if e["type"] == "train"]
    assert {s: stages.count(s) for s in set(stages)} == {s: 5 * 3 for s in
                                                          ("setup", "share_keys", "collect_masked_vectors", "unmask")}
    for e in entries:
        for name, rec in e["records"].items():
            if rec["kind"] == "arrays":  # no float array ever left a device: only masked vectors (as bytes)
                assert all(item["bytes"] == 0 for item in rec["items"].values()), (e["stage"], name)
            if name == "fitres.metrics":
                assert set(rec["keys"]) <= TRAIN_METRICS
            if name == "evaluateres.metrics":
                assert set(rec["keys"]) <= EVALUATE_METRICS
        assert e["type"] in ("train", "evaluate")


@pytest.mark.slow
@needs_emodb
def test_emodb_federated_speaker_independent(tmp_path):
    cfg = make_config(tmp_path, "data=emodb", f"data.root={EMODB}", "partition.num_folds=5", "partition.fold=0",
                      "privacy=none", "model.hidden=[64,32]", "train.batch_size=16", "train.lr=0.05",
                      "train.momentum=0.9", "train.epochs=2", "rounds=6")
    summary = run(cfg)
    assert summary["num_devices"] == 8 and summary["num_test_speakers"] == 2
    assert summary["epsilon_sample_max"] is None and summary["epsilon_user"] is None
    assert summary["uar"] > 0.4  # chance is 1/7; a learning federation is far above it
    check_release(tmp_path / "run", 7, cfg.release.formats)
    # the release runs on a real held-out recording
    test_file = next(p for p in sorted((EMODB / "wav").glob("*.wav")) if p.name[:2] in summary["test_speakers"])
    wave, sr = sf.read(test_file, dtype="float32")
    from fl_ser.data.audio import read_audio

    model = torch.jit.load(str(tmp_path / "run" / "release" / "emotion_model.pt"))
    probs = model(torch.from_numpy(read_audio(test_file))[None])
    assert sr == 22050 and len(wave) > sr // 2 and probs.shape == (1, 7)
