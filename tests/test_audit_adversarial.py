"""Adversarial audio (experiments/audit/adversarial.py): PGD on the released pipeline, bounded by SNR."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from experiments.audit.adversarial import adversarial_audit, held_out_utterances, pgd, plot_adversarial
from experiments.audit.federation import AuditFederation, corpus_devices
from fl_ser.privacy import normalization
from fl_ser.task import pipeline

# the audited models are tiny: one intra-op thread is ~10x faster than two that contend (conftest)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# public normalisation: the release's own normaliser is the one every device uses (with mode=local it is not)
TINY = ("privacy=none", "model=linear", "data.num_speakers=6", "partition.num_test_speakers=2",
        "data.utterances_per_emotion=4", "privacy.normalization.mode=public")


@pytest.fixture(scope="module")
def release(tmp_path_factory, one_torch_thread, feature_cache):
    cfg = make_config(tmp_path_factory.mktemp("adv"), *TINY, f"cache_dir={feature_cache}")
    fed = AuditFederation(cfg)
    arrays = fed.run(corpus_devices(cfg), 10)
    return cfg, pipeline(cfg, fed.classifier(arrays), normalization.from_config(cfg).published(), list(cfg.labels))


@pytest.fixture(scope="module")
def result(release):
    cfg, pipe = release
    return adversarial_audit(cfg, pipe, snrs=(None, 30), steps=10, max_utterances=30, progress=lambda _: None)


def test_pgd_lowers_accuracy(result, tmp_path):
    clean, attacked = result["rows"]
    assert clean["snr_db"] is None and clean["n"] == attacked["n"] == 30
    assert clean["accuracy"] >= 0.3  # the release has learned something to attack
    assert attacked["accuracy"] <= clean["accuracy"] - 0.2
    assert attacked["flipped"] >= 0.8
    plot_adversarial(result, tmp_path / "adv.png")
    assert (tmp_path / "adv.png").stat().st_size > 0


def test_perturbation_respects_bound(release, result):
    assert result["rows"][1]["achieved_snr_db_min"] >= 30 - 0.01
    cfg, pipe = release
    waves, y = held_out_utterances(cfg, 3)
    for w, label in zip(waves, y, strict=True):
        x = torch.from_numpy(w)[None]
        eps = x.pow(2).mean(-1, keepdim=True).sqrt() * 10 ** (-30 / 20)
        delta = pgd(pipe, x, torch.tensor([label]), eps, steps=3)
        assert delta.abs().max() <= eps.max() * (1 + 1e-6)
        assert delta.abs().max() > 0.5 * eps.max()  # the gradient through the extractor is not zero


def test_random_noise_flips_far_fewer(result):
    attacked = result["rows"][1]
    assert attacked["random_flipped"] <= attacked["flipped"] - 0.4
