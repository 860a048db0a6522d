"""Feature normalisation inside the guarantee: public statistics touch no private data, DP statistics are bounded
and accounted in the ledger, and unsound choices are refused."""

import json
import math
from pathlib import Path

import pytest
import torch

from fl_ser.privacy import normalization
from fl_ser.privacy.accountant import epsilon
from tests.conftest import make_config

SMALL = ["data.num_speakers=7", "data.utterances_per_emotion=6", "partition.num_test_speakers=2", "train.epochs=1"]


def captured_training_inputs(cfg, monkeypatch, change_one: bool, rounds: int = 1):
    """The normalised features one device trains on, optionally after one of its utterances changed."""
    from flwr.app import Context, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters

    import clients.client_app as client_app
    import fl_ser.training as training
    from fl_ser.task import get_arrays, new_classifier

    seen = []
    real_train = training.train_local

    def spy(classifier, x, y, *args, **kwargs):
        seen.append(x.clone())
        return real_train(classifier, x, y, *args, **kwargs)

    monkeypatch.setattr(training, "train_local", spy)
    if change_one:
        real_data = client_app.local_data

        def one_changed(cfg_, setup):
            data = real_data(cfg_, setup)
            x = data.x.clone()
            x[0] = x[0] * 3 + 5  # one utterance, very different
            return type(data)(data.speaker, data.sex, x, data.y, data.report, ("changed", *data.ids[1:]))

        monkeypatch.setattr(client_app, "local_data", one_changed)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 5}, state=RecordDict(),
                  run_config={})
    params = get_arrays(new_classifier(cfg, len(cfg.labels)))
    for r in range(rounds):
        client_app.make_client(cfg, ctx).fit(FitIns(ndarrays_to_parameters(params), {"server_round": r + 1}))
    return seen


def test_with_public_statistics_one_utterance_changes_no_other_training_example(tmp_path, monkeypatch):
    """Regression: each device standardised with the mean/std of all its utterances, so one utterance moved every
    normalised example and DP-SGD's per-example epsilon did not cover what was released."""
    cfg = make_config(tmp_path, *SMALL)
    assert cfg.privacy.normalization.mode == "public"
    (before,) = captured_training_inputs(cfg, monkeypatch, change_one=False)
    (after,) = captured_training_inputs(cfg, monkeypatch, change_one=True)
    assert not torch.equal(before[0], after[0])
    torch.testing.assert_close(before[1:], after[1:], rtol=0, atol=0)


def test_dp_statistics_are_accounted_once_and_reused(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, *SMALL, "privacy.normalization.mode=dp", "privacy.normalization.noise_multiplier=3")
    inputs = captured_training_inputs(cfg, monkeypatch, change_one=False, rounds=3)
    assert all(torch.equal(inputs[0], x) for x in inputs[1:])  # the same release, reused: paid for once
    (ledger,) = Path(cfg.privacy.ledger_dir).glob("spk*.json")
    events = json.loads(ledger.read_text())["events"]
    assert [e["kind"] for e in events] == ["normalization", "training", "training", "training"]
    assert events[0]["mechanisms"] == [[3.0, 1.0, 1]]  # one Gaussian mechanism: (z, q = 1, one step)
    training = [tuple(m) for e in events[1:] for m in e["mechanisms"]]
    total = epsilon([(3.0, 1.0, 1), *training], 1e-5)
    assert total > epsilon(training, 1e-5)  # the normaliser's share is in the total


def test_new_recordings_get_a_new_release(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, *SMALL, "privacy.normalization.mode=dp")
    captured_training_inputs(cfg, monkeypatch, change_one=False)
    captured_training_inputs(cfg, monkeypatch, change_one=True)
    (ledger,) = Path(cfg.privacy.ledger_dir).glob("spk*.json")
    assert [e["kind"] for e in json.loads(ledger.read_text())["events"]].count("normalization") == 2


@pytest.mark.parametrize("features", ["functionals", "logmel"])
def test_one_utterance_moves_the_released_sum_by_at_most_the_sensitivity(tmp_path, features):
    model = [] if features == "functionals" else ["model=cnn"]
    cfg = make_config(tmp_path, *SMALL, "privacy.normalization.mode=dp", f"features={features}", *model)
    norm = normalization.from_config(cfg)
    far = torch.stack([norm.reference.mean + 1e6, norm.reference.mean - 1e6])  # every value at its clip bound
    extreme = far.expand(2, *norm.shape) if features == "logmel" else far
    rows = norm.contributions(extreme.to(torch.float32))
    assert rows.norm(dim=1).max() <= norm.sensitivity * (1 + 1e-12)
    assert rows.norm(dim=1).max() >= 0.99 * norm.sensitivity  # the bound is tight: it is the real sensitivity
    assert norm.sensitivity == pytest.approx(math.sqrt(3 * norm.num_statistics))


def test_the_release_estimates_the_statistics(tmp_path):
    import dataclasses

    cfg = make_config(tmp_path, *SMALL, "privacy.normalization.mode=dp")
    norm = dataclasses.replace(normalization.from_config(cfg), noise_multiplier=0.01)
    x = (norm.reference.mean + norm.reference.std * (0.5 + 0.2 * torch.randn(4000, 74, dtype=torch.float64)))
    stats = norm.release(x.to(torch.float32))
    torch.testing.assert_close(stats.mean, x.mean(0), atol=0.02 * float(norm.reference.std.max()), rtol=0)
    torch.testing.assert_close(stats.std, x.std(0), atol=0.02 * float(norm.reference.std.max()), rtol=0)


def test_unsound_or_impossible_normalisations_are_refused_with_the_fix(tmp_path):
    from experiments.train import ConfigError

    with pytest.raises(ConfigError, match="mode=local fits each device's normaliser on all its utterances"):
        make_config(tmp_path, "privacy.normalization.mode=local")
    with pytest.raises(ConfigError, match="time-frequency features"):
        make_config(tmp_path, "privacy.normalization.mode=utterance")
    with pytest.raises(ConfigError, match="DP-SGD is off"):
        make_config(tmp_path, "privacy=none", "privacy.normalization.mode=dp")
    with pytest.raises(ConfigError, match="impossible privacy budget"):
        make_config(tmp_path, "privacy.normalization.mode=dp", "privacy.normalization.noise_multiplier=0.2")
    make_config(tmp_path, "privacy=none")  # local statistics are fine where no sample-level guarantee is claimed
    make_config(tmp_path, "features=logmel", "model=cnn", "privacy.normalization.mode=utterance")


def test_the_release_carries_only_public_statistics(tmp_path):
    from server.evaluation import HeldOutEvaluator

    cfg = make_config(tmp_path, *SMALL)
    norm = normalization.from_config(cfg)
    evaluator = HeldOutEvaluator(cfg, ("spk0005", "spk0006"))
    published = evaluator.normalization.published()
    torch.testing.assert_close(published.mean, norm.reference.mean.float())
    torch.testing.assert_close(published.std, norm.reference.std.float())


def test_reference_statistics_from_a_file(tmp_path):
    from omegaconf import OmegaConf

    from experiments.reference_stats import reference_stats

    public = make_config(tmp_path, "data.num_speakers=3", "data.utterances_per_emotion=1", "data.seed=77",
                         "partition.num_test_speakers=1")
    file = tmp_path / "stats.json"
    reference_stats(OmegaConf.merge(public, {"out": str(file)}))
    cfg = make_config(tmp_path, *SMALL, f"privacy.normalization.reference={file}")
    torch.testing.assert_close(normalization.from_config(cfg).reference.mean.flatten(),
                               torch.tensor(json.loads(file.read_text())["mean"], dtype=torch.float64))
    from experiments.train import ConfigError

    with pytest.raises(ConfigError, match="other features"):
        make_config(tmp_path, *SMALL, "features=logmel", "model=cnn", f"privacy.normalization.reference={file}")


def test_per_speaker_statistics_on_single_emotion_speakers_are_warned_about(tmp_path, caplog):
    """A speaker who expresses one emotion has that emotion as its mean: local statistics would remove it."""
    import logging

    few = ("data.num_speakers=12", "partition.num_test_speakers=2", "data.utterances=zipf",
           "data.emotions_per_speaker=1")
    with caplog.at_level(logging.WARNING, logger="fl_ser"):
        make_config(tmp_path, "privacy=none", *few)
        assert "median training speaker expresses 1 of the 7 emotions" in caplog.text
        caplog.clear()
        make_config(tmp_path, "privacy=none", "privacy.normalization.mode=public", *few)
        make_config(tmp_path, "privacy=none", "data.num_speakers=6", "data.utterances_per_emotion=1",
                    "partition.num_test_speakers=2")  # every speaker covers every emotion
        assert "median training speaker" not in caplog.text
