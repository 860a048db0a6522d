"""Public pre-training (server/pretrain.py): the initial model fits the experiment's classifier, learns its public
corpus, matches labels by name (missing classes keep their fresh rows), is cached, and the private corpus is
refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from experiments.train import ConfigError
from fl_ser.data.corpus import corpus_from_config
from fl_ser.metrics import classification_report
from fl_ser.privacy import normalization
from fl_ser.task import get_arrays, new_classifier, set_arrays, speaker_data
from fl_ser.training import evaluate
from server import pretrain
from tests.conftest import make_config
from tests.test_loaders import tone

EXPERIMENT = ["data.num_speakers=6", "data.utterances_per_emotion=2", "partition.num_test_speakers=2", "privacy=none"]
TINY = [*EXPERIMENT, "pretrain=synthetic", "pretrain.corpus.num_speakers=3", "pretrain.corpus.utterances_per_emotion=1",
        "pretrain.epochs=60"]


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    """One cache for the module: public features are extracted once."""
    return tmp_path_factory.mktemp("pretrain")


def public_uar(cfg, arrays) -> float:
    """UAR of ``arrays`` on the public corpus, recomputed here (labels mapped to the experiment's by name)."""
    corpus = pretrain.public_corpus(cfg)
    norm = normalization.from_config(cfg)
    public = OmegaConf.create({**OmegaConf.to_container(cfg), "data": OmegaConf.to_container(cfg.pretrain.corpus),
                               "labels": list(corpus.emotions)})
    xs, ys = [], []
    for speaker in corpus.speakers:
        data = speaker_data(public, speaker)
        keep = [i for i, k in enumerate(data.y.tolist()) if corpus.emotions[k] in cfg.labels]
        xs.append(norm.standardise(data.x[keep]))
        ys.append(torch.tensor([list(cfg.labels).index(corpus.emotions[k]) for k in data.y[keep].tolist()]))
    classifier = new_classifier(cfg, len(cfg.labels))
    set_arrays(classifier, arrays)
    pred, _ = evaluate(classifier, torch.cat(xs), torch.cat(ys))
    return classification_report(torch.cat(ys).numpy(), pred.numpy(), list(cfg.labels))["uar"]


@pytest.mark.parametrize("mode", ["local", "public"])
def test_pretrained_arrays_fit_the_model_and_learn_the_public_corpus(where, mode):
    cfg = make_config(where, *TINY, f"privacy.normalization.mode={mode}", "privacy.normalization.bound=2.0")
    OmegaConf.set_readonly(cfg, True)  # as the apps get it on the Deployment Engine (fl_ser.run_config.decode)
    arrays, record = pretrain.pretrained_arrays(cfg)
    assert record["normalization"] == mode
    fresh = get_arrays(new_classifier(cfg, len(cfg.labels)))
    assert [a.shape for a in arrays] == [a.shape for a in fresh]
    assert all(a.dtype == np.float32 for a in arrays)
    assert not all(np.array_equal(a, b) for a, b in zip(arrays, fresh, strict=True))
    assert record["num_speakers"] == 3 and record["num_utterances"] == 3 * 7
    assert record["classes_matched"] == list(cfg.labels) and record["classes_missing"] == []
    assert record["cache_hit"] is False and "seed=2147483587" in record["corpus"]
    uar = public_uar(cfg, arrays)
    assert uar > 0.5 > 1 / len(cfg.labels)  # chance is 1/7
    assert uar == pytest.approx(record["train_uar"])


def test_second_call_hits_the_cache_and_a_damaged_cache_is_rebuilt(where, monkeypatch, caplog):
    cfg = make_config(where, *TINY)
    first, _ = pretrain.pretrained_arrays(cfg)  # built by the test above, or now
    path = where / "cache" / "pretrained" / f"{pretrain.cache_key(cfg, pretrain.public_corpus(cfg))}.npz"
    assert path.is_file()
    real_train = pretrain._train
    monkeypatch.setattr(pretrain, "_train", lambda *a, **k: pytest.fail("pre-trained again despite the cache"))
    again, record = pretrain.pretrained_arrays(cfg)
    assert record["cache_hit"] is True
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert pretrain.resumed_record(cfg) == {**{k: v for k, v in record.items() if k not in ("cache_hit", "seconds")},
                                            "resumed": True}
    other = make_config(where, *TINY, "pretrain.lr=0.02")  # another setting: another cache entry
    assert pretrain.cache_key(other, pretrain.public_corpus(other)) != path.stem
    path.write_bytes(b"not an npz")
    monkeypatch.setattr(pretrain, "_train", real_train)
    rebuilt, record = pretrain.pretrained_arrays(cfg)
    assert record["cache_hit"] is False and "damaged" in caplog.text
    assert [a.shape for a in rebuilt] == [a.shape for a in first]
    with np.load(path, allow_pickle=False) as blob:  # rewritten, and readable without pickle
        assert len([k for k in blob.files if k.startswith("p")]) == len(first)


def test_labels_are_matched_by_name_and_missing_classes_keep_their_fresh_rows(where):
    # The public corpus lacks 4 of the experiment's 7 emotions, has one it lacks (calm), and lists them in another
    # order than the experiment: the classes must line up by name, in the experiment's order.
    cfg = make_config(where, *TINY, "pretrain.corpus.emotions=[sadness,calm,neutral,anger]",
                      "pretrain.corpus.utterances_per_emotion=2")
    labels = list(cfg.labels)
    assert labels == ["anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral"]
    arrays, record = pretrain.pretrained_arrays(cfg)
    assert record["classes_matched"] == ["anger", "sadness", "neutral"]
    assert record["classes_missing"] == ["boredom", "disgust", "fear", "happiness"]
    assert record["emotions_left_out"] == ["calm"]
    assert record["num_utterances"] == 3 * 3 * 2
    fresh = get_arrays(new_classifier(cfg, len(labels)))
    weight, bias = arrays[-2], arrays[-1]  # the output layer
    assert weight.shape[0] == bias.shape[0] == len(labels)
    missing = [labels.index(e) for e in record["classes_missing"]]
    matched = [labels.index(e) for e in record["classes_matched"]]
    assert np.array_equal(weight[missing], fresh[-2][missing]) and np.array_equal(bias[missing], fresh[-1][missing])
    assert all(not np.array_equal(weight[i], fresh[-2][i]) for i in matched)
    assert public_uar(cfg, arrays) > 0.6  # chance over the 3 classes present is 1/3: labels mapped by name


def test_pretraining_on_the_experiments_own_corpus_is_refused(where):
    with pytest.raises(ConfigError, match=r"experiment's own corpus.*seed=0.*pretrain=none"):
        make_config(where, *TINY, "pretrain.corpus.seed=0")  # the experiment's data.seed is ${seed} = 0
    assert make_config(where, *TINY, "pretrain.corpus.seed=1").pretrain.corpus.seed == 1
    with pytest.raises(ConfigError, match=r"pretrain=emodb pretrain\.corpus\.root="):
        make_config(where, *EXPERIMENT, "pretrain=emodb")


def test_a_public_corpus_sharing_recordings_with_the_private_one_is_refused(tmp_path):
    root = tmp_path / "emodb"
    files = [tone(root / "wav" / f"{spk}a01{code}a.wav") for spk in ("03", "08", "09") for code in "WNT"]
    listing = tmp_path / "lists" / "public.csv"
    listing.parent.mkdir()
    listing.write_text("path,speaker,emotion\n" + "".join(f"{f},{f.name[:2]},anger\n" for f in files[:2]))
    emodb = {"_target_": "fl_ser.data.loaders.EmoDB", "root": str(root), "emotions": None}
    cfg = OmegaConf.create({"data": emodb, "labels": ["anger", "sadness", "neutral"], "pretrain": {
        "name": "manifest", "epochs": 1, "lr": 0.1, "batch_size": 8, "corpus": {
            "_target_": "fl_ser.data.loaders.Manifest", "manifest": str(listing), "root": str(root)}}})
    corpus = corpus_from_config(cfg)
    with pytest.raises(pretrain.PretrainError, match="shares 2 recordings"):
        pretrain.check(cfg, corpus)
    cfg.pretrain.corpus = {**emodb, "root": f"{tmp_path}/lists/../emodb/"}  # the same folder, spelled otherwise
    with pytest.raises(pretrain.PretrainError, match="experiment's own corpus"):
        pretrain.check(cfg, corpus)


def test_no_pretraining_by_default_nor_in_configs_from_before_it():
    cfg = OmegaConf.create({"pretrain": {"name": "none", "corpus": None}, "labels": ["anger"]})
    assert pretrain.pretrained_arrays(cfg) is None and pretrain.resumed_record(cfg) is None
    pretrain.check(cfg, corpus=None)
    assert pretrain.pretrained_arrays(OmegaConf.create({"labels": ["anger"]})) is None
