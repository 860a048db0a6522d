"""Reading audio files into float32 mono at 16 kHz, rejecting files no model should see.

Files are read with ``soundfile`` (torchaudio's own loader needs torchcodec, which
we do not ship); resampling uses ``torchaudio.functional.resample``, imported only
when a file is not already at :data:`~fl_ser.data.corpus.SAMPLE_RATE`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from fl_ser.data.corpus import SAMPLE_RATE

#: The reasons an :class:`AudioError` can carry (they key :class:`~fl_ser.data.corpus.LoadReport`).
REASONS = ("unreadable", "empty", "silent", "too short")


class AudioError(Exception):
    """A file that cannot be used as training audio; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, path: str | Path, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown AudioError reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{path}: {reason} ({detail})")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


def _dbfs(x: float) -> float:
    return 20.0 * np.log10(max(x, 1e-12))


def read_audio(path: str | Path, min_seconds: float = 0.3, silence_dbfs: float = -60.0) -> np.ndarray:
    """Return the file's audio as float32 mono at 16 kHz, or raise :class:`AudioError`.

    Raises for unreadable or missing files, zero-length files, files shorter than
    ``min_seconds``, and silent files (peak or RMS below ``silence_dbfs``).
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "unreadable", "no such file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty", "0-byte file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, TypeError, ValueError) as err:
        raise AudioError(path, "unreadable", str(err)) from err
    if data.size == 0:
        raise AudioError(path, "empty", "no samples")
    wave = data.mean(axis=1, dtype=np.float32)
    seconds = len(wave) / rate
    if seconds < min_seconds:
        raise AudioError(path, "too short", f"{seconds:.3f} s < {min_seconds} s")
    peak = _dbfs(float(np.abs(wave).max()))
    rms = _dbfs(float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))))
    if peak < silence_dbfs or rms < silence_dbfs:
        raise AudioError(path, "silent", f"peak {peak:.1f} dBFS, RMS {rms:.1f} dBFS, threshold {silence_dbfs} dBFS")
    if rate != SAMPLE_RATE:
        import torch
        import torchaudio.functional

        wave = torchaudio.functional.resample(torch.from_numpy(wave), rate, SAMPLE_RATE).numpy()
    return np.ascontiguousarray(wave, dtype=np.float32)
