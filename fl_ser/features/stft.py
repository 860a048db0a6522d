"""The extractors' one short-time power spectrum: frames times a fixed DFT basis (two matmuls), no FFT op.

A frame's one-sided DFT is a product with cosine (real) and sine (imaginary) kernels, so the spectrogram is
plain framing and matrix products: it exports to ONNX and ExecuTorch as Slice, Concat and MatMul (ONNX Runtime's STFT
op was ~10x slower) and gives torch.stft's values to float32 rounding. The windows are symmetric, so each
frame is first folded about the window's centre (sample pairs added for the cosines, subtracted for the
sines): half the multiply-adds of a ``conv1d`` with the full basis, the same power (the centre's phase factor
has modulus 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def frames(x: Tensor, span: int, hop: int, n: int) -> Tensor:
    """``(B, L) -> (B, n, span)``, frame ``t`` = ``x[:, t * hop : t * hop + span]`` (``L >= (n - 1) * hop + span``).

    Built from ``hop``-sample blocks with slices and one cat, not ``Tensor.unfold``: ONNX export turns unfold into a
    Gather, which was 40 % of the functionals' time in ONNX Runtime; a Concat of slices is a copy.
    """
    k = (span + hop - 1) // hop  # blocks a frame touches
    blocks = F.pad(x, (0, k * hop))[:, : (n + k - 1) * hop].reshape(x.shape[0], n + k - 1, hop)
    return torch.cat([blocks[:, i : i + n] for i in range(k)], dim=-1)[:, :, :span]


class PowerSpectrogram(nn.Module):
    """``forward(wave[B, L]) -> power[B, T, n_fft // 2 + 1]``, ``|DFT_n_fft(frame * window)|^2`` per frame.

    Frame ``t`` is ``n_fft`` samples from ``t * hop`` of the padded wave (``pad`` = (left, right) samples,
    ``pad_mode`` "constant" (zeros) or "reflect"), and ``window`` (its length <= n_fft, normalised as the caller
    wants) sits at ``window_offset`` inside it, zeros elsewhere; ``T = 1 + (L + left + right - n_fft) // hop``.
    ``torch.stft(center=True)`` is ``pad = (n_fft // 2, n_fft // 2)``, ``pad_mode="reflect"``,
    ``window_offset = (n_fft - len(window)) // 2`` (:meth:`centred`). With ``remove_mean``, each frame's
    samples under the window lose their mean first (as for an autocorrelation). The window must be symmetric
    once its zero ends are dropped (symmetric windows, and periodic ones such as ``torch.hann_window``'s).
    """

    __constants__ = ("n_fft", "hop", "n_bins", "span", "start", "half", "pad_left", "pad_right", "pad_mode",
                     "remove_mean")

    def __init__(self, window: Tensor, n_fft: int, hop: int, pad: tuple[int, int], pad_mode: str = "constant",
                 window_offset: int = 0, remove_mean: bool = False) -> None:
        super().__init__()
        w = window.to(torch.float64)
        nonzero = torch.nonzero(w).flatten()
        if nonzero.numel() == 0 or not 0 <= window_offset <= n_fft - w.numel() or hop < 1:
            raise ValueError(f"PowerSpectrogram: a window of {w.numel()} (not all zeros) must fit in n_fft={n_fft} "
                             f"at offset {window_offset}, and hop >= 1 (got {hop})")
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"PowerSpectrogram: pad_mode must be 'constant' or 'reflect', not {pad_mode!r}")
        w = w[int(nonzero[0]) : int(nonzero[-1]) + 1]  # the taps that read samples
        if remove_mean and w.numel() != window.numel():
            raise ValueError("PowerSpectrogram: remove_mean needs a window without zero ends (the mean is taken "
                             "over the window's samples)")
        if not torch.allclose(w, w.flip(0), rtol=0.0, atol=1e-6 * float(w.abs().max())):  # float32 rounding
            raise ValueError("PowerSpectrogram: the window must be symmetric (after dropping its zero ends)")
        self.n_fft, self.hop, self.n_bins = int(n_fft), int(hop), int(n_fft) // 2 + 1
        self.span = int(w.numel())  # samples each frame reads, from `start` on
        self.start = int(window_offset) + int(nonzero[0])
        self.half = (self.span + 1) // 2  # folded length (an odd span's centre sample is folded onto itself)
        self.pad_left, self.pad_right, self.pad_mode = int(pad[0]), int(pad[1]), pad_mode
        self.remove_mean = bool(remove_mean)
        # fold j pairs samples j and span-1-j, at distance u_j = (span-1)/2 - j from the centre
        u = (self.span - 1) / 2.0 - torch.arange(self.half, dtype=torch.float64)
        k = torch.arange(self.n_bins, dtype=torch.float64).unsqueeze(0)
        angle = 2.0 * math.pi * torch.remainder(u.unsqueeze(1) * k, self.n_fft) / self.n_fft
        taps = w[: self.half].clone().unsqueeze(1)
        if self.span % 2:
            taps[-1] *= 0.5  # the centre sample is added to itself
        self.register_buffer("cos_basis", (torch.cos(angle) * taps).float(), persistent=False)  # (half, K)
        self.register_buffer("sin_basis", (torch.sin(angle) * taps).float(), persistent=False)

    @classmethod
    def centred(cls, window: Tensor, n_fft: int, hop: int) -> PowerSpectrogram:
        """``torch.stft(center=True, pad_mode="reflect", onesided=True)``'s frames (torchaudio's Spectrogram)."""
        return cls(window, n_fft, hop, (n_fft // 2, n_fft // 2), "reflect", (n_fft - window.numel()) // 2)

    def forward(self, wave: Tensor) -> Tensor:
        x = F.pad(wave.unsqueeze(1), (self.pad_left, self.pad_right), mode=self.pad_mode).squeeze(1)
        n = 1 + (x.shape[-1] - self.n_fft) // self.hop
        f = frames(x[:, self.start :], self.span, self.hop, n)
        if self.remove_mean:
            f = f - f.mean(-1, keepdim=True)
        head = f[:, :, : self.half]
        tail = f[:, :, self.span - self.half :].flip(-1)
        re = torch.matmul(tail + head, self.cos_basis)
        im = torch.matmul(tail - head, self.sin_basis)
        return re * re + im * im
