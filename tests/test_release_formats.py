"""Release formats: ONNX, torch.export and TorchScript each compute the eager model, on real EmoDB audio of two
lengths; the store records each file's sha256; the device picks a runtime (or is told clearly why it cannot);
a version stored before these formats still loads and predicts."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clients import personalise, predict
from clients.model_store import ModelStore, StoredModel, StoreError
from experiments.bench.release_profile import EMODB_FILES
from experiments.bench.release_profile import emodb_waves as real_waves
from fl_ser.models import export
from fl_ser.models.runtimes import RuntimeMissing
from fl_ser.privacy.normalization import from_config
from fl_ser.protocol import MODEL_FILES
from fl_ser.task import get_arrays, new_classifier, pipeline
from server.release import release_model
from tests.conftest import ALL_FORMATS, EMODB, make_config, needs_emodb

#: Feature extractor and model of each release checked; the device tools' tests cover model=mlp.
COMBINATIONS = [("functionals", "linear"), ("logmel", "cnn"), ("mfcc", "cnn")]


@pytest.fixture(scope="module")
def emodb_waves() -> list[np.ndarray]:
    """Two EmoDB utterances as they are (2.0 s), joined (4.0 s: longer than logmel's 3 s window, which then crops
    instead of tiling) and cut to 1.3 s."""
    if not EMODB.exists():
        pytest.skip(f"EmoDB not found at {EMODB}")
    return real_waves(EMODB)


@pytest.fixture(scope="module", params=COMBINATIONS, ids=lambda c: "-".join(c))
def released(request, emodb_waves, tmp_path_factory, one_torch_thread):
    """A release of an untrained model (seeded initial weights, public normaliser) checked on EmoDB; its pipeline."""
    features, model = request.param
    tmp = tmp_path_factory.mktemp(f"{features}-{model}")
    cfg = make_config(tmp, f"features={features}", f"model={model}", ALL_FORMATS)
    classifier = new_classifier(cfg, len(cfg.labels))
    normalizer = from_config(cfg).published()
    result = release_model(cfg, get_arrays(classifier), normalizer, tmp / "release", waves=emodb_waves)
    pipe = pipeline(cfg, classifier, normalizer, list(cfg.labels)).eval()
    return request.param, result, tmp / "release", pipe


@needs_emodb
@pytest.mark.parametrize("fmt", export.FORMATS)
def test_each_format_computes_the_eager_model_on_real_audio_of_two_lengths(released, fmt, emodb_waves):
    _, result, folder, pipe = released
    assert fmt in result["max_difference"], result["unavailable"].get(fmt)
    assert result["max_difference"][fmt] <= export.ATOL
    classify = predict.CLASSIFIERS[export.RUNTIME_OF[fmt]]((folder / MODEL_FILES[fmt]).read_bytes(), pipe.labels)
    for wave in emodb_waves:  # as the device runs it: one waveform of its own length at a time
        with torch.no_grad():
            want = pipe(torch.from_numpy(wave)[None])[0].numpy()
        np.testing.assert_allclose(classify(wave), want, atol=export.ATOL, rtol=0)


@needs_emodb
def test_the_release_folder_holds_labels_config_and_every_format(released):
    _, result, folder, pipe = released
    names = {p.name for p in folder.iterdir()}
    assert names == {"labels.json", "config.yaml", *(MODEL_FILES[f] for f in export.FORMATS)}, result["unavailable"]
    assert set(result["bytes"]) == names and not result["unavailable"]
    assert json.loads((folder / "labels.json").read_text()) == pipe.labels
    assert not list(folder.parent.glob(".tmp-*"))  # nothing staged is left behind


def test_onnx_runs_the_portable_graph_and_no_file_carries_build_notes(released):
    """ONNX holds the portable graph (no DFT or STFT op: ONNX Runtime's are ~20x slower than its matmuls) and the
    .pt2 torch's (its FFT); neither keeps the exporters' per-node source notes (the build machine's paths)."""
    import onnx

    _, _, folder, _ = released
    model = onnx.load(str(folder / MODEL_FILES["onnx"]))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"DFT", "STFT"} and "MatMul" in ops
    assert not any(node.metadata_props for node in model.graph.node)
    program = torch.export.load(str(folder / MODEL_FILES["pt2"]))
    assert any("fft" in str(node.target) for node in program.graph.nodes)
    assert not any(node.meta.get("stack_trace") for node in program.graph.nodes)
    assert str(Path.cwd()) not in (folder / MODEL_FILES["onnx"]).read_bytes().decode("latin-1")


def test_probe_signals_are_deterministic_and_of_two_lengths():
    batches = export.probes([np.zeros(8000, np.float32)])
    assert [b.shape for b in batches] == [(1, 40000), (1, 65600), (2, 40000), (1, 8000)]
    assert np.array_equal(batches[0], export.probes()[0]) and 0.1 < np.abs(batches[0]).max() < 1


def test_a_format_that_disagrees_is_an_error_naming_it_and_nothing_is_written(monkeypatch, tmp_path):
    cfg = make_config(tmp_path, "features=functionals", "model=linear", ALL_FORMATS)
    opened = export.open_model

    def off_by_a_little(runtime, data):
        run = opened(runtime, data)
        return lambda wave: run(wave) + 2e-3

    monkeypatch.setattr(export, "open_model", off_by_a_little)
    arrays = get_arrays(new_classifier(cfg, len(cfg.labels)))
    with pytest.raises(export.ParityError, match=r"(onnx|pt2|torchscript) \(emotion_model\.\w+\) differs .* by 0\.002"):
        release_model(cfg, arrays, from_config(cfg).published(), tmp_path / "release")
    assert not (tmp_path / "release").exists() and not list(tmp_path.glob(".tmp-*"))


class LengthBranch(torch.nn.Module):
    """An extractor whose Python code branches on the input length: no dynamic time axis can be traced."""

    output_shape, kind = (1,), "vector"

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.shape[1] > 48000:  # what fix_length did before it became one gather
            wave = wave[:, :48000]
        return wave.abs().mean(1, keepdim=True)


def test_a_model_that_cannot_keep_the_time_axis_dynamic_is_released_in_torchscript_only(tmp_path):
    from fl_ser.features import FeatureNormalizer
    from fl_ser.models import MLP, EmotionPipeline

    pipe = EmotionPipeline(LengthBranch(), FeatureNormalizer((1,), "vector"), MLP([1], 2), ["a", "b"]).eval()
    exported = export.export_formats(pipe, tmp_path)
    assert list(exported.files) == ["torchscript"] and sorted(exported.unavailable) == ["onnx", "pt2"]
    for reason in exported.unavailable.values():
        assert "cannot trace LengthBranch with a dynamic time axis" in reason and "Fix:" in reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emotion_model.pt"]


# -- the device's store and runtime choice ---------------------------------------------------------------------
def _stored(tmp_path: Path, *names: str) -> StoredModel:
    meta = {"version": 1, "files": {name: "0" * 64 for name in names}}
    return StoredModel(tmp_path / "v0001", 1, ["anger", "neutral"], meta)


def test_the_best_runtime_present_is_chosen(tmp_path, monkeypatch):
    every = _stored(tmp_path, *MODEL_FILES.values())
    assert predict.choose_runtime(every) == "onnxruntime"
    assert predict.choose_runtime(_stored(tmp_path, "emotion_model.pt2", "emotion_model.pt")) == "torch"
    assert predict.choose_runtime(_stored(tmp_path, "emotion_model.pt")) == "torchscript"
    assert predict.choose_runtime(every, "torchscript") == "torchscript"
    monkeypatch.setattr(predict, "installed", lambda runtime: runtime != "onnxruntime")
    assert predict.choose_runtime(every) == "torch"  # onnxruntime not installed: the next one


def test_a_runtime_or_format_that_is_missing_is_a_clear_error(tmp_path, monkeypatch):
    old = _stored(tmp_path, "emotion_model.pt")
    with pytest.raises(StoreError, match=r"has no emotion_model\.onnx for --runtime onnxruntime .*Fix: use --runtime "
                                         r"torchscript"):
        predict.choose_runtime(old, "onnxruntime")
    monkeypatch.setattr("fl_ser.models.runtimes.installed", lambda runtime: False)
    monkeypatch.setattr(predict, "installed", lambda runtime: False)
    with pytest.raises(RuntimeMissing, match=r"needs the Python package onnxruntime, .*Fix: pip install onnxruntime"):
        predict.choose_runtime(_stored(tmp_path, "emotion_model.onnx"), "onnxruntime")
    with pytest.raises(RuntimeMissing, match=r"no runtime installed here can run model v0001 .*Fix: pip install"):
        predict.choose_runtime(old)


@needs_emodb
def test_every_file_is_stored_with_its_sha256_and_checked_when_read(released, tmp_path):
    _, _, folder, pipe = released
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "labels.json"}
    store = ModelStore(tmp_path / "store")
    stored = store.add(files, pipe.labels, {"round": 3, "config_hash": "h"})
    digests = json.loads((stored.path / "meta.json").read_text())["files"]
    assert sorted(digests) == sorted(files) and stored.meta["sha256"] == digests["emotion_model.pt"]
    for name in files:
        assert store.read(stored, name) == files[name]
        (stored.path / name).write_bytes(files[name][:-1] + bytes([files[name][-1] ^ 1]))
        with pytest.raises(StoreError, match=rf"{name} is corrupt: its sha256 is"):
            store.read(stored, name)


@needs_emodb
def test_a_version_stored_before_these_formats_still_loads_and_predicts(released, tmp_path, emodb_waves, capsys):
    """The store's old layout: emotion_model.pt, labels.json, and meta.json with that file's sha256 only."""
    (features, _), _, folder, pipe = released
    if features != "functionals":
        pytest.skip("one old layout suffices")
    version = tmp_path / "store" / "v0001"
    version.mkdir(parents=True)
    shutil.copy(folder / "emotion_model.pt", version)
    (version / "labels.json").write_text(json.dumps(pipe.labels))
    sha = hashlib.sha256((folder / "emotion_model.pt").read_bytes()).hexdigest()
    meta = {"version": 1, "round": 5, "config_hash": "old", "created": "2026-11-01T00:00:00+00:00", "sha256": sha}
    (version / "meta.json").write_text(json.dumps(meta))
    store = ModelStore(tmp_path / "store")
    assert store.latest().formats == ["torchscript"]
    assert store.load()[1] == pipe.labels
    wav = EMODB / "wav" / EMODB_FILES[0]
    assert predict.main(["--store", str(store.root), str(wav), "--json"]) == 0
    (got,) = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        want = pipe(torch.from_numpy(emodb_waves[0])[None])[0].numpy()
    np.testing.assert_allclose(list(got["probabilities"].values()), want, atol=export.ATOL, rtol=0)
    assert predict.main(["--store", str(store.root), str(wav), "--runtime", "onnxruntime"]) == 1
    assert "has no emotion_model.onnx for --runtime onnxruntime" in capsys.readouterr().err
    with pytest.raises(StoreError, match=r"holds no config\.yaml \(it was stored before .*Fix"):
        personalise.personalise(store, tmp_path)  # it cannot rebuild the eager model to export
