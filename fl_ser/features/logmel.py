"""Fixed-size log-mel spectrogram for CNN classifiers, plus the shared crop/pad policy.

Crop/pad policy (shared by :class:`LogMel` and :class:`~fl_ser.features.mfcc.MFCCDeltas`),
applied to the waveform *before* the STFT so every utterance yields exactly the same
number of frames:

* input longer than ``seconds``: keep the centred crop of ``seconds``
  (``start = (len - n) // 2``);
* input shorter than ``seconds``: repeat (tile) the waveform end to end until it fills
  ``seconds``, then cut to length. Tiling instead of zero padding avoids log-of-silence
  frames dominating the per-bin statistics that the normaliser learns;
* empty input: zeros.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import Tensor, nn

from fl_ser.features.stft import PowerSpectrogram


def fix_length(wave: Tensor, n: int) -> Tensor:
    """Bring ``wave`` (B, samples) to exactly ``n`` samples: centred crop, or tile if shorter.

    One gather of sample ``(start + i) mod length`` for every length (``start`` is 0 when tiling), with no
    branch on the length, so ``torch.export`` keeps the time axis dynamic.
    """
    length = wave.shape[-1]
    if length == 0:
        return torch.zeros(wave.shape[0], n, dtype=wave.dtype, device=wave.device)
    size = torch.full((1,), length, dtype=torch.long, device=wave.device)  # a tensor: ONNX export needs one here
    start = (size - n).clamp_min(0) // 2
    return wave.index_select(-1, torch.remainder(torch.arange(n, device=wave.device) + start, size))


def frame_geometry(sample_rate: int, win_ms: float, hop_ms: float, seconds: float) -> tuple[int, int, int, int, int]:
    """Return ``(win_length, hop_length, n_fft, n_samples, frames)`` for the fixed-length STFT.

    ``n_fft`` is the next power of two >= the window; ``frames = n_samples // hop_length``
    (the centred STFT yields one more frame, the last one is dropped), e.g. 3 s at a
    10 ms hop gives 300 frames.
    """
    win = int(round(sample_rate * win_ms / 1000.0))
    hop = int(round(sample_rate * hop_ms / 1000.0))
    n_fft = 1
    while n_fft < win:
        n_fft *= 2
    n_samples = int(round(seconds * sample_rate))
    if win < 1 or hop < 1 or n_samples < n_fft:
        raise ValueError("window, hop and segment must be positive and the segment at least one FFT long")
    return win, hop, n_fft, n_samples, n_samples // hop


def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> Tensor:
    """(n_fft // 2 + 1, n_mels) triangular HTK mel filters, 0 Hz to sample_rate // 2, unnormalised (torchaudio
    MelSpectrogram's defaults)."""
    return torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, float(sample_rate // 2), n_mels, sample_rate,
                                                 norm=None, mel_scale="htk")


class LogMel(nn.Module):
    """Log-mel power spectrogram with a fixed frame count.

    ``forward(wave[B, samples]) -> [B, 1, n_mels, frames]`` with values ``log(mel_power + 1e-6)``
    (natural log; digital silence gives log(1e-6) ~ -13.8). 25 ms Hann window, 10 ms hop,
    FFT size = next power of two, HTK mel scale 0-8 kHz.

    Crop/pad policy, on the waveform before the STFT: longer input -> centred crop of
    ``seconds``; shorter input -> repeat (tile) the waveform until it fills ``seconds``.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mels: int = 64,
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
        seconds: float = 3.0,
    ) -> None:
        super().__init__()
        win, hop, n_fft, n_samples, frames = frame_geometry(sample_rate, win_ms, hop_ms, seconds)
        self.sample_rate = sample_rate
        self.n_samples = n_samples
        self.frames = frames
        self.spectrogram = PowerSpectrogram.centred(torch.hann_window(win), n_fft, hop)
        self.register_buffer("mel_fb", mel_filters(sample_rate, n_fft, n_mels), persistent=False)
        self.output_shape = (1, n_mels, frames)
        self.kind = "sequence"

    def forward(self, wave: Tensor) -> Tensor:
        x = fix_length(wave.to(torch.float32), self.n_samples)
        mel = torch.matmul(self.spectrogram(x)[:, : self.frames], self.mel_fb).transpose(1, 2)
        return torch.log(mel + 1e-6).unsqueeze(1)
