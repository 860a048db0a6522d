"""soxr (the resampler of a device without torch) against torchaudio.functional.resample, on real EmoDB speech.

EmoDB is recorded at 22.05 kHz; each source rate is made from it with torchaudio, then both resamplers take it
to 16 kHz. Measured (11 EmoDB files, 2026-12-02): the difference relative to the signal is -31 dB RMS from
44.1 and 48 kHz, -22 dB from 8 kHz, almost all of it above 4 kHz: torchaudio's filter (Hann-windowed sinc,
width 6, rolloff 0.99) has a wider transition band than soxr's, and from 8 kHz it leaves images above 4 kHz
that soxr removes. Below 3 kHz the two agree to -55 dB or better. 'HQ' and 'VHQ' differ from torchaudio
alike (within 0.2 dB). The bounds below leave ~1.5 dB over what was measured.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
import torchaudio.functional as taf

from fl_ser.data import audio
from fl_ser.data.corpus import SAMPLE_RATE
from tests.conftest import EMODB, needs_emodb

FILES = ("03a01Fa.wav", "08a02Ab.wav", "13a05Ea.wav", "16b10Wb.wav")
#: Largest RMS difference relative to the signal's RMS, whole band and 0-3 kHz, by source rate.
BOUND = {44100: (0.033, 10 ** (-50 / 20)), 48000: (0.033, 10 ** (-50 / 20)), 8000: (0.095, 10 ** (-50 / 20))}


def _relative(got: np.ndarray, want: np.ndarray, below_hz: float | None = None) -> float:
    g, w = np.fft.rfft(got), np.fft.rfft(want)
    if below_hz is not None:
        keep = np.fft.rfftfreq(len(want), 1 / SAMPLE_RATE) < below_hz
        g, w = g[keep], w[keep]
    return float(np.sqrt(np.sum(np.abs(g - w) ** 2) / np.sum(np.abs(w) ** 2)))


@needs_emodb
@pytest.mark.parametrize("quality", ["HQ", "VHQ"])
@pytest.mark.parametrize("rate", list(BOUND))
def test_soxr_matches_torchaudio_on_real_speech(rate, quality):
    whole, low = 0.0, 0.0
    for name in FILES:
        speech, native = sf.read(EMODB / "wav" / name, dtype="float32")
        source = taf.resample(torch.from_numpy(speech), native, rate).numpy()
        want = taf.resample(torch.from_numpy(source), rate, SAMPLE_RATE).numpy()
        got = soxr.resample(source, rate, SAMPLE_RATE, quality=quality)
        assert len(got) == len(want)
        whole, low = max(whole, _relative(got, want)), max(low, _relative(got, want, below_hz=3000))
    assert whole < BOUND[rate][0] and low < BOUND[rate][1], (whole, low)


@needs_emodb
def test_read_audio_without_torchaudio_resamples_with_soxr(monkeypatch):
    path = EMODB / "wav" / FILES[0]
    with_torchaudio = audio.read_audio(path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(audio.importlib.util, "find_spec",
                        lambda name, *args: None if name == "torchaudio" else find_spec(name, *args))
    without = audio.read_audio(path)
    assert without.dtype == np.float32 and len(without) == len(with_torchaudio)
    assert _relative(without, with_torchaudio, below_hz=3000) < BOUND[44100][1]
