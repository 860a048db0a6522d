"""Device-side tools: the participant folder, its validation, the model store, prediction and personalisation."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from clients import model_store, personalise, predict, validate
from clients.model_store import ModelStore, StoreError
from fl_ser.data.corpus import SAMPLE_RATE, CorpusError
from fl_ser.data.loaders import DeviceFolder
from fl_ser.data.synthetic import SyntheticCorpus
from fl_ser.features import FeatureNormalizer
from fl_ser.metrics import classification_report
from fl_ser.models import MLP
from fl_ser.task import extract, extractor_from_config, get_arrays, new_classifier
from fl_ser.training import LocalTrainConfig, train_local
from server.release import release_model
from tests.conftest import ALL_FORMATS, make_config

LABELS = ["anger", "happiness", "sadness", "neutral"]
ALIASES = {"anger": "Angry", "happiness": "happy", "sadness": "SAD", "neutral": "neutral"}  # as people write them
TAKES = 6  # per emotion: 24 utterances, above validate's default minimum of 20
META = {"round": 20, "config_hash": "abc123", "run_id": 7}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return SyntheticCorpus(num_speakers=5, utterances_per_emotion=TAKES, emotions=LABELS, seed=1)


@pytest.fixture(scope="module")
def release(corpus, tmp_path_factory) -> dict[str, bytes]:
    """A global model as the server releases it (server.release: every format and its config), trained on 4
    speakers, each standardised with its own statistics: file name -> bytes."""
    cfg = make_config(tmp_path_factory.mktemp("config"), "features=functionals", "model=mlp", ALL_FORMATS)
    cfg.labels = LABELS
    extractor = extractor_from_config(cfg)
    raw, normed, targets = [], [], []
    for speaker in corpus.speakers[:4]:
        utts, waves, _ = corpus.load_speaker(speaker)
        x = extract(extractor, waves)
        raw.append(x)
        normed.append(FeatureNormalizer((74,), "vector").fit(x)(x))
        targets.append(torch.tensor([corpus.label_of(u) for u in utts]))
    classifier = new_classifier(cfg, len(LABELS))
    train_local(classifier, torch.cat(normed), torch.cat(targets), LocalTrainConfig(epochs=150, lr=0.1))
    pooled = FeatureNormalizer((74,), "vector").fit(torch.cat(raw))
    folder = tmp_path_factory.mktemp("release") / "release"
    release_model(cfg, get_arrays(classifier), pooled, folder)
    return {name: (folder / name).read_bytes() for name in model_store.FILES if (folder / name).exists()}


@pytest.fixture(scope="module")
def recordings(corpus, tmp_path_factory) -> Path:
    """The fifth speaker's recordings as a participant folder: WAVs in a subfolder, labels.csv with aliases."""
    folder = tmp_path_factory.mktemp("template") / "alice"
    (folder / "takes").mkdir(parents=True)
    utts, waves, _ = corpus.load_speaker(corpus.speakers[4])
    rows = ["file,emotion"]
    for utt, wave in zip(utts, waves, strict=True):
        sf.write(folder / "takes" / f"{utt.uid}.wav", wave, SAMPLE_RATE)
        rows.append(f"takes/{utt.uid}.wav,{ALIASES[utt.emotion]}")
    _write_rows(folder, rows)
    return folder


@pytest.fixture
def participant(recordings, tmp_path) -> Path:
    """A fresh copy of the participant folder, free to damage."""
    return Path(shutil.copytree(recordings, tmp_path / "alice"))


@pytest.fixture
def store(release, tmp_path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    store.add(release, LABELS, META)
    return store


def _rows(folder: Path) -> list[str]:
    return (folder / "labels.csv").read_text().splitlines()


def _write_rows(folder: Path, rows: list[str]) -> None:
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")


# -- the participant folder ---------------------------------------------------------------------
def test_device_folder_reads_one_speakers_labelled_recordings(participant):
    corpus = DeviceFolder(participant)
    assert corpus.speakers == ["alice"]
    assert corpus.emotions == ("anger", "happiness", "sadness", "neutral")  # aliases normalised
    assert len(corpus.utterances) == 4 * TAKES
    first = corpus.utterances[0]
    assert first.uid.startswith("takes/") and Path(first.source) == participant / first.uid
    _, waves, report = corpus.load_speaker("alice")
    assert report.loaded == 4 * TAKES and not report.num_skipped and all(w.dtype == np.float32 for w in waves)
    # the experiment's label set fixes the class order, even with an emotion this participant never recorded
    named = DeviceFolder(participant, speaker="p07", emotions=["neutral", "fear", "anger"])
    assert named.speakers == ["p07"] and named.emotions == ("neutral", "fear", "anger")
    assert {named.label_of(u) for u in named.utterances} == {0, 2} and len(named.utterances) == 2 * TAKES


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda f, rows: (f / "labels.csv").unlink(), r"has no labels\.csv.*Fix: add labels\.csv"),
        (lambda f, rows: _write_rows(f, ["path,label", "a.wav,anger"]), r"lacks required column\(s\) \['file'"),
        (lambda f, rows: _write_rows(f, [*rows[:3], "takes/x.wav,grumpy"]), r"line 4: unknown emotion 'grumpy'"),
        (lambda f, rows: _write_rows(f, [*rows, rows[2]]), r"line 26: takes/\S+ is listed again \(first on line 3\)"),
        (lambda f, rows: _write_rows(f, [*rows[:2], "../elsewhere.wav,anger"]), r"line 3: .*outside the folder"),
        (lambda f, rows: _write_rows(f, [rows[0]]), r"lists no utterances"),
    ],
)
def test_device_folder_errors_name_the_line_and_the_fix(participant, damage, match):
    damage(participant, _rows(participant))
    with pytest.raises(CorpusError, match=match):
        DeviceFolder(participant)


# -- validation ---------------------------------------------------------------------------------
def test_validate_accepts_a_good_folder(participant, capsys):
    report = validate.validate_folder(participant, labels=LABELS)
    assert report.ok and report.errors == [] and report.warnings == []
    assert report.counts == dict.fromkeys(LABELS, TAKES)
    assert len(report.durations) == 4 * TAKES and all(1.0 < d < 4.0 for d in report.durations.values())
    assert set(report.sample_rates.values()) == {SAMPLE_RATE}
    assert validate.main([str(participant), "--labels", "anger,happy,sad,neutral"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OK: 0 error(s), 0 warning(s); 24 usable")


def _silent(folder: Path, rows: list[str]) -> None:
    sf.write(folder / rows[1].split(",")[0], np.zeros(SAMPLE_RATE), SAMPLE_RATE)


def _garbage(folder: Path, rows: list[str]) -> None:
    (folder / rows[2].split(",")[0]).write_bytes(b"not a RIFF file" * 20)


def _narrowband(folder: Path, rows: list[str]) -> None:
    path = folder / rows[3].split(",")[0]
    wave, rate = sf.read(path)
    sf.write(path, wave[::2], rate // 2)


@pytest.mark.parametrize(
    "damage,kwargs,match,skipped",
    [
        (lambda f, rows: (f / "labels.csv").unlink(), {}, r"labels\.csv: .*has no labels\.csv", None),
        (lambda f, rows: _write_rows(f, [*rows[:5], "takes/x.wav,grumpy", *rows[5:]]), {}, r"line 6: unknown emotion",
         None),
        (_garbage, {}, r"line 3 \(takes/\S+\): unreadable audio", "unreadable"),
        (_silent, {}, r"line 2 \(takes/\S+\): silent audio", "silent"),
        (lambda f, rows: (f / rows[4].split(",")[0]).unlink(), {}, r"line 5 \(takes/\S+\): missing audio \(no such",
         "missing"),
        (_narrowband, {}, r"line 4 \(takes/\S+\): low sample rate audio \(recorded at 8000 Hz, below the 16000 Hz",
         "low sample rate"),
        (lambda f, rows: _write_rows(f, [*rows, rows[1]]), {}, r"line 26: takes/\S+ is listed again", None),
        (lambda f, rows: None, {"min_utterances": 30}, r"24 usable utterances, fewer than the 30 needed", None),
        (lambda f, rows: None, {"min_per_emotion": 7}, r"only 6 usable 'anger' utterance\(s\), fewer than 7", None),
        (lambda f, rows: None, {"labels": LABELS[:3]}, r"emotion 'neutral' is not in the experiment's label set", None),
    ],
)
def test_validate_reports_each_problem_with_its_line(participant, damage, kwargs, match, skipped):
    damage(participant, _rows(participant))
    report = validate.validate_folder(participant, **kwargs)
    assert not report.ok
    assert any(re.search(match, str(p)) for p in report.errors), [str(p) for p in report.errors]
    # a refused file is counted under the reason the loaders use
    assert {reason: len(uids) for reason, uids in report.audio.skipped.items()} == ({skipped: 1} if skipped else {})


def test_validate_warns_about_unlisted_resampled_and_duplicate_audio(participant):
    rows = _rows(participant)
    shutil.copy(participant / rows[1].split(",")[0], participant / "extra.wav")  # unlisted, same audio as row 2
    high = participant / rows[2].split(",")[0]
    wave, _ = sf.read(high)
    sf.write(high, np.interp(np.arange(0, len(wave), 16 / 22.05), np.arange(len(wave)), wave), 22050)  # upsampled
    report = validate.validate_folder(participant)
    assert report.ok  # warnings only
    messages = [str(w) for w in report.warnings]
    assert any(m.startswith("extra.wav: not listed in labels.csv") for m in messages), messages
    assert any("recorded at 22050 Hz; will be resampled to 16000 Hz" in m for m in messages), messages
    assert report.sample_rates[rows[2].split(",")[0]] == 22050
    _write_rows(participant, [*rows, "extra.wav,anger"])
    report = validate.validate_folder(participant)
    assert any("same audio as labels.csv line 2" in str(w) for w in report.warnings)


def test_validate_cli_json_and_exit_statuses(participant, capsys):
    (participant / "labels.csv").write_text("file,emotion\ntakes/nope.wav,anger\n")
    assert validate.main([str(participant), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["counts"] == {}
    assert {e["where"] for e in out["errors"]} == {"labels.csv line 2 (takes/nope.wav)", str(participant)}
    assert out["audio"] == {"loaded": 0, "skipped": {"missing": ["takes/nope.wav"]}, "noted": {}}
    bad_usage = (["--labels", "anger,grumpy", str(participant)], [], [str(participant), "--min-utterances", "x"],
                 [str(participant), "--long-files", "trim"], [str(participant), "--max-seconds", "0.1"])
    for bad in bad_usage:
        with pytest.raises(SystemExit) as stop:
            validate.main(bad)
        assert stop.value.code == 2
    assert validate.main([str(participant / "nowhere")]) == 1


# -- the model store ----------------------------------------------------------------------------
def test_store_keeps_versions_and_loads_the_latest(release, tmp_path):
    store = ModelStore(tmp_path / "store")
    first = store.add(release, LABELS, META)
    second = store.add(release, LABELS, {**META, "round": 21, "uar": 0.5})
    assert store.versions() == [1, 2] and sorted(p.name for p in store.root.iterdir()) == ["v0001", "v0002"]
    assert (first.version, second.version, store.latest().version) == (1, 2, 2)
    assert first.path == store.root / "v0001"
    assert all((first.path / name).read_bytes() == data for name, data in release.items())
    meta = json.loads((second.path / "meta.json").read_text())
    assert list(meta)[:6] == ["version", "round", "config_hash", "created", "files", "sha256"]
    assert sorted(meta["files"]) == sorted(release) and meta["sha256"] == meta["files"]["emotion_model.pt"]
    assert meta["version"] == 2 and meta["round"] == 21 and meta["uar"] == 0.5 and meta["run_id"] == 7
    assert meta["created"].endswith("+00:00") and len(meta["sha256"]) == 64
    assert json.loads((second.path / "labels.json").read_text()) == LABELS
    model, labels, loaded_meta = store.load()
    assert labels == LABELS and loaded_meta == meta
    probs = model(torch.randn(1, SAMPLE_RATE) * 0.1)
    assert probs.shape == (1, 4) and abs(float(probs.sum()) - 1) < 1e-5
    assert store.load(1)[2]["round"] == 20


def test_store_detects_a_corrupt_artifact(store):
    path = store.latest().artifact
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"v0001/emotion_model\.pt is corrupt: its sha256 is .*Fix"):
        store.load()


def test_store_errors_for_an_empty_store_and_a_missing_version(store, tmp_path):
    with pytest.raises(StoreError, match=r"does not exist: no model has been stored yet\. Fix"):
        ModelStore(tmp_path / "nothing").load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="is empty"):
        ModelStore(tmp_path / "empty").latest()
    with pytest.raises(StoreError, match=r"has no version 5; it has \[1\]"):
        store.load(5)


def test_store_rejects_bad_arguments(store, release):
    with pytest.raises(ValueError, match=r"\['version', 'sha256'\] are filled in by the store"):
        store.add(release, LABELS, {**META, "version": 3, "sha256": "x"})
    with pytest.raises(ValueError, match=r"lacks \['config_hash'\]"):
        store.add(release, LABELS, {"round": 1})
    with pytest.raises(ValueError, match="JSON values"):
        store.add(release, LABELS, {**META, "when": object()})
    with pytest.raises(ValueError, match=r"must include emotion_model\.pt .*empty: \['emotion_model\.pt'\]"):
        store.add({**release, "emotion_model.pt": b""}, LABELS, META)
    with pytest.raises(ValueError, match=r"\['notes\.txt'\] are not release files"):
        store.add({**release, "notes.txt": b"x"}, LABELS, META)
    assert store.versions() == [1]


def test_store_write_is_atomic(store, release, monkeypatch):
    real_write = model_store._write

    def crash_on_meta(path, data):
        if path.name == model_store.META:
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(model_store, "_write", crash_on_meta)
    with pytest.raises(OSError, match="disk full"):
        store.add(release, LABELS, META)
    assert [p.name for p in store.root.iterdir()] == ["v0001"]  # no half version, no staging folder left
    monkeypatch.setattr(model_store, "_write", real_write)
    assert store.add(release, LABELS, META).version == 2


# -- prediction ---------------------------------------------------------------------------------
def _check_predictions(predictions: list[dict]) -> None:
    for p in predictions:
        probs = p["probabilities"]
        assert list(probs) == LABELS and abs(sum(probs.values()) - 1) < 1e-5
        assert p["top"] == max(probs, key=probs.get)


def test_predict_a_file_and_a_folder(store, participant, capsys):
    wav = participant / _rows(participant)[1].split(",")[0]
    assert predict.main(["--store", str(store.root), str(wav), "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert [p["file"] for p in one] == [str(wav)]
    _check_predictions(one)
    assert predict.main(["--store", str(store.root), str(participant), "--json"]) == 0
    many = json.loads(capsys.readouterr().out)
    assert len(many) == 4 * TAKES and wav.relative_to(participant).as_posix() in {p["file"] for p in many}
    _check_predictions(many)
    assert len({p["top"] for p in many}) > 1  # the model does discriminate
    assert predict.main(["--store", str(store.root), str(wav)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model v0001 (round 20)") and lines[1].split() == ["file", "top", *LABELS]
    assert lines[2].split()[:2] == [str(wav), one[0]["top"]] and len(lines) == 3


def test_predict_reports_bad_files_and_goes_on(store, participant, capsys):
    rows = _rows(participant)
    _garbage(participant, rows)
    assert predict.main(["--store", str(store.root), str(participant), "--json"]) == 1
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 4 * TAKES - 1
    bad = rows[2].split(",")[0]
    assert f"error: {bad}: unreadable (" in captured.err
    assert predict.main(["--store", str(store.root / "none"), str(participant)]) == 1
    assert "no model has been stored yet" in capsys.readouterr().err


def test_predict_evaluate_scores_against_the_labels(store, participant, capsys):
    assert predict.main(["--store", str(store.root), "--evaluate", str(participant), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["version"] == 1 and out["speaker"] == "alice" and out["num_utterances"] == 4 * TAKES
    truth = {line.split(",")[0]: line.split(",")[1] for line in _rows(participant)[1:]}
    hits = [ALIASES[p["top"]] == truth[p["file"]] for p in out["predictions"]]
    assert out["accuracy"] == pytest.approx(np.mean(hits))
    assert np.array(out["confusion"]).sum() == 4 * TAKES and np.trace(out["confusion"]) == sum(hits)
    assert predict.main(["--store", str(store.root), "--evaluate", str(participant)]) == 0
    text = capsys.readouterr().out
    assert f"UAR {out['uar']:.3f}" in text and "confusion (rows: true emotion, columns: predicted)" in text
    with pytest.raises(SystemExit) as stop:
        predict.main(["--store", str(store.root), "--evaluate", str(participant / "labels.csv")])
    assert stop.value.code == 2


# -- personalisation ----------------------------------------------------------------------------
def test_stratified_split_holds_out_each_class():
    y = np.array([0] * 10 + [1] * 3 + [2] * 2 + [3])
    adapt, held = personalise.stratified_split(y, 0.3, seed=0)
    assert sorted([*adapt, *held]) == list(range(len(y)))
    assert [int((y[held] == c).sum()) for c in range(4)] == [3, 1, 1, 0]
    assert np.array_equal(held, personalise.stratified_split(y, 0.3, seed=0)[1])
    assert not np.array_equal(held, personalise.stratified_split(y, 0.3, seed=1)[1])


def test_head_inputs_are_what_the_head_sees_and_the_head_must_be_last():
    classifier = MLP([10], 3, hidden=[8]).eval()
    x = torch.randn(5, 10)
    head = personalise.classifier_head(classifier)
    assert head is classifier.net[-1]
    before = head.weight.detach().clone()
    inputs = personalise.head_inputs(classifier, head, x)
    torch.testing.assert_close(inputs, classifier.net[:-1](x).detach())
    assert torch.equal(head.weight, before)
    not_last = torch.nn.Sequential(torch.nn.Linear(10, 3), torch.nn.Tanh())
    with pytest.raises(ValueError, match="not its last step"):
        personalise.head_inputs(not_last, not_last[0], x)


def test_personalise_saves_a_scored_new_version(store, participant, capsys):
    global_model, _, _ = store.load(1)
    assert personalise.main(["--store", str(store.root), str(participant), "--seed", "3", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert store.versions() == [1, 2] and meta["version"] == 2 and meta["personalised_from"] == 1
    assert (meta["round"], meta["config_hash"], meta["run_id"]) == (20, "abc123", 7)
    assert meta["adaptation_size"] + meta["holdout_size"] == 4 * TAKES and meta["holdout_size"] == 4 * 2
    scores = meta["held_out"]
    assert list(scores) == ["global", "device_normaliser", "personalised"]
    assert meta["uar_gain"] == pytest.approx(scores["personalised"]["uar"] - scores["global"]["uar"])
    assert meta["accuracy_gain"] == pytest.approx(scores["personalised"]["accuracy"] - scores["global"]["accuracy"])

    # What was saved is what was scored: redo the split and score the stored personalised model independently.
    model, labels, _ = store.load(2)
    corpus = DeviceFolder(participant, emotions=labels)
    utts, waves, _ = corpus.load_speaker(corpus.speaker)
    x, y = extract(global_model.extractor, waves), np.array([corpus.label_of(u) for u in utts])
    adapt, held = personalise.stratified_split(y, 0.3, seed=3)
    with torch.no_grad():
        pred = model.classifier(model.normalizer(x[held])).argmax(1).numpy()
        torch.testing.assert_close(model.normalizer.mean, x[adapt].mean(0))
    assert classification_report(y[held], pred, labels)["uar"] == pytest.approx(scores["personalised"]["uar"])
    head, global_head = (
        personalise.classifier_head(model.classifier),
        personalise.classifier_head(global_model.classifier),
    )
    assert not torch.equal(head.weight, global_head.weight) and not head.weight.requires_grad
    probs = model(torch.from_numpy(waves[0])[None])
    assert probs.shape == (1, 4) and abs(float(probs.sum()) - 1) < 1e-5

    # A second personalisation starts again from the global model, never from the personalised one.
    assert personalise.main(["--store", str(store.root), str(participant)]) == 0
    assert "personalised model v0003 (from v0001)" in capsys.readouterr().out
    assert store.get(3).meta["personalised_from"] == 1


# -- staying local ------------------------------------------------------------------------------
def python_output(code: str) -> str:
    """What a fresh interpreter of this venv prints running ``code`` in the repository (it must exit 0)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_device_tools_import_no_federation_code_and_the_store_no_torch():
    code = (
        "import sys\n"
        "import clients.model_store\n"
        "assert 'torch' not in sys.modules, 'the store imports torch'\n"
        "import clients.personalise, clients.predict, clients.validate\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'grpc', 'ray', 'requests'}))\n"
    )
    assert python_output(code).strip() == "[]"


def test_the_device_path_imports_where_torch_cannot_be_imported():
    """predict, validate and the store on a device without torch (or Hydra): import them with those blocked."""
    code = (
        "import sys\n"
        "for name in ('torch', 'torchaudio', 'hydra', 'omegaconf', 'tenseal', 'flwr', 'opacus'):\n"
        "    sys.modules[name] = None  # import of any of them now raises ImportError\n"
        "import clients.model_store, clients.predict, clients.validate, fl_ser.models.runtimes\n"
        "from fl_ser.models.runtimes import installed\n"
        "print(installed('onnxruntime'), installed('torch'))\n"
    )
    assert python_output(code).split() == ["True", "False"]  # a torch that cannot be imported counts as absent


def test_adapted_version_standardises_with_the_devices_own_statistics(store, participant):
    released, labels, _ = store.load(1)
    corpus = DeviceFolder(participant, emotions=labels)
    _, waves, _ = corpus.load_speaker(corpus.speaker)
    x = extract(released.extractor, waves)
    stored = personalise.adapt_normaliser(store, 1, x)
    assert store.versions() == [1, 2] and stored.meta["adapted_from"] == 1
    assert (stored.meta["round"], stored.meta["config_hash"]) == (20, "abc123")
    adapted, _, _ = store.load(2)
    with torch.no_grad():
        torch.testing.assert_close(adapted.normalizer.mean, x.mean(0))
        torch.testing.assert_close(adapted.classifier(torch.zeros(1, 74)), released.classifier(torch.zeros(1, 74)))
        assert not torch.equal(adapted.normalizer.mean, released.normalizer.mean)  # the release itself is kept


def test_a_release_config_naming_foreign_code_is_refused_before_anything_is_built(release, store, tmp_path):
    """The release's config.yaml comes from the server; Hydra would call any _target_ it names on the device."""
    import yaml

    from fl_ser.protocol import RELEASE_CONFIG_FILE, RELEASE_TARGETS

    repo = Path(__file__).parents[1]
    shipped = {yaml.safe_load(p.read_text())["_target_"] for group in ("features", "model")
               for p in (repo / "conf" / group).glob("*.yaml")}
    assert shipped <= RELEASE_TARGETS  # every extractor and classifier fl-ser ships can be personalised
    assert personalise.eager_model(store, 1)[1] == LABELS  # an honest release is rebuilt
    forged = yaml.safe_load(release[RELEASE_CONFIG_FILE])
    forged["features"] = {"_target_": "os.system", "command": f"touch {tmp_path / 'pwned'}"}
    store.add({**release, RELEASE_CONFIG_FILE: yaml.safe_dump(forged).encode()}, LABELS, META)
    with pytest.raises(StoreError, match=r"names \['os.system'\].*builds nothing else"):
        personalise.eager_model(store, 2)
    assert not (tmp_path / "pwned").exists()
