"""The phone export (fl-ser[mobile], ExecuTorch 1.5.1): clients.export_mobile lowers the default release to a .pte that
ExecuTorch's runtime runs as the eager model does, refuses input longer than its bound, and writes nothing that
disagrees; an op ExecuTorch has no kernel for is named with its source line.

ExecuTorch is not a main dependency (it adds ~400 MB: coremltools, torchao, pandas, scikit-learn), so the slow tests
build an overlay venv in ``.cache/mobile-venv``: a fresh venv whose ``.pth`` file adds this venv's packages (torch is
reused, never installed again) and that pip-installs pyproject's ``mobile`` extra from the package registry. It is
kept between runs and rebuilt when the extra or this venv changes (~40 s).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from clients import export_mobile
from clients.model_store import ModelStore
from fl_ser.data.audio import read_audio
from fl_ser.data.corpus import SAMPLE_RATE
from fl_ser.models import export, mobile
from fl_ser.models.runtimes import RuntimeMissing, _native_log, probe_signal
from fl_ser.privacy.normalization import from_config
from fl_ser.task import get_arrays, new_classifier, pipeline
from server.release import release_model
from tests.conftest import EMODB, REPO, make_config

MOBILE_VENV = REPO / ".cache" / "mobile-venv"


def _run(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run without this process's Python settings (after an in-process simulation Flower's Ray backend has set
    PYTHONPATH to the driver's sys.path; DEVELOPERS.md)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def mobile_python() -> Path:
    """The overlay venv's python (see the module docstring); built under a lock, so parallel workers share it."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["mobile"]
    base = sysconfig.get_paths()["purelib"]
    stamp = json.dumps({"extra": extra, "base": base, "python": sys.version, "torch": torch.__version__})
    python, marker = MOBILE_VENV / "bin" / "python", MOBILE_VENV / "fl-ser-overlay.json"
    MOBILE_VENV.parent.mkdir(exist_ok=True)
    with open(MOBILE_VENV.parent / "mobile-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.exists() and marker.read_text() == stamp):
            shutil.rmtree(MOBILE_VENV, ignore_errors=True)
            venv.create(MOBILE_VENV, with_pip=True)
            done = _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=REPO)
            Path(done.stdout.strip(), "fl_ser_base_venv.pth").write_text(f"import site; site.addsitedir({base!r})\n")
            pins = MOBILE_VENV / "keep-torch.txt"  # whatever the extra asks, the base venv's torch stays
            pins.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
            done = _run(str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-c", str(pins),
                        *extra, cwd=REPO)
            assert done.returncode == 0, done.stderr[-3000:]
            marker.write_text(stamp)
    done = _run(str(python), "-c", "import torch, executorch; print(torch.__file__, torch.__version__)", cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [torch.__file__, torch.__version__]  # the overlay runs this venv's torch
    return python


def _release(tmp_path: Path, *overrides: str):
    """A release of an untrained model (seeded initial weights, public normaliser) and its eager pipeline."""
    cfg = make_config(tmp_path, *overrides)
    classifier, normalizer = new_classifier(cfg, len(cfg.labels)), from_config(cfg).published()
    release_model(cfg, get_arrays(classifier), normalizer, tmp_path / "release")
    return tmp_path / "release", pipeline(cfg, classifier, normalizer, list(cfg.labels)).eval()


@pytest.mark.slow
def test_the_default_release_on_a_phone_computes_the_eager_model(mobile_python, tmp_path):
    folder, pipe = _release(tmp_path, "features=functionals", "model=linear")  # the experiment's default
    store = ModelStore(tmp_path / "store")
    store.add({p.name: p.read_bytes() for p in folder.iterdir() if p.name != "labels.json"}, pipe.labels,
              {"round": 4, "config_hash": "h", "run_id": 9})
    out = tmp_path / "phone" / "emotion.pte"
    out.parent.mkdir()
    done = _run(str(mobile_python), "-m", "clients.export_mobile", "--store", str(store.root), "--out", str(out),
                "--add", "--time", cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "[" in done.stdout and "lowering to ExecuTorch with XNNPACK" in done.stdout  # progress, with seconds
    worst = float(re.search(r"agrees with the eager model within (\S+) \(allowed 1e-4\)", done.stdout).group(1))
    assert worst <= export.ATOL
    assert float(re.search(r"a 3 s utterance takes (\S+) ms under ExecuTorch", done.stdout).group(1)) > 0
    assert float(re.search(r"allocates (\S+) MB of working memory", done.stdout).group(1)) > 1  # planned for 30 s
    stored = store.latest()
    assert stored.version == 2 and (stored.path / "emotion_model.pte").read_bytes() == out.read_bytes()
    assert stored.meta["pte_from"] == 1 and stored.meta["run_id"] == 9 and stored.meta["pte_max_seconds"] == 30
    assert not list(out.parent.glob(".tmp-*")) and str(REPO).encode() not in out.read_bytes()  # no build paths

    recordings = tmp_path / "recordings"
    recordings.mkdir()
    wave = read_audio(EMODB / "wav" / "03a01Fa.wav") if EMODB.exists() else probe_signal(2.2, seed=3)
    sf.write(recordings / "speech.wav", wave, SAMPLE_RATE, subtype="FLOAT")  # both sides read the same samples
    sf.write(recordings / "long.wav", np.tile(wave, int(31 * SAMPLE_RATE / len(wave)) + 1)[: 31 * SAMPLE_RATE],
             SAMPLE_RATE, subtype="FLOAT")
    done = _run(str(mobile_python), "-m", "clients.predict", "--store", str(store.root), "--runtime", "executorch",
                str(recordings), "--json", cwd=REPO)
    assert done.returncode == 1, done.stderr[-3000:]  # one file refused
    (got,) = json.loads(done.stdout)
    with torch.inference_mode():
        want = pipe(torch.from_numpy(wave)[None])[0].numpy()
    assert got["file"] == "speech.wav" and list(got["probabilities"]) == pipe.labels
    np.testing.assert_allclose(list(got["probabilities"].values()), want, atol=export.ATOL, rtol=0)
    assert "long.wav: too long (31.0 s of audio, but this ExecuTorch model takes at most 30.0 s" in done.stderr

    done = _run(str(mobile_python), "-m", "clients.validate", "--store", str(store.root), "--runtime", "executorch",
                "--json", cwd=REPO)
    report = json.loads(done.stdout)["model"]
    assert done.returncode == 0 and report["ok"] and report["file"] == "emotion_model.pte", done.stderr[-2000:]
    assert report["output_shape"] == [1, len(pipe.labels)] and abs(report["probability_sum"] - 1) < 1e-5


MODELS = '''
import sys
import torch
from fl_ser.features import FeatureNormalizer
from fl_ser.models import MLP, EmotionPipeline


class Level(torch.nn.Module):
    """Two numbers per waveform: its mean level and peak."""

    output_shape, kind = (2,), "vector"

    def forward(self, wave):
        return torch.stack([wave.abs().mean(1), wave.abs().amax(1)], dim=1)


class Sorted(Level):
    """The median level by sorting (ExecuTorch 1.5.1 has no sort kernel)."""

    def forward(self, wave):
        s, _ = torch.sort(wave.abs(), dim=-1)
        return torch.stack([s[:, s.shape[1] // 2], s[:, -1]], dim=1)


def pipe(extractor):
    return EmotionPipeline(extractor, FeatureNormalizer((2,), "vector"), MLP([2], 3), ["a", "b", "c"]).eval()
'''

CHECKS = '''
import json, sys
from pathlib import Path

folder, out = Path(sys.argv[1]), {}
sys.path.insert(1, sys.argv[2])  # the repository
from models import Level, Sorted, pipe
from fl_ser.models import export, mobile

try:
    mobile.lower(pipe(Sorted()))
except export.UnsupportedExport as err:
    out["sorted"] = str(err)
written = mobile.export_pte(pipe(Level()), folder / "level.pte", max_seconds=6.0)
out["written"] = [written.size, written.max_difference, written.checked_on, written.kernels]
try:
    mobile.export_pte(pipe(Level()), folder / "level.pte")
except FileExistsError as err:
    out["exists"] = str(err)
opened = export.open_model
export.open_model = lambda runtime, data: (lambda wave, run=opened(runtime, data): run(wave) + 2e-3)
try:
    mobile.export_pte(pipe(Level()), folder / "off.pte", max_seconds=6.0)
except export.ParityError as err:
    out["parity"] = str(err)
export.open_model = opened
run = export.open_model("executorch", (folder / "level.pte").read_bytes())
out["batch"] = list(run(export.probes()[2]).shape)
try:
    run(export.probe_signal(6.5)[None])
except ValueError as err:
    out["long"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
'''


@pytest.mark.slow
def test_a_pte_that_disagrees_is_not_written_and_an_op_without_a_kernel_is_named(mobile_python, tmp_path):
    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "checks.py").write_text(CHECKS)
    done = _run(str(mobile_python), str(tmp_path / "checks.py"), str(tmp_path), str(REPO), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert re.search(r"has no kernel for aten::sort\.values at \S*models\.py:\d+ \(s, _ = torch\.sort", out["sorted"])
    assert "Fix: express it with ops that have one (for torch.sort: torch.topk" in out["sorted"]
    size, worst, checked, kernels = out["written"]
    assert size > 0 and worst <= export.ATOL and checked == 3 and all("::" in k for k in kernels)
    assert "level.pte already exists" in out["exists"]
    assert re.search(r"pte \(emotion_model\.pte\) differs from the eager model by 0\.002", out["parity"])
    left = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pte" or p.name.startswith(".tmp"))
    assert left == ["level.pte"]  # the one that disagreed was never written, and nothing staged is left
    assert out["batch"] == [2, 3]  # a batch runs one waveform at a time
    assert out["long"].startswith("InputTooLong: 6.5 s of audio, but this ExecuTorch model takes at most 6.0 s")


def test_without_executorch_the_export_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mobile, "installed", lambda runtime: False)
    assert export_mobile.main(["--release", str(tmp_path), "--out", str(tmp_path / "m.pte")]) == 1
    assert "needs ExecuTorch 1.5.1, which is not installed here. Fix: pip install 'fl-ser[mobile]'" in \
        capsys.readouterr().err
    with pytest.raises(RuntimeMissing, match=r"pip install 'fl-ser\[mobile\]'"):
        mobile.lower(None)  # before anything else


@pytest.mark.parametrize("argv,match", [
    (["--release", "r", "--add", "--out", "x.pte"], "--add and --version go with --store"),
    (["--store", "s"], "say where the program goes"),
    (["--store", "s", "--out", "x.pte", "--max-seconds", "4"], "--max-seconds must be at least 5"),
    (["--store", "s", "--out", "no/such/folder/x.pte"], "does not exist; create it"),
])
def test_export_mobile_usage_errors(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        export_mobile.main(argv)
    assert match in capsys.readouterr().err


def test_a_release_folder_is_rebuilt_as_its_eager_model(tmp_path, capsys):
    folder, pipe = _release(tmp_path, "features=functionals", "model=linear")
    rebuilt, labels = export_mobile._release(folder)
    wave = torch.from_numpy(probe_signal(2.5))[None]
    with torch.inference_mode():
        assert labels == pipe.labels and torch.equal(rebuilt(wave), pipe(wave))
    (folder / "emotion_model.pt").write_bytes(b"damaged")
    with pytest.raises(export_mobile.StoreError, match=r"the release in .* is damaged \(RuntimeError: .*Fix: copy"):
        export_mobile._release(folder)
    (folder / "config.yaml").unlink()
    with pytest.raises(export_mobile.StoreError, match=r"holds no config\.yaml: it is not a release folder.*Fix"):
        export_mobile._release(folder)


def test_the_phone_trace_has_one_waveform_and_a_bounded_length(tmp_path):
    cfg = make_config(tmp_path, "features=mfcc", "model=cnn")
    pipe = export.frozen(pipeline(cfg, new_classifier(cfg, len(cfg.labels)), from_config(cfg).published(),
                                  list(cfg.labels)))
    module = export.program(pipe, fft=False, max_samples=5 * SAMPLE_RATE, batch=1).module()
    with torch.inference_mode():
        assert module(torch.from_numpy(probe_signal(4.0))[None]).shape == (1, len(cfg.labels))
        for bad in (np.stack([probe_signal(2.0)] * 2), probe_signal(5.5)[None]):
            with pytest.raises(Exception, match=r"(?i)expected|guard|range|constraint"):
                module(torch.from_numpy(bad))


def test_the_native_log_is_held_back_and_goes_into_errors(capfd):
    assert _native_log(lambda: os.write(2, b"[cpuinfo_utils.cpp:71] Reading file\n") and 7) == 7
    assert capfd.readouterr().err == ""

    def fails():
        os.write(2, b"[method.cpp:822] Missing operator: [44] aten::sort.values\n")
        raise RuntimeError("Failed to load method forward, error: 0x:14")

    with pytest.raises(RuntimeError, match=r"error: 0x:14; ExecuTorch logged: \[method\.cpp:822\] Missing operator: "
                                           r"\[44\] aten::sort\.values"):
        _native_log(fails)
    print("after", file=sys.stderr)
    assert capfd.readouterr().err == "after\n"  # stderr is restored
