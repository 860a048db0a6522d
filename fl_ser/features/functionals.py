"""Utterance-level functionals for small devices, in the spirit of eGeMAPS.

Frame-level low-level descriptors (LLDs) are computed with batched tensor ops (no Python
loop over frames), then summarised by (masked) statistics over the utterance, after
Eyben et al. (2016), "The Geneva Minimalistic Acoustic Parameter Set (GeMAPS) for Voice
Research and Affective Computing", IEEE Trans. Affective Computing 7(2). This is a
lightweight re-implementation, not a bit-exact eGeMAPS: F0 comes from a normalised
cross-correlation (NCCF) tracker, loudness is frame energy in dBFS, jitter/shimmer and
slopes are frame-wise proxies, and there are no formants.

Framing: 10 ms hop; 25 ms frames (Hann-windowed for the spectrum, raw for energy and ZCR)
and 40 ms frames for pitch (on a copy low-pass filtered and decimated to 8 kHz), all centred
on ``t * hop`` (zero padded at the edges), so an utterance of ``L`` samples gives
``L // hop + 1`` frames. Inputs shorter than one 25 ms frame are zero padded to it.

Two graphs compute the same values (``portable``, set by :func:`fl_ser.features.stft.portable`): torch's
(FFTs, ``cumsum``, strided frames: eager, TorchScript, ``.pt2``; what devices train on, and within 1e-5
of the extractor's earlier outputs) and the portable one for ONNX Runtime and ExecuTorch, which has no
FFT and whose CumSum, Gather and broadcasting ops are slow: spectra by factored DFT matmuls, running sums
and the decimating filter by small matmuls, frame energies from blocks of the squared signal (within 6e-5;
``tests/test_feature_parity.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from fl_ser.features.stft import PowerSpectrogram


def _masked_mean_std(x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population std of ``x`` over the last dim where ``m`` (float 0/1); 0 if empty."""
    n = m.sum(-1).clamp_min(1.0)
    mean = (x * m).sum(-1) / n
    var = ((x - mean.unsqueeze(-1)).pow(2) * m).sum(-1) / n
    return mean, var.clamp_min(0.0).sqrt()


def _masked_percentiles(x: Tensor, m: Tensor, q: Tensor) -> Tensor:
    """Linear-interpolated percentiles ``q`` (in [0, 1]) of ``x`` over the last dim where ``m``.

    ``x, m``: (B, K, T), ``m`` bool; returns (B, K, len(q)); 0 where no frame is selected.
    """
    # topk of all, smallest first: sort's values; ExecuTorch 1.5.1 has no sort kernel
    s, _ = torch.topk(torch.where(m, x, torch.full_like(x, float("inf"))), x.shape[-1], dim=-1, largest=False)
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    n = m.sum(-1, keepdim=True).to(x.dtype)  # (B, K, 1)
    pos = (n - 1.0).clamp_min(0.0) * q  # (B, K, Q)
    lo = pos.floor()
    hi = pos.ceil()
    v_lo = s.gather(-1, lo.long())
    v_hi = s.gather(-1, hi.long())
    return v_lo + (v_hi - v_lo) * (pos - lo)


def _prefix_sums(x: Tensor, within: Tensor, across: Tensor) -> Tensor:
    """``torch.cumsum(x, -1)`` of ``x`` (B, T, N) as small matmuls: sums inside blocks of ``b`` values (``within``:
    (b, b), ones on and above the diagonal), plus the sum of the blocks before each value (``across``: (N / b, N),
    ones where the value's block comes after). ONNX Runtime's CumSum took 0.3 ms for the pitch frames and its
    broadcasting Add over blocks 0.15 ms; these ~3 M multiply-adds a fraction of that. ``N`` must be a multiple of
    ``b``.
    """
    b = within.shape[0]
    blocks = x.reshape(x.shape[0], x.shape[1], -1, b)  # (B, T, N / b, b)
    return torch.matmul(blocks, within).flatten(2) + torch.matmul(blocks.sum(-1), across)


def _running_max(x: Tensor, radius: int, portable: bool) -> Tensor:
    """``(B, T) -> (B, T)``: the maximum over frames ``t - radius .. t + radius`` (those inside the utterance).

    The portable graph takes maxima of shifted slices over doubling windows: ``Tensor.unfold`` exports as a
    Gather (slow in ONNX Runtime). Not ``max_pool1d``: ``torch.export`` fixes its input length.
    """
    width = 2 * radius + 1
    m = F.pad(x, (radius, radius), value=-math.inf)
    if not portable:
        return m.unfold(1, width, 1).amax(-1)
    span = 1  # m[:, i] is the maximum of the padded x[i : i + span]
    while 2 * span <= width:
        m = torch.maximum(m[:, :-span], m[:, span:])
        span *= 2
    if span < width:
        m = torch.maximum(m[:, : m.shape[1] - (width - span)], m[:, width - span :])
    return m


def _frame_sums(per_sample: Tensor, width: int, hop: int, n: int) -> Tensor:
    """Sums of ``per_sample`` (B, L) over the frames ``[t * hop, t * hop + width)``, ``t < n`` (zeros past the end),
    from sums over blocks of ``gcd(width, hop)`` samples: one pass over the signal instead of over overlapping
    frames. Counts (0/1 samples) come out exact."""
    g = math.gcd(width, hop)
    total = (n - 1) * hop + width
    blocks = F.pad(per_sample, (0, width))[:, :total].reshape(per_sample.shape[0], -1, g).sum(-1)
    step = hop // g
    out = blocks[:, 0 : (n - 1) * step + 1 : step]
    for i in range(1, width // g):
        out = out + blocks[:, i : i + (n - 1) * step + 1 : step]
    return out


def _segment_lengths(on: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Runs of True in ``on`` (N, T) bool: (count (N,), mean length (N,), std length (N,)) in frames."""
    n, t = on.shape
    prev = torch.cat([torch.zeros_like(on[:, :1]), on[:, :-1]], dim=1)
    starts = on & ~prev
    seg_id = torch.cumsum(starts.long(), dim=1) * on.long()  # 1-based id inside runs, 0 outside
    lengths = torch.zeros(n, t + 1, dtype=torch.float32, device=on.device)
    lengths = lengths.scatter_add(1, seg_id, on.to(torch.float32))[:, 1:]
    count = starts.sum(1).to(torch.float32)
    valid = (torch.arange(1, t + 1, device=on.device).unsqueeze(0).to(torch.float32) <= count.unsqueeze(1)).to(
        torch.float32
    )
    mean, std = _masked_mean_std(lengths, valid)
    return count, mean, std


class Functionals(nn.Module):
    """eGeMAPS-like functional vector: ``forward(wave[B, samples]) -> [B, D]`` with D = 74.

    LLDs (per 10 ms frame):

    * ``f0``: semitones re 27.5 Hz. NCCF over a 40 ms frame of the signal decimated to
      8 kHz (15-tap Hann-windowed half-band low-pass), lags for 60-500 Hz, numerator the
      inverse DFT of the frame's power spectrum (:mod:`fl_ser.features.stft`), denominators
      from cumulative frame energies; the chosen lag is the first local NCCF
      maximum reaching 90 % of the highest one (guards against octave-down errors), refined
      by parabolic interpolation. Voiced = NCCF peak >= ``voicing_threshold`` and the frame
      is *active* (loudness within 40 dB of the utterance maximum and above -70 dBFS);
      isolated single voiced frames are dropped.
    * ``loudness``: 10 log10(mean square) of the raw 25 ms frame, dBFS (floor -100 dB).
    * ``hnr``: 10 log10(r / (1 - r)) from the NCCF peak r, dB (range about +-40 dB).
    * ``jitter``: |F0_t - F0_{t-1}| / F0_{t-1} over consecutive voiced frames (ratio).
    * ``shimmer``: |A_t - A_{t-1}| / A_{t-1}, A = frame RMS, consecutive voiced frames (ratio).
    * ``f0_rise``/``f0_fall``: positive / negated negative frame-to-frame F0 change over
      consecutive voiced frames, semitones per second.
    * ``loud_rise``/``loud_fall``: same for 50 ms-smoothed loudness over consecutive active
      frames, dB per second.
    * ``alpha``: 10 log10(E[50, 1000) Hz / E[1000, 5000) Hz), dB.
    * ``hammarberg``: 10 log10(max P[0, 2000) Hz / max P[2000, 5000) Hz), dB.
    * ``slope0_500``, ``slope500_1500``: least-squares slope of the dB power spectrum in
      [0, 500] Hz and [500, 1500] Hz, dB per kHz.
    * ``centroid``: spectral centroid, Hz.
    * ``flux``: L2 distance between consecutive L2-normalised magnitude spectra (0..sqrt 2).
    * ``zcr``: fraction of adjacent sample pairs changing sign in the 25 ms frame (0..1).
    * ``mfcc1``..``mfcc8``: orthonormal DCT of log mel power (26 bands 0-8 kHz), no c0.

    Functionals, in output order (see ``names``):

    1. ``f0_st`` (voiced) and ``loudness_db`` (all frames): mean, std, p20, p50, p80,
       p80 - p20 (percentiles linearly interpolated over the selected frames).
    2. mean and std of: hnr (voiced), jitter, shimmer, f0_rise, f0_fall (voiced pairs),
       loud_rise, loud_fall (active pairs), alpha/hammarberg/slope0_500/slope500_1500 over
       voiced frames and over unvoiced-active frames (suffix ``_v`` / ``_uv``), centroid
       (active), flux (active pairs and voiced pairs), zcr (active), mfcc1..8 (active).
    3. temporal: ``voiced_fraction`` (voiced / active frames), ``equivalent_sound_level_db``
       (10 log10 of the mean frame mean square, dBFS), ``loudness_peaks_per_s`` (active
       frames where the 50 ms-smoothed loudness is the maximum within +-100 ms and at least
       3 dB above the minimum within +-200 ms; a syllable-rate proxy),
       ``voiced_segments_per_s``, ``voiced_segment_len_{mean,std}_s`` and
       ``unvoiced_segment_len_{mean,std}_s`` (pauses between voiced segments; leading and
       trailing unvoiced stretches are not counted), seconds.

    Every statistic over an empty selection is 0, so silence and noise give finite vectors.
    """

    # scalar settings become TorchScript constants (folded into the graph, no attribute lookups)
    __constants__ = (
        "sample_rate", "voicing_threshold", "hop", "win", "n_fft", "decim", "pitch_sr", "phop", "pwin",
        "min_lag", "max_lag", "p_fft", "hb_k", "hb_center", "hb_taps", "n_mfcc", "ham_split", "ham_stop",
        "slope_stop", "active_row", "portable",
    )  # fmt: skip

    def __init__(self, sample_rate: int = 16000, voicing_threshold: float = 0.5, n_mfcc: int = 8) -> None:
        super().__init__()
        sr = int(sample_rate)
        self.sample_rate = sr
        self.voicing_threshold = float(voicing_threshold)
        self.hop = int(round(0.010 * sr))
        self.win = int(round(0.025 * sr))
        self.n_fft = 1 << (self.win - 1).bit_length()
        # pitch runs on a copy decimated by 2 (8 kHz for 16 kHz input; F0 <= 500 Hz needs no more)
        self.decim = 2 if sr >= 16000 else 1
        psr = sr / self.decim
        self.pitch_sr = float(psr)
        self.phop = self.hop // self.decim
        self.pwin = int(round(0.040 * psr))
        self.min_lag = int(math.floor(psr / 500.0))
        self.max_lag = int(math.ceil(psr / 60.0))
        self.p_fft = 1 << (self.pwin + self.max_lag + 1).bit_length()
        # 15-tap Hann-windowed half-band low-pass (odd taps only, besides the centre), applied
        # polyphase with shifted slices: far cheaper than a 1-channel conv1d on CPU.
        self.hb_k = 4
        odd = torch.arange(1, 2 * self.hb_k, 2, dtype=torch.float64)
        win = torch.cos(math.pi * odd / (4 * self.hb_k)).pow(2)  # Hann taper, zero at +-4K
        taps = 0.5 * torch.sinc(odd / 2) * win
        norm = 0.5 + 2 * float(taps.sum())
        self.hb_center = 0.5 / norm
        self.hb_taps = [float(t) / norm for t in taps]
        # the same filter as one matmul (the portable graph): output samples 8j .. 8j+7 from input blocks j and j+1
        # of 16 samples (the input shifted by 8), x[2m + d] at row 2 (m - 8j) + d + 8 of column m - 8j
        decimate = torch.zeros(32, 8, dtype=torch.float64)
        for o in range(8):
            decimate[2 * o + 8, o] = self.hb_center
            for i, h in enumerate(self.hb_taps):
                decimate[2 * o + 8 + 2 * i + 1, o] = decimate[2 * o + 8 - 2 * i - 1, o] = h
        self.register_buffer("decimate", decimate.float(), persistent=False)
        self.portable = False  # True: the graph for ONNX Runtime and ExecuTorch (fl_ser.features.stft.portable)
        self.n_mfcc = int(n_mfcc)
        n_bins = self.n_fft // 2 + 1
        freqs = torch.arange(n_bins, dtype=torch.float64) * sr / self.n_fft

        window = torch.hann_window(self.win, periodic=True, dtype=torch.float64)
        # the 25 ms frames of the energy/ZCR framing, unit-energy window, zero padded to n_fft at the end
        half = self.win // 2
        self.spectrogram = PowerSpectrogram(window / window.pow(2).sum().sqrt(), self.n_fft, self.hop,
                                            (half, self.win - half + self.n_fft - self.win))
        assert self.spectrogram.width == self.win  # its frames are the raw 25 ms frames too (energies)
        # pitch frames (raw, mean removed) and the lags of their linear autocorrelation: irfft of the power
        # spectrum at lags min_lag - 1 .. max_lag + 1 (one extra on each side of the search range)
        phalf = self.pwin // 2
        self.pitch_spectrogram = PowerSpectrogram(torch.ones(self.pwin, dtype=torch.float64), self.p_fft, self.phop,
                                                  (phalf, self.pwin - phalf + self.p_fft - self.pwin))
        k = torch.arange(self.p_fft // 2 + 1, dtype=torch.float64).unsqueeze(1)
        lags = torch.arange(self.min_lag - 1, self.max_lag + 2, dtype=torch.float64)
        fold = torch.full_like(k, 2.0)
        fold[0] = fold[-1] = 1.0  # DC and Nyquist appear once in the full spectrum, the others twice
        lag_w = fold * torch.cos(2.0 * math.pi * torch.remainder(k * lags, self.p_fft) / self.p_fft) / self.p_fft
        # (portable graph only) over the pitch spectrogram's own order of the bins: power(natural=False)
        self.register_buffer("lag_w", self.pitch_spectrogram.to_cells(lag_w).float(), persistent=False)

        def band(lo: float, hi: float) -> Tensor:
            return ((freqs >= lo) & (freqs < hi)).to(torch.float64)

        # columns: alpha low band, alpha high band, centroid numerator, total power
        band_w = torch.stack([band(50, 1000), band(1000, 5000), freqs, torch.ones_like(freqs)], dim=1)
        bin_hz = sr / self.n_fft
        self.ham_split = int(math.ceil(2000 / bin_hz))  # Hammarberg: bins [0, split) vs [split, stop)
        self.ham_stop = int(math.ceil(5000 / bin_hz))
        self.slope_stop = int(math.floor(1500 / bin_hz)) + 1  # slopes only look at bins <= 1500 Hz

        def slope_weights(lo: float, hi: float) -> Tensor:
            sel = (freqs >= lo) & (freqs <= hi)
            f_khz = freqs / 1000.0
            fc = torch.where(sel, f_khz - f_khz[sel].mean(), torch.zeros_like(f_khz))
            return fc / fc.pow(2).sum()

        slope_w = torch.stack([slope_weights(0, 500), slope_weights(500, 1500)], dim=1)[: self.slope_stop]
        self.register_buffer("slope_w", slope_w.float(), persistent=False)
        fbank = torchaudio.functional.melscale_fbanks(n_bins, 0.0, sr / 2.0, 26, sr, norm=None, mel_scale="htk")
        # one matmul gives the 4 band sums above and the 26 mel band energies
        self.register_buffer("band_w", torch.cat([band_w, fbank.to(torch.float64)], dim=1).float(), persistent=False)
        dct = torchaudio.functional.create_dct(self.n_mfcc + 1, 26, norm="ortho")
        self.register_buffer("dct", dct[:, 1:].contiguous().float(), persistent=False)

        self.register_buffer("quantiles", torch.tensor([0.2, 0.5, 0.8]), persistent=False)
        block = math.gcd(self.pwin, 16)  # the pitch frames' running energy, in blocks (see _prefix_sums)
        self.register_buffer("sum_within", torch.ones(block, block).triu(), persistent=False)
        later = torch.ones(self.pwin // block, self.pwin // block).triu(1)  # block j is after block i
        self.register_buffer("sum_across", later.repeat_interleave(block, dim=1), persistent=False)
        self.register_buffer("around", torch.arange(3), persistent=False)  # a lag and its two neighbours

        # The masked statistics run on one (B, T, rows) matrix of frame values and one of 0/1 masks: each row's
        # mask is one of the base masks built in forward() (in this order), picked by index.
        bases = ["voiced", "all", "v_pair", "f0_rise", "loud_rise", "f0_fall", "loud_fall", "unvoiced", "active",
                 "a_pair"]
        row_bases = ["voiced", "all", "voiced", "v_pair", "v_pair", "f0_rise", "f0_fall", "loud_rise", "loud_fall"]
        row_bases += ["voiced", "unvoiced"] * 4 + ["active", "a_pair", "v_pair", "active"] + ["active"] * self.n_mfcc
        pick = F.one_hot(torch.tensor([bases.index(b) for b in row_bases]), len(bases)).T.float().contiguous()
        self.register_buffer("row_base", pick, persistent=False)  # (bases, rows)
        self.active_row = row_bases.index("active")

        names: list[str] = []
        for base in ["f0_st", "loudness_db"]:
            names += [f"{base}_{s}" for s in ["mean", "std", "p20", "p50", "p80", "range20_80"]]
        rows = ["hnr_db_v", "jitter", "shimmer", "f0_rise_st_per_s", "f0_fall_st_per_s"]
        rows += ["loud_rise_db_per_s", "loud_fall_db_per_s"]
        for base in ["alpha_ratio_db", "hammarberg_db", "slope0_500_db_per_khz", "slope500_1500_db_per_khz"]:
            rows += [f"{base}_v", f"{base}_uv"]
        rows += ["centroid_hz", "flux", "flux_v", "zcr"]
        rows += [f"mfcc{i}" for i in range(1, self.n_mfcc + 1)]
        for r in rows:
            names += [f"{r}_mean", f"{r}_std"]
        names += [
            "voiced_fraction",
            "equivalent_sound_level_db",
            "loudness_peaks_per_s",
            "voiced_segments_per_s",
            "voiced_segment_len_mean_s",
            "voiced_segment_len_std_s",
            "unvoiced_segment_len_mean_s",
            "unvoiced_segment_len_std_s",
        ]
        self.names = names
        self.output_shape = (len(names),)
        self.kind = "vector"

    def _pitch(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """NCCF pitch: returns (F0 in Hz (B, T), peak NCCF (B, T)); F0 is meaningless where unvoiced."""
        if self.decim == 2 and self.portable:  # the half-band filter as a matmul over pairs of 16-sample blocks
            n_out = (x.shape[1] + 1) // 2
            n_blocks = (n_out + 7) // 8
            blocks = F.pad(x, (8, 16 * (n_blocks + 1) - 8 - x.shape[1])).reshape(x.shape[0], n_blocks + 1, 16)
            pairs = torch.cat([blocks[:, :-1], blocks[:, 1:]], dim=-1)
            x = torch.matmul(pairs, self.decimate).flatten(1)[:, :n_out]
        elif self.decim == 2:  # the half-band filter, polyphase: even and odd samples as two contiguous rows
            k = self.hb_k
            n_out = (x.shape[1] + 1) // 2
            phases = F.pad(x, (2 * k, 2 * k + x.shape[1] % 2)).reshape(x.shape[0], -1, 2).transpose(1, 2)
            phases = phases.contiguous()
            xe = phases[:, 0]
            xo = phases[:, 1]
            y = self.hb_center * xe[:, k : k + n_out]
            for i, h in enumerate(self.hb_taps):
                y = y + h * (xo[:, k + i : k + i + n_out] + xo[:, k - i - 1 : k - i - 1 + n_out])
            x = y
        pf = self.pitch_spectrogram.framed(x)
        pf = pf - pf.mean(-1, keepdim=True)  # (B, T', N) raw 40 ms frames, mean removed
        lo = self.min_lag - 1  # lags lo .. hi-1, one extra on each side of the search range
        hi = self.max_lag + 2
        if self.portable:  # (B, T', n_lags) linear autocorrelation: inverse DFT of the power
            ac = torch.matmul(self.pitch_spectrogram.power(pf, natural=False), self.lag_w)
        else:  # the power as the complex product itself: the inverse FFT takes it without a copy
            spectrum = torch.fft.rfft(pf, n=self.p_fft)
            ac = torch.fft.irfft(spectrum * spectrum.conj(), n=self.p_fft)[:, :, lo:hi]
        n = self.pwin
        if self.portable:  # see _prefix_sums
            cum = _prefix_sums(pf * pf, self.sum_within, self.sum_across)
        else:
            cum = torch.cumsum(pf.square(), dim=-1)
        e_head = cum[:, :, n - hi : n - lo].flip(-1)  # sum_{i < N - lag} x[i]^2
        e_tail = cum[:, :, -1:] - cum[:, :, lo - 1 : hi - 1]  # sum_{i >= lag} x[i]^2
        r = ac * torch.rsqrt((e_head * e_tail).clamp_min(1e-20))
        mid = r[:, :, 1:-1]
        is_max = (mid > r[:, :, :-2]) & (mid >= r[:, :, 2:])
        flag = is_max.to(torch.float32)
        best = (mid * flag + (flag - 1.0) * 2.0).amax(-1, keepdim=True)  # the highest local maximum; -2 if none
        cand = is_max & (mid >= 0.9 * best)
        idx = torch.argmax(cand.to(torch.int32), dim=-1, keepdim=True)  # first (shortest-lag) candidate
        ym, y0, yp = r.gather(-1, idx + self.around).unbind(-1)  # the peak's NCCF and its neighbours
        den = ym - 2.0 * y0 + yp
        den = torch.where(den.abs() > 1e-9, den, torch.full_like(den, -1e-9))
        delta = (0.5 * (ym - yp) / den).clamp(-0.5, 0.5)
        lag = (idx.squeeze(-1) + self.min_lag).to(torch.float32) + delta
        peak = (y0 - 0.25 * (ym - yp) * delta).clamp(-1.0, 1.0)
        peak = torch.where(best.squeeze(-1) > -1.5, peak, torch.zeros_like(peak))  # no local maximum at all
        return self.pitch_sr / lag, peak

    def forward(self, wave: Tensor) -> Tensor:
        x = wave.to(torch.float32)
        if x.shape[1] < self.win:
            x = F.pad(x, (0, self.win - x.shape[1]))
        hop_s = self.hop / self.sample_rate
        # ---- 25 ms frames: energy, zcr, spectrum
        n_frames = x.shape[1] // self.hop + 1
        wf = self.spectrogram.framed(x)  # (B, T, W) raw frames
        half = self.win // 2
        xp = F.pad(x, (half, self.win - half + self.hop))  # the frames' samples, and zeros after the last
        if self.portable:  # energies from blocks of the squared signal (ONNX Runtime's ReduceL2 over frames is slow)
            ms = _frame_sums(xp * xp, self.win, self.hop, n_frames) / self.win
        else:
            ms = torch.linalg.vector_norm(wf, dim=-1).pow(2) / self.win
        loud = 10.0 * torch.log10(ms + 1e-10)
        # sign changes between neighbours, over each frame's win - 1 pairs (zeros after the end change nothing)
        change = ((xp[:, 1:] * xp[:, :-1]) < 0).to(torch.float32)  # pair (j, j + 1) at j
        last = change[:, self.win - 1 :: self.hop][:, :n_frames]  # each frame's pair with the sample after it
        zcr = (_frame_sums(change, self.win, self.hop, n_frames) - last) / (self.win - 1)
        power = self.spectrogram.power(wf)  # (B, T, K)
        bands = torch.matmul(power, self.band_w)
        alpha = 10.0 * torch.log10((bands[:, :, 0] + 1e-10) / (bands[:, :, 1] + 1e-10))
        centroid = bands[:, :, 2] / (bands[:, :, 3] + 1e-10)
        ham_lo = power[:, :, : self.ham_split].amax(-1)
        ham_hi = power[:, :, self.ham_split : self.ham_stop].amax(-1)
        ham = 10.0 * torch.log10((ham_lo + 1e-10) / (ham_hi + 1e-10))
        slopes = torch.matmul(10.0 * torch.log10(power[:, :, : self.slope_stop] + 1e-10), self.slope_w)
        mfcc = torch.matmul(torch.log(bands[:, :, 4:] + 1e-10), self.dct)  # (B, T, n_mfcc)
        # flux between unit-norm magnitude spectra a, b: |a - b|^2 = 2 - 2 a.b
        mag = power.sqrt()
        dot = torch.linalg.vecdot(mag[:, 1:], mag[:, :-1])
        total = bands[:, :, 3]
        cos = dot / ((total[:, 1:] * total[:, :-1]).sqrt() + 1e-10)
        flux = torch.cat([torch.zeros_like(cos[:, :1]), (2.0 - 2.0 * cos).clamp_min(0.0).sqrt()], dim=1)

        # ---- masks
        active = (loud > loud.amax(-1, keepdim=True) - 40.0) & (loud > -70.0)
        f0_hz, nccf = self._pitch(x)
        f0_hz = f0_hz[:, :n_frames]  # the decimated framing may yield one extra frame
        nccf = nccf[:, :n_frames]
        raw_voiced = active & (nccf >= self.voicing_threshold)
        support = F.avg_pool1d(raw_voiced.to(torch.float32).unsqueeze(1), 3, 1, 1).squeeze(1)
        voiced = raw_voiced & (support > 0.5)  # drop isolated single voiced frames
        no = torch.zeros_like(voiced[:, :1])
        v_pair = voiced & torch.cat([no, voiced[:, :-1]], dim=1)  # voiced, and so was the frame before
        a_pair = active & torch.cat([no, active[:, :-1]], dim=1)

        # ---- frame-to-frame changes: each track minus its previous frame's value (the first frame's is 0)
        f0_st = torch.where(voiced, 12.0 * torch.log2(f0_hz / 27.5), torch.zeros_like(f0_hz))
        smooth = F.avg_pool1d(loud.unsqueeze(1), 5, 1, 2, count_include_pad=False).squeeze(1)
        tracks = torch.stack([f0_hz, ms.sqrt(), f0_st, smooth], dim=1)  # (B, 4, T); ms.sqrt() is the frame RMS
        before = torch.cat([tracks[:, :, :1], tracks[:, :, :-1]], dim=2)
        change = tracks - before
        jitter = change[:, 0].abs() / before[:, 0]
        shimmer = change[:, 1].abs() / (before[:, 1] + 1e-8)
        d_f0 = change[:, 2] / hop_s
        d_loud = change[:, 3] / hop_s
        r = nccf.clamp(1e-4, 1.0 - 1e-4)
        hnr = 10.0 * torch.log10(r / (1.0 - r))

        # ---- masked mean and std of every frame value (rows: see self.row_base), percentiles of f0 and loudness
        rows = torch.stack(
            [f0_st, loud, hnr, jitter, shimmer, d_f0.clamp_min(0.0), (-d_f0).clamp_min(0.0), d_loud.clamp_min(0.0),
             (-d_loud).clamp_min(0.0), alpha, alpha, ham, ham, slopes[:, :, 0], slopes[:, :, 0], slopes[:, :, 1],
             slopes[:, :, 1], centroid, flux, flux, zcr], dim=-1)  # fmt: skip
        values = torch.cat([rows, mfcc], dim=-1)  # (B, T, rows), finite for finite audio
        rising = torch.stack([d_f0 > 0, d_loud > 0], dim=-1)
        falling = torch.stack([d_f0 < 0, d_loud < 0], dim=-1)
        pairs = torch.stack([v_pair, a_pair], dim=-1)
        unvoiced = active & ~voiced
        bases = torch.stack([voiced, torch.ones_like(voiced), v_pair], dim=-1)
        bases = torch.cat([bases, pairs & rising, pairs & falling, torch.stack([unvoiced, active, a_pair], dim=-1)],
                          dim=-1)  # the order of the bases in __init__
        masks = torch.matmul(bases.to(torch.float32), self.row_base)  # (B, T, rows), a one-hot pick
        counts = masks.sum(1)
        n = counts.clamp_min(1.0)
        mean = (values * masks).sum(1) / n
        spread = (values - mean.unsqueeze(1)) * masks
        std = ((spread * spread).sum(1) / n).sqrt()
        q = _masked_percentiles(values[:, :, :2].transpose(1, 2), masks[:, :, :2].transpose(1, 2) > 0,
                                self.quantiles)  # (B, 2, 3)
        group1 = torch.stack([mean[:, :2], std[:, :2], q[:, :, 0], q[:, :, 1], q[:, :, 2], q[:, :, 2] - q[:, :, 0]],
                             dim=-1).flatten(1)
        group2 = torch.stack([mean[:, 2:], std[:, 2:]], dim=-1).flatten(1)

        # ---- 3. temporal
        voiced_fraction = counts[:, 0] / counts[:, self.active_row].clamp_min(1.0)
        leq = 10.0 * torch.log10(ms.mean(1) + 1e-10)
        duration = n_frames * hop_s
        # the running max / min over +-10 / +-20 frames
        local_min = -_running_max(-smooth, 20, self.portable)
        peak = active & (smooth >= _running_max(smooth, 10, self.portable)) & (d_loud > 0) & (smooth - local_min >= 3.0)
        peaks_per_s = peak.sum(1).to(torch.float32) / duration
        cum_v = torch.cumsum(voiced.to(torch.int32), dim=1)
        pause = ~voiced & (cum_v > 0) & (cum_v < cum_v[:, -1:])  # unvoiced, with voiced frames before and after
        count, seg_len, seg_std = _segment_lengths(torch.cat([voiced, pause], dim=0))  # voiced rows, then pauses
        b = x.shape[0]
        group3 = torch.stack(
            [voiced_fraction, leq, peaks_per_s, count[:b] / duration, seg_len[:b] * hop_s, seg_std[:b] * hop_s,
             seg_len[b:] * hop_s, seg_std[b:] * hop_s], dim=1)  # fmt: skip
        return torch.cat([group1, group2, group3], dim=1)
