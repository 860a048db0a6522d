"""The extractors give the features the released models were trained on: parity with stored reference outputs.

``tests/data/feature_reference.npz`` holds the outputs of the extractors at the commit named in
``feature_reference.json`` (torch.stft / torch.fft.rfft and torchaudio's transforms) for EmoDB files and
synthetic utterances cut to several lengths, short clips included: every functional, and a subset of the log-mel
and MFCC frames (the first, last and every 10th; the whole maps would not keep the file small).

Tolerance, per value: ``|new - ref| <= tol * max(1, |ref|)``, i.e. absolute for |ref| <= 1 and relative above
(centroids in Hz, F0 slopes in semitones/s and MFCC c0 are tens to thousands, where 1e-5 absolute is below
float32's resolution). Each extractor has two graphs (:mod:`fl_ser.features.stft`):

* torch's (FFTs: eager, TorchScript, ``.pt2``; what devices train on) frames and transforms as the reference
  did: within 1e-5 of it (measured: 4.8e-7 functionals, 2.4e-7 log-mel, 1.5e-6 MFCC);
* the portable graph (the ONNX and ExecuTorch exports: factored DFT matmuls, fl_ser.features.stft.portable) is
  another float32 computation. The stored float32 outputs are themselves up to 1.4e-5 (log-mel) and 4.1e-5 (MFCC)
  from the same transforms run in float64, in low-energy bins and in F0 slopes (a frame-to-frame F0 difference
  over 10 ms amplifies rounding 100-fold), so that graph is held within 3e-5 of torchaudio in float64 (measured
  0.7e-5 log-mel, 2.1e-5 MFCC: as close as torch.stft's own 1.4e-5 and 4.1e-5) and within 6e-5 of the stored
  outputs (the two roundings add up: measured 1.7e-5 functionals, 1.7e-5 log-mel, 3.3e-5 MFCC).

Rewrite the reference (only when a feature is meant to change, and retrain then):
``python -m tests.test_feature_parity --write``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fl_ser.data.audio import read_audio
from fl_ser.data.synthetic import SyntheticCorpus
from fl_ser.features import Functionals, LogMel, MFCCDeltas
from fl_ser.features.logmel import fix_length
from fl_ser.features.stft import portable
from tests.conftest import EMODB, REPO

REFERENCE = REPO / "tests" / "data" / "feature_reference.npz"
EMODB_FILES = ("03a01Fa.wav", "08a02Ab.wav", "10b01Lb.wav", "13a05Ea.wav", "15b03Tc.wav", "16b10Wb.wav")
SYNTHETIC = (("spk0000", "anger"), ("spk0001", "sadness"))
SECONDS = (0.01, 0.3, 1.0, None)  # None: the whole utterance (EmoDB's are 2 s); 0.01 s is shorter than one frame
FRAMES = sorted({*range(0, 300, 10), 1, 2, 297, 298, 299})
#: Against the stored float32 outputs, per graph (see the module docstring).
TOLERANCE = {"torch": 1e-5, "portable": 6e-5}
EXACT_TOLERANCE = 3e-5  # the portable graph against torchaudio in float64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def extractors() -> dict[str, torch.nn.Module]:
    """The default extractors of conf/features/*.yaml."""
    return {"functionals": Functionals(), "logmel": LogMel(), "mfcc": MFCCDeltas()}


def utterances() -> dict[str, np.ndarray]:
    """The whole utterances the clips are cut from, EmoDB's and the synthetic corpus's, plus a 4 s one (two EmoDB
    files end to end, longer than the sequence extractors' 3 s window)."""
    corpus = SyntheticCorpus(num_speakers=2, utterances_per_emotion=1)
    waves = {name: read_audio(EMODB / "wav" / name) for name in EMODB_FILES}
    waves["emodb_4s"] = np.concatenate([waves[EMODB_FILES[0]], waves[EMODB_FILES[1]]])
    waves |= {f"{s}_{e}": corpus.synthesize(s, e) for s, e in SYNTHETIC}
    return waves


def clips(waves: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{name}@{'all' if s is None else s}": wave if s is None else wave[: int(s * 16000)]
            for name, wave in waves.items() for s in SECONDS}


def features(ext: torch.nn.Module, name: str, wave: np.ndarray, path: str = "torch") -> np.ndarray:
    """``ext``'s features of ``wave`` (the kept frames of a sequence) by its graph ``path`` (torch or portable)."""
    with torch.no_grad(), portable(ext, enabled=path == "portable"):
        out = ext(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None])[0].numpy()
    return out if name == "functionals" else out[..., FRAMES]


def within(new: np.ndarray, ref: np.ndarray) -> float:
    """The largest ``|new - ref| / max(1, |ref|)``: the test's tolerance measure."""
    return float((np.abs(new.astype(np.float64) - ref) / np.maximum(1.0, np.abs(ref))).max())


@pytest.fixture(scope="module")
def reference() -> tuple[dict, dict[str, np.ndarray]]:
    if not EMODB.exists():
        pytest.skip(f"EmoDB not found at {EMODB}")
    meta = json.loads(REFERENCE.with_suffix(".json").read_text())
    with np.load(REFERENCE) as data:
        return meta, dict(data)


@pytest.fixture(scope="module")
def waves(reference) -> dict[str, np.ndarray]:
    return clips(utterances())


@pytest.mark.parametrize("path", ["torch", "portable"])
@pytest.mark.parametrize("name", ["functionals", "logmel", "mfcc"])
def test_extractor_matches_reference(reference, waves, name, path):
    meta, ref = reference
    assert set(waves) == set(meta["clips"])
    ext = extractors()[name].eval()
    worst = {clip: within(features(ext, name, wave, path), ref[f"{name}/{clip}"]) for clip, wave in waves.items()}
    bad = {clip: w for clip, w in worst.items() if not w <= TOLERANCE[path]}
    assert not bad, f"{name} ({path}) differs from the reference of {meta['commit']} beyond {TOLERANCE[path]}: {bad}"


@pytest.mark.parametrize("path", ["torch", "portable"])
def test_batched_functionals_match_reference(reference, waves, path):
    """A batch of equal-length clips gives each clip's reference (the batch path shares every transform)."""
    _, ref = reference
    whole = [clip for clip in waves if clip.endswith("@all") and len(waves[clip]) == 32000]
    ext = Functionals()
    with torch.no_grad(), portable(ext, enabled=path == "portable"):
        out = ext(torch.from_numpy(np.stack([waves[c] for c in whole]).astype(np.float32))).numpy()
    for clip, row in zip(whole, out, strict=True):
        assert within(row, ref[f"functionals/{clip}"]) <= TOLERANCE[path], clip


@pytest.mark.parametrize("name", ["logmel", "mfcc"])
def test_portable_graph_matches_torchaudio_in_float64(reference, waves, name):
    """The portable graph's log-mel and MFCC against torchaudio's transforms run in float64, the exact values."""
    import torchaudio

    ext = extractors()[name].eval()
    mel = {"n_fft": 512, "win_length": 400, "hop_length": 160, "power": 2.0, "center": True, "pad_mode": "reflect"}
    if name == "logmel":
        exact = torchaudio.transforms.MelSpectrogram(16000, n_mels=64, **mel).double()
    else:
        mfcc = torchaudio.transforms.MFCC(16000, n_mfcc=20, log_mels=True, melkwargs={**mel, "n_mels": 40}).double()
        deltas = torchaudio.transforms.ComputeDeltas(win_length=5)
    for clip, wave in waves.items():
        x = fix_length(torch.from_numpy(wave).double()[None], ext.n_samples)
        with torch.no_grad():
            if name == "logmel":
                want = torch.log(exact(x) + 1e-6).unsqueeze(1)
            else:
                c = mfcc(x)
                d1 = deltas(c)
                want = torch.stack([c, d1, deltas(d1)], dim=1)
        want = want[0, ..., FRAMES].numpy()
        assert within(features(ext, name, wave, "portable"), want) <= EXACT_TOLERANCE, clip


def write() -> None:
    """Store the current extractors' outputs (and the commit and clips they came from) as the reference."""
    torch.set_num_threads(1)
    waves = clips(utterances())
    out = {f"{name}/{clip}": features(ext.eval(), name, wave)
           for name, ext in extractors().items() for clip, wave in waves.items()}
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(REFERENCE, **out)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "fl_ser/features"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.strip()
    meta = {"commit": commit.stdout.strip(), "features_code_modified": bool(dirty),
            "emodb": [f"wav/{n}" for n in EMODB_FILES], "synthetic": [f"SyntheticCorpus(num_speakers=2, "
                                                                      f"utterances_per_emotion=1).synthesize{s}"
                                                                      for s in SYNTHETIC],
            "clips": sorted(waves), "frames_kept": FRAMES, "made_by": "python -m tests.test_feature_parity --write"}
    REFERENCE.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size / 1024:.0f} KB) for {meta['commit']}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    write()
