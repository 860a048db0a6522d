"""SER metrics (UAR, macro-F1, per-group UAR) and speaker-independent partitions."""

import numpy as np
import pytest

from fl_ser.data.corpus import CorpusError
from fl_ser.data.partition import holdout_split, kfold_splits
from fl_ser.metrics import classification_report, uar_by, worst_group


def test_uar_is_mean_recall_and_ignores_class_balance():
    y = [0] * 90 + [1] * 10
    always_zero = classification_report(y, [0] * 100, ["a", "b"])
    assert always_zero["accuracy"] == pytest.approx(0.9)
    assert always_zero["uar"] == pytest.approx(0.5)
    rep = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"], groups=["f", "f", "m", "m", "m"])
    assert rep["uar"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert rep["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert rep["uar_by_group"] == {"f": pytest.approx(0.5), "m": pytest.approx(0.5)}
    assert 0 <= rep["macro_f1"] <= 1


def test_holdout_is_speaker_disjoint_and_sex_balanced():
    speakers = [f"s{i}" for i in range(14)]
    sex = {s: "f" if i % 2 else "m" for i, s in enumerate(speakers)}
    split = holdout_split(speakers, 4, seed=1, sex_of=sex.get)
    assert not set(split.train) & set(split.test)
    assert len(split.train) == 10 and sorted([sex[s] for s in split.test]) == ["f", "f", "m", "m"]
    assert split == holdout_split(speakers, 4, seed=1, sex_of=sex.get)
    with pytest.raises(CorpusError, match="num_test_speakers"):
        holdout_split(speakers, 13)


def test_kfold_holds_out_every_speaker_once():
    speakers = [f"{i:02d}" for i in range(10)]
    folds = kfold_splits(speakers, 5, seed=0)
    held = [s for f in folds for s in f.test]
    assert sorted(held) == speakers and all(len(f.test) == 2 for f in folds)
    assert all(np.intersect1d(f.train, f.test).size == 0 for f in folds)


def test_uar_per_speaker_and_the_worst_speaker():
    y_true = [0, 1, 0, 1, 0, 1, 2]
    y_pred = [0, 1, 0, 0, 1, 0, 2]
    speakers = ["s1", "s1", "s2", "s2", "s3", "s3", None]
    per = uar_by(y_true, y_pred, 3, speakers)
    assert per == {"s1": 1.0, "s2": 0.5, "s3": 0.0, "unknown": 1.0}  # each on the classes that speaker has
    assert worst_group(per) == ("s3", 0.0)
    assert worst_group({"b": 0.5, "a": 0.5, "c": float("nan")}) == ("a", 0.5)  # ties: the first name; NaN skipped
    name, uar = worst_group({})
    assert name is None and np.isnan(uar)
    rep = classification_report(y_true, y_pred, ["a", "b", "c"], speakers=speakers)
    assert rep["uar_by_speaker"] == per and (rep["worst_speaker"], rep["worst_speaker_uar"]) == ("s3", 0.0)
    assert "uar_by_group" not in rep and "uar_by_speaker" not in classification_report(y_true, y_pred, "abc")
    with pytest.raises(ValueError, match="group names"):
        uar_by(y_true, y_pred, 3, speakers[:-1])
