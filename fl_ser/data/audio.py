"""Reading audio files into float32 mono at 16 kHz, refusing files no model should see.

Files are opened with ``soundfile`` (libsndfile; torchaudio's own loader needs torchcodec,
which we do not ship). libsndfile recognises a file by its content, not its name, so FLAC,
OGG or MP3 saved as ``.wav`` is read as what it is; any PCM width (8, 16, 24, 32 bit) or
float, and any channel count, is accepted. Channels are averaged; a file not at
:data:`~fl_ser.data.corpus.SAMPLE_RATE` is resampled (:func:`resample`) with
``torchaudio.functional.resample`` where torchaudio is installed (imported only then: what the
models were trained on), else with soxr (python-soxr, quality :data:`SOXR_QUALITY`), so a device
without torch reads audio too. The two agree to better than -50 dB below 3 kHz; above that they
differ by torchaudio's wider filter transition (``tests/test_resample.py`` measures it).

The header is read first, so a file is judged on its rate and length before any sample is
decoded; samples are then decoded in blocks, so memory stays at one block plus the mono
result, never the whole file. :class:`AudioPolicy` holds the thresholds (each corpus's
``audio:`` block in ``conf/data/audio/default.yaml`` mirrors its defaults). A refused file
raises :class:`AudioError` with one of these reasons, which
:class:`~fl_ser.data.corpus.LoadReport` and ``clients.validate`` count:

=================  =====================================================================
missing            no file at the listed path
empty              a 0-byte file, or a header with no samples
unreadable         not audio libsndfile can decode: text, random bytes, a truncated header
low sample rate    recorded below ``min_sample_rate`` (16 kHz): the features use the band up
                   to 8 kHz (mel bands, alpha ratio, Hammarberg index), which upsampling
                   cannot restore, so such files would differ systematically from the rest
odd sample rate    a rate whose ratio to 16 kHz, reduced to p/q, has p x q above 2^22:
                   exact resampling would need a p x q filter bank (16001 Hz: 4 GB, 20 s
                   a second). Every multiple of 50 Hz passes, so every common rate does
too short          shorter than ``min_seconds`` (0.3 s)
too long           longer than ``max_seconds`` (60 s) when ``long_files: skip`` (the default)
non-finite         any NaN or infinite sample (a broken float export)
out of range       a sample beyond ``max_peak`` times full scale (10, i.e. +20 dBFS); only
                   float files can, e.g. integer PCM values stored unscaled as float
silent             peak or RMS below ``silence_dbfs`` (-60 dBFS)
dc only            a constant offset and nothing else: silent once the mean is removed
=================  =====================================================================

Long files: with ``long_files: skip`` a file over ``max_seconds`` is refused unread (an
utterance-level emotion label rarely describes minutes of speech); with ``long_files: crop``
only its first ``max_seconds`` are decoded. Either way one file cannot exhaust a device's
memory.

A file that is read may carry *notes*, counted but not refused:

=========  ==========================================================================
clipped    at least 1% of its samples at full scale (``|x| >= 0.99``). Clipped speech is
           valid audio and typical of shouting, so of anger: refusing it would bias the
           label distribution. Record with more headroom where you can.
cropped    longer than ``max_seconds`` with ``long_files: crop``; its first part was used
=========  ==========================================================================
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import soundfile as sf

from fl_ser.data.corpus import SAMPLE_RATE

#: Every reason an :class:`AudioError` can carry, with the fix its message ends with.
REASONS = {
    "missing": "add the file, or remove its row",
    "empty": "re-export the recording, or remove its row",
    "unreadable": "convert it to WAV or FLAC (e.g. `ffmpeg -i IN -ar 16000 OUT.wav`), or remove its row",
    "low sample rate": "re-record at 16 kHz or more (upsampling cannot restore the missing band), or remove its row",
    "odd sample rate": "resample it to 16 kHz first (e.g. `ffmpeg -i IN -ar 16000 OUT.wav`)",
    "too short": "use the whole utterance, or remove its row",
    "too long": "cut it into utterances, or raise max_seconds, or set long_files=crop to use its first max_seconds",
    "non-finite": "re-export it from the original recording (the file holds NaN or infinite samples)",
    "out of range": "rescale it to within full scale (integer samples stored as float: divide by 32768)",
    "silent": "check the microphone and re-record, or remove its row",
    "dc only": "check the microphone and its cable and re-record (the file holds only a constant offset)",
}
#: What can be noted about a file that is read, and what it means (see the module docstring).
NOTES = {
    "clipped": "at least 1% of the samples at full scale; kept (clipped shouting is real speech), but record with "
               "more headroom where you can",
    "cropped": "longer than max_seconds; only the first max_seconds are used (long_files=crop)",
}

CLIP_LEVEL = 0.99  # |x| at or above this is at full scale (8-bit PCM's positive peak is 127/128)
CLIPPED_FRACTION = 0.01  # share of samples at full scale from which a file is noted "clipped"
BLOCK_SAMPLES = 1 << 18  # samples (frames x channels) decoded at a time: 1 MB
MAX_RESAMPLING_BANK = 1 << 22  # p x q of the reduced rate ratio p/q that resampling may need
LONG_FILES = ("skip", "crop")


@dataclass(frozen=True)
class AudioPolicy:
    """What :func:`load_audio` accepts. These defaults are the one source of the thresholds."""

    min_sample_rate: int = 16_000  # Hz; below it the file is refused ("low sample rate")
    min_seconds: float = 0.3
    max_seconds: float = 60.0
    long_files: str = "skip"  # "skip": refuse files over max_seconds; "crop": use their first max_seconds
    silence_dbfs: float = -60.0
    max_peak: float = 10.0  # in full-scale units; float files beyond it are refused ("out of range")

    def __post_init__(self):
        if self.long_files not in LONG_FILES:
            raise ValueError(f"audio long_files={self.long_files!r}; use one of {LONG_FILES}")
        if not 0 < self.min_seconds < self.max_seconds:
            raise ValueError(f"audio needs 0 < min_seconds < max_seconds; got {self.min_seconds} and "
                             f"{self.max_seconds}")
        if self.min_sample_rate <= 0 or self.max_peak <= 0:
            raise ValueError("audio min_sample_rate and max_peak must be positive")

    @classmethod
    def of(cls, audio: PolicyLike) -> AudioPolicy:
        """A policy from a config block (``_target_`` ignored), a policy, or None for the defaults."""
        if audio is None or isinstance(audio, AudioPolicy):
            return audio or cls()
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(audio) - names - {"_target_"})
        if unknown:
            raise ValueError(f"unknown audio setting(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in audio.items() if k in names})


PolicyLike = AudioPolicy | Mapping | None  # what a loader's ``audio`` argument may be (see AudioPolicy.of)


@dataclass(frozen=True)
class Audio:
    """A file's audio as the models see it, with what was learnt reading it."""

    wave: np.ndarray  # float32 mono at SAMPLE_RATE
    rate: int  # the file's own sample rate
    channels: int
    seconds: float  # the file's duration (the wave is shorter when cropped)
    notes: tuple[str, ...] = ()


class AudioError(Exception):
    """A file that cannot be used as training audio; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, path: str | Path, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown AudioError reason {reason!r}; expected one of {list(REASONS)}")
        super().__init__(f"{path}: {reason} ({detail}); {REASONS[reason]}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail

    @property
    def fix(self) -> str:
        return REASONS[self.reason]


def _dbfs(x: float) -> float:
    return 20.0 * np.log10(max(x, 1e-12))


def _decode(f: sf.SoundFile, frames: int, policy: AudioPolicy, path: Path) -> tuple[np.ndarray, float]:
    """The first ``frames`` frames as mono float32, block by block; also the share of samples at full scale."""
    mono = np.empty(frames, dtype=np.float32)
    filled = clipped = 0
    block_frames = max(1, BLOCK_SAMPLES // f.channels)
    while filled < frames:
        block = f.read(min(block_frames, frames - filled), dtype="float32", always_2d=True)
        if not len(block):
            break  # the header promised more than the file holds (truncated data)
        if not np.isfinite(block).all():
            where = filled + int(np.argwhere(~np.isfinite(block))[0][0])
            raise AudioError(path, "non-finite", f"NaN or infinite sample at {where / f.samplerate:.3f} s")
        magnitude = np.abs(block)
        peak = float(magnitude.max())
        if peak > policy.max_peak:
            raise AudioError(path, "out of range", f"peak {peak:.4g} x full scale > {policy.max_peak}")
        clipped += int(np.count_nonzero(magnitude >= CLIP_LEVEL))
        mono[filled : filled + len(block)] = block.mean(axis=1, dtype=np.float32)
        filled += len(block)
    return mono[:filled], clipped / max(filled * f.channels, 1)


def _check_level(wave: np.ndarray, policy: AudioPolicy, path: Path) -> None:
    """Refuse a silent wave, or one that is a constant offset only; float64 sums over blocks (no full-size copy)."""
    total = squares = 0.0
    for start in range(0, len(wave), BLOCK_SAMPLES):
        chunk = wave[start : start + BLOCK_SAMPLES].astype(np.float64)
        total, squares = total + float(chunk.sum()), squares + float(chunk @ chunk)
    mean, power = total / len(wave), squares / len(wave)
    high, low = float(wave.max()), float(wave.min())
    levels = {"silent": ("", max(high, -low), power),
              "dc only": (f"around {mean:.3g}: ", max(high - mean, mean - low), max(power - mean**2, 0.0))}
    for reason, (what, peak, signal_power) in levels.items():
        peak_db, rms_db = _dbfs(peak), _dbfs(float(np.sqrt(signal_power)))
        if peak_db < policy.silence_dbfs or rms_db < policy.silence_dbfs:
            raise AudioError(path, reason, f"{what}peak {peak_db:.1f} dBFS, RMS {rms_db:.1f} dBFS, below "
                                           f"{policy.silence_dbfs} dBFS")


def _frames_to_read(f: sf.SoundFile, policy: AudioPolicy, path: Path) -> int:
    """How many frames of ``f`` to decode, judged on its header alone; raises :class:`AudioError` for a file that
    must not be decoded at all."""
    rate, total = int(f.samplerate), int(f.frames)
    if total == 0:
        raise AudioError(path, "empty", f"{f.format} header with no samples")
    if rate < policy.min_sample_rate:
        raise AudioError(path, "low sample rate", f"recorded at {rate} Hz, below the {policy.min_sample_rate} Hz "
                                                  "the features need")
    common = math.gcd(rate, SAMPLE_RATE)
    if (rate // common) * (SAMPLE_RATE // common) > MAX_RESAMPLING_BANK:
        raise AudioError(path, "odd sample rate", f"{rate} Hz: resampling it exactly to {SAMPLE_RATE} Hz needs a "
                                                  f"{SAMPLE_RATE // common} x {rate // common} filter bank")
    seconds = total / rate
    if seconds < policy.min_seconds:
        raise AudioError(path, "too short", f"{seconds:.3f} s < {policy.min_seconds} s")
    if seconds > policy.max_seconds and policy.long_files == "skip":
        raise AudioError(path, "too long", f"{seconds:.1f} s > max_seconds {policy.max_seconds} s")
    return min(total, int(policy.max_seconds * rate))


def load_audio(path: str | Path, policy: AudioPolicy | None = None) -> Audio:
    """Read one file under ``policy`` (default: :class:`AudioPolicy`'s defaults), or raise :class:`AudioError`."""
    policy = policy or AudioPolicy()
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "missing", "no such file" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty", "0-byte file")
    try:
        with sf.SoundFile(str(path)) as f:
            rate, channels, total = int(f.samplerate), int(f.channels), int(f.frames)
            frames = _frames_to_read(f, policy, path)
            wave, clipped = _decode(f, frames, policy, path)
    except (sf.SoundFileError, RuntimeError, OSError, TypeError, ValueError) as err:
        raise AudioError(path, "unreadable", str(err)) from err
    if not len(wave):
        raise AudioError(path, "empty", "the header announces samples the file does not hold")
    if len(wave) < policy.min_seconds * rate:  # the data ended before the header said
        raise AudioError(path, "too short", f"{len(wave) / rate:.3f} s of samples (truncated) < {policy.min_seconds} s")
    _check_level(wave, policy, path)
    notes = (("clipped",) if clipped >= CLIPPED_FRACTION else ()) + (("cropped",) if frames < total else ())
    if rate != SAMPLE_RATE:
        wave = resample(wave, rate)
    return Audio(np.ascontiguousarray(wave, dtype=np.float32), rate, channels, total / rate, notes)


#: soxr's quality where torchaudio is absent ('HQ' and 'VHQ' differ from torchaudio alike: its filter dominates).
SOXR_QUALITY = "HQ"


def resample(wave: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 ``wave`` at ``rate`` Hz -> :data:`~fl_ser.data.corpus.SAMPLE_RATE`: torchaudio where installed,
    else soxr; both give ``ceil(len * SAMPLE_RATE / rate)`` samples."""
    if importlib.util.find_spec("torchaudio") is not None:
        import torch
        import torchaudio.functional

        return torchaudio.functional.resample(torch.from_numpy(wave), rate, SAMPLE_RATE).numpy()
    import soxr

    out = soxr.resample(wave, rate, SAMPLE_RATE, quality=SOXR_QUALITY)
    length = -(-len(wave) * SAMPLE_RATE // rate)
    return np.pad(out, (0, max(0, length - len(out))))[:length]


def read_audio(path: str | Path, policy: AudioPolicy | None = None) -> np.ndarray:
    """The file's audio as float32 mono at 16 kHz (see :func:`load_audio`), or raise :class:`AudioError`."""
    return load_audio(path, policy).wave
