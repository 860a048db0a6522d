"""The server's held-out evaluation both ways (own statistics, new device), its per-speaker fairness figures,
what the round records carry of them, and cross-validation's aggregation of them. No federated runs."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from experiments.crossval import AVERAGED, aggregate, final_line, fold_row, write_results
from fl_ser.data.corpus import corpus_from_config
from fl_ser.data.partition import split_from_config
from fl_ser.metrics import classification_report
from fl_ser.privacy import normalization
from fl_ser.task import get_arrays, new_classifier, speaker_data
from server.evaluation import WAY_KEYS, HeldOutEvaluator, new_device_normalizer
from server.records import CSV_FIELDS, RunRecorder
from tests.conftest import make_config

TINY = ["data.num_speakers=6", "data.utterances_per_emotion=2", "partition.num_test_speakers=2"]


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    """One cache (features, reference statistics) for the module: each is computed once."""
    return tmp_path_factory.mktemp("evaluation")


def evaluator_for(shared_dir, *overrides):
    cfg = make_config(shared_dir, *TINY, *overrides)
    split = split_from_config(cfg, corpus_from_config(cfg))
    return cfg, split, HeldOutEvaluator(cfg, split.test)


def raw_features(cfg, speakers):
    return torch.cat([speaker_data(cfg, s).x for s in speakers])


def trained_classifier(cfg, evaluator, split):
    """A classifier a few steps into training on the training speakers (own statistics): better than chance,
    so the two ways' figures are a model's, not noise."""
    with torch.random.fork_rng():  # a reproducible model, without touching the global generator's state
        torch.manual_seed(0)
        clf = new_classifier(cfg, len(cfg.labels))
    x = torch.cat([evaluator.normalization.standardise(speaker_data(cfg, s).x) for s in split.train])
    y = torch.cat([speaker_data(cfg, s).y for s in split.train])
    opt = torch.optim.SGD(clf.parameters(), lr=0.5, momentum=0.5)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(x), y).backward()
        opt.step()
    return clf.eval()


def check_speaker_figures(way: dict, speakers, corpus_sexes):
    per = way["uar_by_speaker"]
    assert set(per) == set(speakers)
    scored = [u for u in per.values() if u is not None]
    assert way["worst_speaker_uar"] == pytest.approx(min(scored))
    assert per[way["worst_speaker"]] == pytest.approx(way["worst_speaker_uar"])
    assert min(scored) <= way["uar"] + 1e-12 and way["uar"] <= max(scored) + 1e-12
    # every synthetic speaker has each emotion equally often: overall recall per class is the speakers' mean
    assert way["uar"] == pytest.approx(float(np.mean(scored)))
    assert set(way["uar_by_group"]) == set(corpus_sexes)


def test_local_mode_reports_own_and_new_device_figures_that_differ(shared_dir):
    cfg, split, evaluator = evaluator_for(shared_dir, "privacy=none")
    assert evaluator.normalization.mode == "local" and evaluator.normalization.reference is None
    raw = raw_features(cfg, split.test)

    # own statistics: each test speaker standardised with its own; new device: the public reference statistics
    reference = normalization.reference_statistics(cfg)
    expected = ((raw - reference.mean.float()) / reference.std.float().clamp_min(1e-3))
    torch.testing.assert_close(evaluator.x_new_device, expected)
    first = len(speaker_data(cfg, split.test[0]).y)
    torch.testing.assert_close(evaluator.x[:first].mean(0), torch.zeros_like(evaluator.x[0]), atol=1e-4, rtol=0)
    assert not torch.allclose(evaluator.x, evaluator.x_new_device)

    clf = trained_classifier(cfg, evaluator, split)
    loss, report = evaluator.score(clf)
    new = report["new_device"]
    assert set(WAY_KEYS) | {"loss", "same_as_own"} <= set(new) and new["same_as_own"] is False
    assert report["normalization"] == "local"
    assert new["loss"] != pytest.approx(loss)
    assert (new["uar"], new["accuracy"]) != (report["uar"], report["accuracy"])
    sexes = {speaker_data(cfg, s).sex for s in split.test}
    for way in (report, new):
        check_speaker_figures(way, split.test, sexes)
    assert report["uar"] > 1.5 / len(cfg.labels)  # the trained model is far above chance with own statistics

    # each speaker's figure is that speaker's utterances alone
    spk = split.test[1]
    idx = [i for i, s in enumerate(evaluator.speakers) if s == spk]
    pred = clf(evaluator.x_new_device[idx]).argmax(1)
    alone = classification_report(evaluator.y[idx].numpy(), pred.numpy(), evaluator.labels)
    assert new["uar_by_speaker"][spk] == pytest.approx(alone["uar"])

    # the same through the arrays the server evaluates every round
    loss2, report2 = evaluator(get_arrays(clf))
    assert loss2 == pytest.approx(loss) and report2["new_device"]["uar"] == pytest.approx(new["uar"])


def test_public_mode_is_evaluated_once_and_flagged_the_same(shared_dir):
    cfg, split, evaluator = evaluator_for(shared_dir, "privacy=none", "privacy.normalization.mode=public")
    assert evaluator.x_new_device is None and new_device_normalizer(cfg, evaluator.normalization) is None
    torch.testing.assert_close(evaluator.x, evaluator.normalization.published()(raw_features(cfg, split.test)))
    loss, report = evaluator.score(new_classifier(cfg, len(cfg.labels)))
    new = report["new_device"]
    assert new["same_as_own"] is True and new["loss"] == loss
    assert {k: new[k] for k in WAY_KEYS} == {k: report[k] for k in WAY_KEYS}


def test_dp_mode_new_device_uses_the_published_public_statistics(shared_dir):
    cfg = make_config(shared_dir, *TINY, "privacy.normalization.mode=dp", "privacy.normalization.bound=2.0")
    norm = normalization.from_config(cfg)
    fresh, published = new_device_normalizer(cfg, norm), norm.published()
    assert fresh.bound == published.bound == 2.0
    torch.testing.assert_close(fresh.mean, published.mean)
    torch.testing.assert_close(fresh.std, published.std)


REPORT_KEYS = ("uar", "accuracy", "macro_f1", "confusion")


def test_round_rows_carry_new_device_and_worst_speaker_and_older_rows_still_resume(shared_dir, tmp_path):
    cfg, _, evaluator = evaluator_for(shared_dir, "privacy=none")
    loss, report = evaluator(get_arrays(new_classifier(cfg, len(cfg.labels))))
    rec = RunRecorder(tmp_path, 2, lambda r: None)
    old_row = {k: report[k] for k in REPORT_KEYS}  # a report as the evaluator made them before this change
    rec.round_done(0, loss, old_row, [np.zeros(2)])
    rec.round_done(1, loss, report, [np.zeros(2)], outcome={"sampled": ["1"], "participants": ["1"]})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["uar_new_device"] is None and rows[0]["worst_speaker_uar"] is None
    assert rows[1]["uar_new_device"] == pytest.approx(report["new_device"]["uar"])
    assert rows[1]["worst_speaker_uar"] == pytest.approx(report["worst_speaker_uar"])
    assert rows[1]["worst_speaker"] == report["worst_speaker"]
    assert rows[1]["uar_by_speaker_new_device"] == pytest.approx(report["new_device"]["uar_by_speaker"])

    # a run whose rows predate the new columns resumes: its rows load, the CSV is rewritten with empty cells
    state = rec.state()
    for key in ("uar_new_device", "worst_speaker_uar", "worst_speaker", "worst_speaker_uar_new_device",
                "worst_speaker_new_device", "uar_by_speaker", "uar_by_speaker_new_device"):
        state["rows"][0].pop(key)
    resumed = RunRecorder(tmp_path, 2, lambda r: None, restored=state)
    assert len(resumed.rounds) == 2
    with (tmp_path / "metrics.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert list(csv_rows[0]) == CSV_FIELDS
    assert csv_rows[0]["uar_new_device"] == "" and float(csv_rows[1]["uar_new_device"]) == pytest.approx(
        report["new_device"]["uar"])


def summary_of(uar, new_device, worst, f, m, speakers=("a", "b")):
    return {"uar": uar, "accuracy": uar + 0.1, "macro_f1": uar - 0.1, "test_speakers": list(speakers),
            "uar_new_device": new_device, "new_device": {"uar": new_device}, "worst_speaker_uar": worst,
            "worst_speaker": speakers[0], "uar_by_group": {"f": f, "m": m}, "epsilon_sample_max": 3.0,
            "epsilon_user": None, "wall_s": 1.0}


def test_crossval_aggregates_the_new_figures_over_the_folds_that_have_them(tmp_path):
    folds = [fold_row(0, summary_of(0.6, 0.4, 0.5, 0.7, 0.5)), fold_row(1, summary_of(0.8, 0.5, 0.6, 0.9, 0.7))]
    # a fold whose summary has no new-device or per-speaker figures (e.g. an older or centralised one), no males
    legacy = {"uar": 0.7, "accuracy": 0.8, "macro_f1": 0.6, "test_speakers": ["c"], "uar_by_group": {"f": 0.7},
              "epsilon_sample_max": 5.0, "epsilon_user": None, "wall_s": 2.0}
    folds.append(fold_row(2, legacy))
    assert folds[2]["uar_new_device"] is None and folds[2]["uar_male"] is None and folds[2]["uar_female"] == 0.7
    result = aggregate(folds, "federated", "none")
    assert result["uar_mean"] == pytest.approx(0.7) and result["uar_std"] == pytest.approx(0.1)
    assert result["uar_new_device_mean"] == pytest.approx(0.45)
    assert result["uar_new_device_std"] == pytest.approx(math.sqrt(0.005))
    assert result["uar_new_device_folds"] == 2 and result["uar_folds"] == 3
    assert result["worst_speaker_uar_mean"] == pytest.approx(0.55)
    assert result["uar_female_mean"] == pytest.approx(2.3 / 3) and result["uar_male_mean"] == pytest.approx(0.6)
    assert result["epsilon_sample_max"] == 5.0 and result["epsilon_user"] is None
    assert all(f"{k}_mean" in result and f"{k}_std" in result for k in AVERAGED)

    one = aggregate(folds[:1], "centralised", "none")
    assert one["uar_std"] == 0.0 and one["uar_new_device_mean"] == pytest.approx(0.4)
    none = aggregate([fold_row(0, legacy)], "centralised", "none")
    assert none["uar_new_device_mean"] is None and none["uar_new_device_std"] is None
    assert "uar_new_device" not in final_line(none)

    line = final_line(result)
    for name in ("uar 0.700 +- 0.100", "uar_new_device 0.450", "worst_speaker_uar 0.550", "uar_female 0.767",
                 "uar_male 0.600"):
        assert name in line
    write_results(result, tmp_path)
    assert json.loads((tmp_path / "crossval.json").read_text())["uar_new_device_mean"] == pytest.approx(0.45)
    with (tmp_path / "crossval.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["uar_new_device"] or "nan") for r in rows][:2] == [0.4, 0.5]
    assert rows[2]["uar_new_device"] == "" and rows[0]["test_speakers"] == "a b"
