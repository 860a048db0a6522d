"""clients.validate --store: the stored model is loaded in the chosen runtime and run on a test signal; its output
must be one probability per label summing to 1. Under onnxruntime this needs no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clients import validate
from clients.model_store import FILES, ModelStore
from fl_ser.models.runtimes import probe_signal
from tests.conftest import REPO, make_config

LABELS_OF_RELEASE = 7  # conf's default label set


@pytest.fixture(scope="module")
def released(tmp_path_factory, one_torch_thread) -> tuple[ModelStore, np.ndarray]:
    """A device's store holding a real release (functionals + linear) in ONNX and TorchScript (no .pt2), and the
    eager model's probabilities for the test signal."""
    import torch

    from fl_ser.privacy.normalization import from_config
    from fl_ser.task import get_arrays, new_classifier, pipeline
    from server.release import release_model

    tmp = tmp_path_factory.mktemp("validate-model")
    cfg = make_config(tmp, "features=functionals", "model=linear", "release.formats=[onnx,torchscript]")
    classifier, normalizer = new_classifier(cfg, len(cfg.labels)), from_config(cfg).published()
    release_model(cfg, get_arrays(classifier), normalizer, tmp / "release")
    files = {name: (tmp / "release" / name).read_bytes() for name in FILES if (tmp / "release" / name).exists()}
    store = ModelStore(tmp / "store")
    store.add(files, list(cfg.labels), {"round": 2, "config_hash": "h"})
    with torch.inference_mode():
        expected = pipeline(cfg, classifier, normalizer, list(cfg.labels)).eval()(
            torch.from_numpy(probe_signal(validate.PROBE_SECONDS))[None])[0].numpy()
    return store, expected


@pytest.fixture
def store(released) -> ModelStore:
    return released[0]


def _onnx_model(outputs: int, scale: float) -> bytes:
    """A small ONNX model (B, samples) -> (B, outputs): ``scale`` times a softmax of the first samples."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Constant", [], ["starts"], value=helper.make_tensor("s", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["ends"], value=helper.make_tensor("e", TensorProto.INT64, [1], [outputs])),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
        helper.make_node("Constant", [], ["scale"], value=helper.make_tensor("k", TensorProto.FLOAT, [], [scale])),
        helper.make_node("Slice", ["wave", "starts", "ends", "axes"], ["head"]),
        helper.make_node("Softmax", ["head"], ["soft"], axis=1),
        helper.make_node("Mul", ["soft", "scale"], ["probabilities"]),
    ]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("wave", TensorProto.FLOAT, ["B", "T"])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["B", outputs])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _store_of(tmp_path: Path, onnx_bytes: bytes, labels: list[str]) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    store.add({"emotion_model.pt": b"unused here", "emotion_model.onnx": onnx_bytes}, labels,
              {"round": 1, "config_hash": "h"})
    return store


def test_the_stored_model_runs_under_the_best_runtime_and_gives_a_distribution(released, capsys):
    store, expected = released
    report = validate.validate_model(store.root)
    assert report.ok, report.errors
    assert (report.version, report.runtime, report.file) == (1, "onnxruntime", "emotion_model.onnx")
    assert report.output_shape == [1, LABELS_OF_RELEASE] and abs(report.probability_sum - 1) < 1e-5
    assert report.top == report.labels[int(np.argmax(expected))]
    assert validate.main(["--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "emotion_model.onnx under onnxruntime: output (1, 7) for a 3 s test signal, probabilities sum to 1.0000" \
        in out and out.strip().endswith("OK: 0 error(s)")


def test_each_runtime_is_checked_as_chosen_and_a_missing_format_is_an_error(store, capsys):
    scripted = validate.validate_model(store.root, runtime="torchscript")
    assert scripted.ok and scripted.file == "emotion_model.pt" and scripted.top == validate.validate_model(
        store.root).top
    assert validate.main(["--store", str(store.root), "--runtime", "torch", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["model"]["output_shape"] is None
    assert "has no emotion_model.pt2 for --runtime torch" in report["model"]["errors"][0]
    assert "Fix: use --runtime onnxruntime or torchscript" in report["model"]["errors"][0]
    assert "export_mobile" in validate.validate_model(store.root, runtime="executorch").errors[0]  # how to make one


def test_a_folder_and_a_store_are_checked_together(store, tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert validate.main([str(folder), "--store", str(store.root), "--json"]) == 1  # the folder has no labels.csv
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["ok"] and not report["ok"] and report["errors"]
    for bad, match in ((["--runtime", "onnxruntime", str(folder)], "give --store STORE_DIR too"),
                       ([], "give a participant folder")):
        with pytest.raises(SystemExit):
            validate.main(bad)
        assert match in capsys.readouterr().err


def test_a_damaged_or_wrong_model_is_an_error_naming_the_fix(store, tmp_path):
    assert "does not exist: no model has been stored yet" in validate.validate_model(tmp_path / "none").errors[0]
    assert "has no version 9" in validate.validate_model(store.root, version=9).errors[0]
    wrong = validate.validate_model(_store_of(tmp_path / "a", _onnx_model(3, 1.0), ["x", "y"]).root)
    assert wrong.output_shape == [1, 3] and "gave shape (1, 3) for one waveform" in wrong.errors[0]
    halves = validate.validate_model(_store_of(tmp_path / "b", _onnx_model(2, 0.5), ["x", "y"]).root)
    assert halves.output_shape == [1, 2] and abs(halves.probability_sum - 0.5) < 1e-6
    assert "are not a distribution (sum 0.500000" in halves.errors[0]
    garbage = _store_of(tmp_path / "c", b"not an onnx model", ["x", "y"])
    (error,) = validate.validate_model(garbage.root).errors
    assert "emotion_model.onnx does not load or run under onnxruntime" in error and "Fix:" in error
    stored = store.latest()
    copy = ModelStore(tmp_path / "d")
    copy.add({name: store.read(stored, name) for name in stored.digests}, stored.labels, {"round": 2,
                                                                                         "config_hash": "h"})
    onnx_file = copy.latest().path / "emotion_model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\0")
    assert "is corrupt: its sha256 is" in validate.validate_model(copy.root).errors[0]


def test_the_check_runs_without_torch_under_onnxruntime(store):
    """As on a device with only the device extra: torch (and Hydra) cannot be imported at all."""
    code = (
        "import sys, json\n"
        "for name in ('torch', 'torchaudio', 'hydra', 'omegaconf', 'tenseal', 'flwr', 'opacus'):\n"
        "    sys.modules[name] = None  # import of any of them now raises ImportError\n"
        "from clients import validate\n"
        f"ok = validate.main(['--store', {str(store.root)!r}, '--json'])\n"
        f"torch = validate.main(['--store', {str(store.root)!r}, '--runtime', 'torchscript', '--json'])\n"
        "print('exit', ok, torch)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # see DEVELOPERS.md: Ray's PYTHONPATH
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    decoder, text = json.JSONDecoder(), done.stdout
    first, end = decoder.raw_decode(text)
    second, end2 = decoder.raw_decode(text, end + 1)
    status = text[end2:]
    report = first["model"]
    assert report["ok"] and report["runtime"] == "onnxruntime" and report["output_shape"] == [1, LABELS_OF_RELEASE]
    np.testing.assert_allclose(report["probability_sum"], 1.0, atol=1e-5)
    assert "runtime torchscript needs the Python package torch" in second["model"]["errors"][0]
    assert status.split() == ["exit", "0", "1"]
