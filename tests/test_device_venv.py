"""A device without torch: a fresh venv with only the ``device`` extra (numpy, soundfile, onnxruntime, soxr) and
fl-ser installed with ``--no-deps`` checks a participant folder and predicts with a stored release.

Slow (a venv and four wheels; pip's cache makes a rerun take ~30 s). Needs the package registry, as the install
of the project does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from clients.model_store import FILES, ModelStore
from experiments.bench.device_runtime import build_device_venv, predict_peak, run
from fl_ser.data.audio import read_audio
from fl_ser.data.corpus import SAMPLE_RATE
from fl_ser.models.export import ATOL
from fl_ser.privacy.normalization import from_config
from fl_ser.task import get_arrays, new_classifier, pipeline
from server.release import release_model
from tests.conftest import ALL_FORMATS, EMODB, make_config, needs_emodb

pytestmark = [pytest.mark.slow, needs_emodb]
#: EmoDB's emotion letter (the file name's sixth character) -> name; five recordings of each go into the folder.
LETTERS = {"W": "anger", "F": "happiness", "T": "sadness", "N": "neutral"}


@pytest.fixture(scope="module")
def device_python(tmp_path_factory) -> Path:
    """The venv's python: pip install --no-deps -e REPO, then the device extra's requirements (as pyproject lists);
    the bench measures the same venv (experiments.bench.device_runtime)."""
    return build_device_venv(tmp_path_factory.mktemp("device") / "venv")


def test_the_device_venv_has_no_torch_and_checks_a_participant_folder(device_python, tmp_path):
    done = run(str(device_python), "-c", "import torch", cwd=tmp_path)
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr
    folder = tmp_path / "alice"
    folder.mkdir()
    rows = ["file,emotion"]
    for letter, emotion in LETTERS.items():
        for wav in sorted((EMODB / "wav").glob(f"03???{letter}?.wav"))[:5]:
            (folder / wav.name).write_bytes(wav.read_bytes())  # 22.05 kHz: read with soxr here
            rows.append(f"{wav.name},{emotion}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    done = run(str(device_python), "-m", "clients.validate", str(folder), "--json", cwd=tmp_path)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], done.stdout + done.stderr
    assert sum(report["counts"].values()) == len(rows) - 1
    assert set(report["sample_rates"].values()) == {22050}


def test_the_device_venv_predicts_what_the_eager_model_predicts(device_python, tmp_path):
    cfg = make_config(tmp_path, "features=functionals", "model=linear", ALL_FORMATS)
    classifier, normalizer = new_classifier(cfg, len(cfg.labels)), from_config(cfg).published()
    wave = read_audio(EMODB / "wav" / "03a01Fa.wav")
    result = release_model(cfg, get_arrays(classifier), normalizer, tmp_path / "release", waves=[wave])
    assert "onnx" in result["max_difference"], result["unavailable"]
    release = {name: (tmp_path / "release" / name).read_bytes() for name in FILES
               if (tmp_path / "release" / name).exists()}
    ModelStore(tmp_path / "store").add(release, list(cfg.labels), {"round": 1, "config_hash": "venv"})
    wav = tmp_path / "speech.wav"
    sf.write(wav, wave, SAMPLE_RATE, subtype="FLOAT")  # at 16 kHz: both sides read the same samples
    measured = predict_peak(device_python, tmp_path / "store", wav)  # as the bench measures it
    assert measured["peak_rss_mib"] > 0
    assert "run by onnxruntime" in run(str(device_python), "-m", "clients.predict", "--store",
                                       str(tmp_path / "store"), str(wav), cwd=tmp_path).stdout
    (got,) = measured["answer"]
    with torch.no_grad():
        want = pipeline(cfg, classifier, normalizer, list(cfg.labels)).eval()(torch.from_numpy(wave)[None])[0]
    assert list(got["probabilities"]) == list(cfg.labels)
    np.testing.assert_allclose(list(got["probabilities"].values()), want.numpy(), atol=ATOL, rtol=0)
