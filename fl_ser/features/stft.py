"""The extractors' one short-time power spectrum, by FFT where the runtime has one and by DFT matmuls where not.

Two ways to the same values (float32 rounding apart), chosen per module by ``portable``:

* FFT (the default: torch eager, TorchScript, ``torch.export``'s ``.pt2``): strided frames times the window,
  ``torch.fft.rfft`` (pocketfft: 0.11 ms for 301 frames of 512 on one core). Frames are laid out as ``torch.stft``
  lays them out, so the values are the earlier ``torch.stft`` / ``torch.fft.rfft`` implementations' to the bit
  or within float32 rounding (``tests/test_feature_parity.py``).
* DFT by matmul (the portable graph, :func:`portable`: for the ONNX and ExecuTorch exports): ONNX Runtime's DFT
  op took 2.6 ms for those frames, its STFT op ~10x more, and ExecuTorch has no complex dtype. The DFT is factored
  once, as in the "four-step" FFT (Cooley and Tukey 1965; Bailey 1990): with ``n_fft = N1 * N2``, sample
  ``n = n1 + N1 * n2`` and bin ``k = k2 + N2 * k1``, a first matmul takes the length-``N2`` DFTs over ``n2`` (only
  ``k2 <= N2 / 2``: the input is real), a second, batched over ``k2``, the length-``N1`` DFTs over ``n1`` with the
  twiddle factors folded into its matrices. Bins above ``n_fft / 2`` of that grid are the mirrors of the ones
  below (same power), which the second matmul's column order puts where a reshape finds them. For 301 frames of
  400 samples in 512 it is 9.3 M multiply-adds against 31 M for a DFT matrix (even folded about the window's
  centre), and it runs as MatMul, Reshape, Transpose and Slice in ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The factored DFT's second-stage length (module docstring): 16 balances the two matmuls for n_fft = 512.
N1 = 16


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
    ``window_offset = (n_fft - len(window)) // 2`` (:meth:`centred`). ``n_fft`` must be a multiple of
    ``2 * N1`` (32; see the module docstring).

    ``forward`` is :meth:`power` of :meth:`framed`: a caller that needs the frames themselves (energies, or
    frames changed before the transform, such as mean-removed ones) takes them from :meth:`framed` and
    transforms them with :meth:`power`.
    """

    __constants__ = ("n_fft", "hop", "n_bins", "width", "pad_left", "pad_right", "pad_mode", "unit_window",
                     "portable", "n1", "n2", "rows")

    def __init__(self, window: Tensor, n_fft: int, hop: int, pad: tuple[int, int], pad_mode: str = "constant",
                 window_offset: int = 0) -> None:
        super().__init__()
        w = window.to(torch.float64)
        nonzero = torch.nonzero(w).flatten()
        if nonzero.numel() == 0 or not 0 <= window_offset <= n_fft - w.numel() or hop < 1 or n_fft % (2 * N1):
            raise ValueError(f"PowerSpectrogram: a window of {w.numel()} (not all zeros) must fit in n_fft={n_fft} "
                             f"at offset {window_offset}, n_fft must be a multiple of {2 * N1}, and hop >= 1 "
                             f"(got {hop})")
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"PowerSpectrogram: pad_mode must be 'constant' or 'reflect', not {pad_mode!r}")
        self.n_fft, self.hop, self.n_bins = int(n_fft), int(hop), int(n_fft) // 2 + 1
        # the samples of a frame that framed() keeps: up to the window's last nonzero tap (the rest meet zeros)
        self.width = int(window_offset) + int(nonzero[-1]) + 1
        self.pad_left, self.pad_right, self.pad_mode = int(pad[0]), int(pad[1]), pad_mode
        taps = F.pad(w, (int(window_offset), 0))[: self.width]  # zeros up to the window's offset (torch.stft's frame)
        self.unit_window = bool(torch.all(taps == 1.0))  # a rectangular window from the frame's start: no multiply
        self.register_buffer("window", taps.float(), persistent=False)
        self.portable = False  # True: the portable graph, the DFT by matmuls (see portable())
        # the factored DFT (module docstring): n = n1 + N1 n2, k = k2 + N2 k1
        self.n1, self.n2 = N1, self.n_fft // N1
        self.rows = -(-self.width // N1)  # values of n2 that meet samples
        k2 = torch.arange(self.n2 // 2 + 1, dtype=torch.float64)
        angle = 2.0 * math.pi * torch.outer(k2, torch.arange(self.rows, dtype=torch.float64)) / self.n2
        # first stage, rows (re, im) per k2 <= N2/2: (2 (N2/2 + 1), rows). It multiplies from the left: ONNX
        # Runtime's 5-d Transpose that a right-hand product needs afterwards took 0.6 ms.
        first = torch.stack([torch.cos(angle), -torch.sin(angle)], dim=1).flatten(0, 1)
        self.register_buffer("first_stage", first.float(), persistent=False)
        # second stage, per k2: [re, im] (2 N1) -> [re, im] of bins k2 + N2 k1, for k1 = 0 .. N1/2 - 1 (bins below
        # n_fft / 2) and then k1 = N1 - 1 .. N1/2 (above: the mirrors of bins (N2 - k2) + N2 (N1 - 1 - k1))
        k1 = torch.tensor(list(range(N1 // 2)) + list(range(N1 - 1, N1 // 2 - 1, -1)), dtype=torch.float64)
        n1 = torch.arange(N1, dtype=torch.float64)
        theta = 2.0 * math.pi * torch.remainder(n1[None, :, None] * (k2[:, None, None] + self.n2 * k1[None, None, :]),
                                                self.n_fft) / self.n_fft  # (N2/2 + 1, N1, N1)
        re, im = torch.cos(theta), -torch.sin(theta)
        second = torch.cat([torch.cat([re, im], dim=2), torch.cat([-im, re], dim=2)], dim=1)  # (.., 2 N1, 2 N1)
        self.register_buffer("second_stage", second.float(), persistent=False)
        # power(natural=False)'s columns, (k2, column) of the second stage: the bin each holds (-1: a bin held twice)
        cell_k2 = torch.arange(self.n2 // 2 + 1).repeat_interleave(N1)
        column = torch.arange(N1).repeat(self.n2 // 2 + 1)
        upper = column >= N1 // 2
        bins = torch.where(upper, torch.remainder(-(cell_k2 + self.n2 * (N1 - 1 - (column - N1 // 2))), self.n_fft),
                           cell_k2 + self.n2 * column)
        held = ~upper | ((cell_k2 >= 1) & (cell_k2 < self.n2 // 2)) | (bins == self.n_fft // 2)
        self.grid_bins = torch.where(held, bins, -1).tolist()

    @classmethod
    def centred(cls, window: Tensor, n_fft: int, hop: int) -> PowerSpectrogram:
        """``torch.stft(center=True, pad_mode="reflect", onesided=True)``'s frames (torchaudio's Spectrogram)."""
        return cls(window, n_fft, hop, (n_fft // 2, n_fft // 2), "reflect", (n_fft - window.numel()) // 2)

    def framed(self, wave: Tensor) -> Tensor:
        """``(B, L) -> (B, T, width)``: the first ``width`` samples of each frame (the others meet zero taps). Torch's
        graph returns a strided view, the portable one copies (see :func:`frames`)."""
        x = F.pad(wave.unsqueeze(1), (self.pad_left, self.pad_right), mode=self.pad_mode).squeeze(1)
        n = 1 + (x.shape[-1] - self.n_fft) // self.hop
        if self.portable:
            return frames(x, self.width, self.hop, n)
        return x.unfold(-1, self.width, self.hop)[:, :n]

    def power(self, f: Tensor, natural: bool = True) -> Tensor:
        """``(B, T, width)`` frames (from :meth:`framed`) -> ``(B, T, n_bins)`` power, contiguous.

        ``natural=False`` lets the portable graph keep its own order of the bins, ``(B, T, cells)`` (the bin in
        each: :meth:`to_cells`), for callers that only take weighted sums of them: one copy less.
        """
        g = f if self.unit_window else f * self.window
        if not self.portable:
            parts = torch.view_as_real(torch.fft.rfft(g, n=self.n_fft)).square()  # re^2, im^2 side by side
            return parts[:, :, :, 0] + parts[:, :, :, 1]  # 25 % faster than s * s.conj(), 7x than .sum(-1)
        b, t, n1, half, h2 = f.shape[0], f.shape[1], self.n1, self.n1 // 2, self.n2 // 2 + 1
        g = F.pad(g, (0, self.rows * n1 - self.width)).reshape(b, t, self.rows, n1)  # (B, T, n2, n1)
        first = torch.matmul(self.first_stage, g).reshape(b, t, h2, 2 * n1).transpose(1, 2)  # (B, k2, T, [re, im])
        x = torch.matmul(first, self.second_stage)  # (B, k2, T, [re, im] of the columns above)
        re = x[:, :, :, :n1]
        im = x[:, :, :, n1:]
        p = re * re + im * im  # (B, N2/2 + 1, T, N1) power
        if not natural:
            return p.transpose(1, 2).reshape(b, t, h2 * n1)
        below = p[:, :, :, :half]  # bins k2 + N2 k1, k2 = 0 .. N2/2
        above = p[:, 1 : self.n2 // 2, :, half:].flip(1)  # bins k2 + N2 k1, k2 = N2/2 + 1 .. N2 - 1 (mirrored)
        grid = torch.cat([below, above], dim=1).permute(0, 2, 3, 1).reshape(b, t, self.n_fft // 2)
        return torch.cat([grid, p[:, 0, :, n1 - 1 :]], dim=-1)  # and bin n_fft / 2 (k2 = 0, k1 = N1 / 2)

    def to_cells(self, weights: Tensor) -> Tensor:
        """Weights over the bins, ``(n_bins, m)``, as weights over :meth:`power`'s ``natural=False`` columns."""
        out = weights.new_zeros(len(self.grid_bins), weights.shape[1])
        for cell, k in enumerate(self.grid_bins):
            if k >= 0:
                out[cell] = weights[k]
        return out

    def forward(self, wave: Tensor) -> Tensor:
        return self.power(self.framed(wave))


@contextlib.contextmanager
def portable(module: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, every submodule of ``module`` with a ``portable`` setting (:class:`PowerSpectrogram`, the
    extractors) runs its portable graph: DFT matmuls instead of FFTs, and the other ops that ONNX Runtime and
    ExecuTorch run fast instead of torch's (see each module). Trace exports inside the block; each module's
    setting is restored on leaving it. ``enabled=False`` runs the block in torch's graph instead.
    """
    found = [m for m in module.modules() if isinstance(getattr(m, "portable", None), bool)]
    before = [m.portable for m in found]
    for m in found:
        m.portable = enabled
    try:
        yield module
    finally:
        for m, setting in zip(found, before, strict=True):
            m.portable = setting
