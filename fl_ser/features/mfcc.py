"""MFCCs with delta and delta-delta stacked as three channels, fixed frame count.

Uses the same crop/pad policy as :mod:`fl_ser.features.logmel` (centred crop if longer,
tile if shorter, on the waveform before the STFT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from fl_ser.features.logmel import fix_length, frame_geometry, mel_filters
from fl_ser.features.stft import PowerSpectrogram


def deltas(c: Tensor) -> Tensor:
    """5-frame regression deltas over the last dim, edges replicated: torchaudio's ``compute_deltas(c, 5)``
    without its grouped conv1d (whose group count, channels x batch, ONNX export cannot take from the input)."""
    p = F.pad(c, (2, 2), mode="replicate")
    return (p[..., 3:-1] - p[..., 1:-3] + 2.0 * (p[..., 4:] - p[..., :-4])) / 10.0


class MFCCDeltas(nn.Module):
    """MFCC + delta + delta-delta: ``forward(wave[B, samples]) -> [B, 3, n_mfcc, frames]``.

    Channel 0: MFCC 0..n_mfcc-1 (orthonormal DCT-II of ``log(mel_power + 1e-6)``, HTK mel
    scale, n_mels bands 0-8 kHz, 25 ms Hann window, 10 ms hop); channel 1: deltas
    (5-frame regression); channel 2: deltas of the deltas. Deltas are computed before the
    last STFT frame is dropped. The natural-log mel (no ``top_db`` clipping) keeps every
    utterance independent of the others in the batch.

    Crop/pad policy, on the waveform before the STFT: longer input -> centred crop of
    ``seconds``; shorter input -> repeat (tile) the waveform until it fills ``seconds``.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mfcc: int = 20,
        n_mels: int = 40,
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
        seconds: float = 3.0,
    ) -> None:
        super().__init__()
        win, hop, n_fft, n_samples, frames = frame_geometry(sample_rate, win_ms, hop_ms, seconds)
        self.sample_rate = sample_rate
        self.n_samples = n_samples
        self.frames = frames
        if n_mfcc > n_mels:
            raise ValueError(f"MFCCDeltas: n_mfcc={n_mfcc} exceeds n_mels={n_mels}")
        self.spectrogram = PowerSpectrogram.centred(torch.hann_window(win), n_fft, hop)
        self.register_buffer("mel_fb", mel_filters(sample_rate, n_fft, n_mels), persistent=False)
        self.register_buffer("dct", torchaudio.functional.create_dct(n_mfcc, n_mels, norm="ortho"), persistent=False)
        self.output_shape = (3, n_mfcc, frames)
        self.kind = "sequence"

    def forward(self, wave: Tensor) -> Tensor:
        x = fix_length(wave.to(torch.float32), self.n_samples)
        mel = torch.matmul(self.spectrogram(x), self.mel_fb)
        c = torch.matmul(torch.log(mel + 1e-6), self.dct).transpose(1, 2)  # (B, n_mfcc, frames + 1)
        d1 = deltas(c)
        d2 = deltas(d1)
        return torch.stack([c, d1, d2], dim=1)[:, :, :, : self.frames]
