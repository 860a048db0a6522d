"""Tests for the on-device feature extractors and the device-local normaliser."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from fl_ser.features import FeatureNormalizer, Functionals, LogMel, MFCCDeltas
from fl_ser.features.logmel import fix_length

SR = 16000


def harmonic_tone(f0: float, seconds: float = 2.0, amp: float = 0.3, n_harm: int = 10) -> torch.Tensor:
    """(1, samples) harmonic complex tone with 1/k amplitudes, peak ``amp``."""
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    x = sum(torch.sin(2 * math.pi * f0 * k * t) / k for k in range(1, n_harm + 1) if f0 * k < SR / 2)
    return (amp * x / x.abs().max()).float().unsqueeze(0)


def white_noise(seconds: float = 2.0, batch: int = 1, amp: float = 0.1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return amp * torch.randn(batch, int(seconds * SR), generator=g)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def extractors() -> dict[str, nn.Module]:
    return {"logmel": LogMel(), "mfcc": MFCCDeltas(), "functionals": Functionals()}


@pytest.fixture(scope="module")
def functionals(extractors) -> Functionals:
    return extractors["functionals"]


@pytest.fixture(scope="module")
def scripted(extractors) -> dict[str, torch.jit.ScriptModule]:
    return {name: torch.jit.script(ext) for name, ext in extractors.items()}


def _feat(f: Functionals, wave: torch.Tensor) -> dict[str, float]:
    return dict(zip(f.names, f(wave)[0].tolist(), strict=True))


# ---------------------------------------------------------------- shapes and attributes


def test_documented_shapes_and_kinds(extractors):
    assert extractors["logmel"].output_shape == (1, 64, 300)
    assert extractors["logmel"].kind == "sequence"
    assert extractors["mfcc"].output_shape == (3, 20, 300)
    assert extractors["mfcc"].kind == "sequence"
    f = extractors["functionals"]
    assert f.kind == "vector"
    assert len(f.output_shape) == 1
    assert 60 <= f.output_shape[0] <= 90
    assert len(f.names) == f.output_shape[0] == len(set(f.names))


@pytest.mark.parametrize("seconds", [0.3, 2.0, 7.0])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["logmel", "mfcc", "functionals"])
def test_output_shape_any_length(extractors, name, seconds, batch):
    ext = extractors[name]
    out = ext(white_noise(seconds, batch=batch))
    assert out.shape == (batch, *ext.output_shape)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_non_default_geometry():
    ext = LogMel(n_mels=40, seconds=2.0)
    assert ext.output_shape == (1, 40, 200)
    assert ext(white_noise(1.0)).shape == (1, 1, 40, 200)
    ext = MFCCDeltas(n_mfcc=13, seconds=1.5)
    assert ext(white_noise(4.0, batch=2)).shape == (2, 3, 13, 150)


@pytest.mark.parametrize("name", ["logmel", "mfcc", "functionals"])
@pytest.mark.parametrize(
    "signal",
    ["silence", "noise", "tone", "very_short", "loud_clipped"],
)
def test_finite_on_edge_signals(extractors, name, signal):
    wave = {
        "silence": torch.zeros(2, 2 * SR),
        "noise": white_noise(2.0, batch=2),
        "tone": harmonic_tone(150.0),
        "very_short": white_noise(0.01),
        "loud_clipped": (harmonic_tone(200.0) * 100).clamp(-1, 1),
    }[signal]
    out = extractors[name](wave)
    assert out.shape == (wave.shape[0], *extractors[name].output_shape)
    assert torch.isfinite(out).all()


def test_batch_items_are_independent(extractors):
    a, b = harmonic_tone(130.0), white_noise(2.0, amp=0.01)
    for ext in extractors.values():
        both = ext(torch.cat([a, b]))
        torch.testing.assert_close(both[0], ext(a)[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(both[1], ext(b)[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- crop / pad policy


def test_fix_length_crop_and_tile():
    x = torch.arange(10, dtype=torch.float32).unsqueeze(0)
    assert fix_length(x, 4).tolist() == [[3.0, 4.0, 5.0, 6.0]]  # centred crop
    assert fix_length(x[:, :3], 7).tolist() == [[0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0]]  # tiled
    assert torch.equal(fix_length(x, 10), x)
    assert fix_length(x[:, :0], 5).tolist() == [[0.0] * 5]


def test_short_input_is_tiled_not_zero_padded(extractors):
    out = extractors["logmel"](harmonic_tone(200.0, seconds=0.5))
    frame_energy = out[0, 0].exp().sum(0)
    # no log-of-silence frames: every frame carries about the same energy as the tone
    assert frame_energy.min() > 0.2 * frame_energy.median()


def test_long_input_is_centre_cropped():
    ext = LogMel(seconds=1.0)
    x = torch.cat([torch.zeros(1, SR), harmonic_tone(200.0, seconds=1.0), torch.zeros(1, SR)], dim=1)
    torch.testing.assert_close(ext(x), ext(harmonic_tone(200.0, seconds=1.0)))


# ---------------------------------------------------------------- functionals semantics


@pytest.mark.parametrize("f0", [120.0, 220.0])
def test_f0_accuracy(functionals, f0):
    d = _feat(functionals, harmonic_tone(f0))
    truth = 12 * math.log2(f0 / 27.5)
    assert abs(d["f0_st_mean"] - truth) < 1.0
    assert abs(d["f0_st_p50"] - truth) < 1.0
    assert d["f0_st_std"] < 0.5
    assert d["jitter_mean"] < 0.01


def test_f0_tracks_pitch_change(functionals):
    low = _feat(functionals, harmonic_tone(100.0))["f0_st_mean"]
    high = _feat(functionals, harmonic_tone(300.0))["f0_st_mean"]
    assert abs((high - low) - 12 * math.log2(3.0)) < 1.0


def test_louder_input_gives_higher_loudness(functionals):
    quiet = _feat(functionals, harmonic_tone(150.0, amp=0.05))
    loud = _feat(functionals, harmonic_tone(150.0, amp=0.5))
    assert loud["loudness_db_mean"] > quiet["loudness_db_mean"] + 15.0  # 20 dB louder
    assert loud["equivalent_sound_level_db"] > quiet["equivalent_sound_level_db"] + 15.0


def test_voiced_fraction_tone_vs_noise(functionals):
    tone = _feat(functionals, harmonic_tone(150.0))
    noise = _feat(functionals, white_noise(2.0))
    assert tone["voiced_fraction"] > 0.9
    assert noise["voiced_fraction"] < 0.1
    assert tone["hnr_db_v_mean"] > 10.0


def test_silence_gives_zero_voicing_and_finite_stats(functionals):
    d = _feat(functionals, torch.zeros(1, SR))
    assert d["voiced_fraction"] == 0.0
    assert d["f0_st_mean"] == 0.0 and d["f0_st_p80"] == 0.0
    assert d["voiced_segments_per_s"] == 0.0


def test_segments_and_pauses(functionals):
    tone = harmonic_tone(150.0, seconds=0.5)
    gap = torch.zeros(1, SR // 4)
    d = _feat(functionals, torch.cat([gap, tone, gap, tone, gap, tone, gap], dim=1))
    assert d["voiced_segments_per_s"] == pytest.approx(3 / 2.5, rel=0.1)
    assert d["voiced_segment_len_mean_s"] == pytest.approx(0.5, abs=0.06)
    assert d["unvoiced_segment_len_mean_s"] == pytest.approx(0.25, abs=0.06)
    assert 0.5 < d["voiced_fraction"] <= 1.0


def test_spectral_tilt_features_have_expected_sign(functionals):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 2 * SR, generator=g) * 0.1
    # pink-ish (low-pass) noise has more low-frequency energy than white noise
    lowpassed = torch.nn.functional.avg_pool1d(noise.unsqueeze(1), 8, 1, 4)[:, 0, : 2 * SR] * 3
    white, low = _feat(functionals, noise), _feat(functionals, lowpassed)
    assert low["alpha_ratio_db_uv_mean"] > white["alpha_ratio_db_uv_mean"] + 5.0
    assert low["centroid_hz_mean"] < white["centroid_hz_mean"] - 1000.0
    assert white["zcr_mean"] > 0.4


def test_masked_percentiles_match_reference():
    from fl_ser.features.functionals import _masked_mean_std, _masked_percentiles

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, generator=g)
    m = torch.rand(2, 3, 50, generator=g) > 0.5
    m[1, 2] = False  # an empty selection
    q = torch.tensor([0.2, 0.5, 0.8])
    got = _masked_percentiles(x, m, q)
    mean, std = _masked_mean_std(x, m.float())
    for b in range(2):
        for k in range(3):
            sel = x[b, k][m[b, k]]
            if sel.numel() == 0:
                assert got[b, k].abs().sum() == 0 and mean[b, k] == 0 and std[b, k] == 0
                continue
            torch.testing.assert_close(got[b, k], torch.quantile(sel, q))
            torch.testing.assert_close(mean[b, k], sel.mean())
            torch.testing.assert_close(std[b, k], sel.std(unbiased=False))


# ---------------------------------------------------------------- the two graphs (fl_ser.features.stft.portable)


def _spectrograms() -> dict[str, nn.Module]:
    """Every spectrogram geometry the extractors use: centred Hann (log-mel, MFCC), the functionals' unit-energy
    Hann at the frame's start, and their rectangular pitch frames."""
    f = Functionals()
    return {"centred": LogMel().spectrogram, "functionals": f.spectrogram, "pitch": f.pitch_spectrogram}


@pytest.mark.parametrize("name", ["centred", "functionals", "pitch"])
def test_factored_dft_is_the_fft(name):
    """The portable graph's spectrum (two matmuls) is torch.fft's, bin for bin, in its natural order and in its own
    cell order (weighted sums over the cells are weighted sums over the bins)."""
    from fl_ser.features.stft import portable

    spec = _spectrograms()[name]
    wave = torch.cat([white_noise(1.3), harmonic_tone(210.0, seconds=1.3)])
    with torch.no_grad():
        want = spec(wave)
        with portable(spec):
            assert spec.portable
            got = spec(wave)
            frames = spec.framed(wave)
            cells = spec.power(frames, natural=False)
        assert not spec.portable  # restored
    assert got.shape == want.shape == (2, want.shape[1], spec.n_fft // 2 + 1)
    torch.testing.assert_close(frames, spec.framed(wave))  # the same frames, copied instead of strided
    scale = want.abs().amax()
    assert (got - want).abs().max() <= 1e-5 * scale
    weights = torch.randn(spec.n_bins, 3, dtype=torch.float64).float()
    assert (cells @ spec.to_cells(weights) - want @ weights).abs().max() <= 1e-4 * (want @ weights.abs()).amax()


def test_spectrogram_geometry_is_checked():
    from fl_ser.features.stft import PowerSpectrogram

    with pytest.raises(ValueError, match="multiple of 32"):
        PowerSpectrogram(torch.hann_window(300), 400, 100, (0, 0))
    with pytest.raises(ValueError, match="must fit"):
        PowerSpectrogram(torch.hann_window(600), 512, 160, (0, 0))


def test_running_sums_and_maxima_of_both_graphs_match_their_definitions():
    from fl_ser.features.functionals import _frame_sums, _prefix_sums, _running_max

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 301, generator=g)
    for radius in (10, 20):
        padded = torch.nn.functional.pad(x, (radius, radius), value=-math.inf)
        want = torch.stack([padded[:, t : t + 2 * radius + 1].amax(-1) for t in range(301)], dim=1)
        for portable in (False, True):
            assert torch.equal(_running_max(x, radius, portable), want)
    signal = (torch.rand(2, 48400, generator=g) > 0.5).float()  # 0/1: counts must come out exact
    want = torch.stack([signal[:, t * 160 : t * 160 + 400].sum(-1) for t in range(301)], dim=1)
    assert torch.equal(_frame_sums(signal, 400, 160, 301), want)
    frames = torch.randn(2, 5, 320, generator=g)
    f = Functionals()
    torch.testing.assert_close(_prefix_sums(frames, f.sum_within, f.sum_across), torch.cumsum(frames, -1),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seconds", [0.3, 2.0, 3.7])
def test_functionals_of_both_graphs_agree(functionals, seconds):
    """The portable graph (decimation, running sums, energies and spectra by matmuls) gives the torch graph's
    functionals, for lengths that do and do not fill the last block. The tone has a noise floor 40 dB down, as
    recordings do: in a pure tone's empty bins the two float32 spectra differ by their rounding, which the log
    and the MFCCs then magnify (4e-4). Frame-to-frame F0 slopes magnify rounding 100-fold: 1.3e-4 measured."""
    from fl_ser.features.stft import portable

    wave = torch.cat([harmonic_tone(150.0, seconds=seconds) + white_noise(seconds, amp=0.003),
                      white_noise(seconds, amp=0.05)])
    with torch.no_grad():
        want = functionals(wave)
        with portable(functionals):
            got = functionals(wave)
    assert ((got - want).abs() / want.abs().clamp_min(1.0)).max() <= 2e-4


# ---------------------------------------------------------------- TorchScript


def _roundtrip(module: nn.Module) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    buf.seek(0)
    return torch.jit.load(buf)


@pytest.mark.parametrize("name", ["logmel", "mfcc", "functionals"])
def test_scripted_equals_eager(extractors, scripted, name):
    ext, script = extractors[name], scripted[name]
    assert tuple(script.output_shape) == ext.output_shape
    assert script.kind == ext.kind
    for wave in [white_noise(2.0, batch=2), harmonic_tone(180.0, seconds=0.3), torch.zeros(1, 5 * SR)]:
        torch.testing.assert_close(script(wave), ext(wave), rtol=1e-5, atol=1e-5)


def test_scripted_functionals_keeps_names(functionals, scripted):
    assert list(scripted["functionals"].names) == functionals.names


@pytest.mark.parametrize("name", ["logmel", "mfcc", "functionals"])
def test_scripted_chain_saves_and_loads(extractors, name):
    ext = extractors[name]
    norm = FeatureNormalizer(ext.output_shape, ext.kind)
    norm.fit(ext(white_noise(1.0, batch=4, seed=3)))
    chain = nn.Sequential(ext, norm)
    loaded = _roundtrip(chain)
    wave = harmonic_tone(140.0, seconds=1.2)
    torch.testing.assert_close(loaded(wave), chain(wave), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- normaliser


def test_normalizer_identity_before_fit():
    for shape, kind in [((1, 8, 5), "sequence"), ((7,), "vector")]:
        norm = FeatureNormalizer(shape, kind)
        x = torch.randn(4, *shape)
        torch.testing.assert_close(norm(x), x)


def test_normalizer_buffers_are_not_parameters():
    norm = FeatureNormalizer((3, 4, 10), "sequence")
    assert list(norm.parameters()) == []
    assert {n for n, _ in norm.named_buffers()} == {"mean", "std"}
    assert norm.mean.shape == norm.std.shape == (3, 4, 1)
    assert FeatureNormalizer((9,), "vector").mean.shape == (9,)


def test_normalizer_fit_vector_standardises():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) * torch.tensor([1.0, 10.0, 0.01, 100.0, 1.0, 1.0]) + 50.0
    x[:, 5] = 3.0  # a constant feature
    norm = FeatureNormalizer((6,), "vector").fit(x)
    y = norm(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(y[:, :5].std(0, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    assert torch.isfinite(y).all() and y[:, 5].abs().max() == 0
    assert norm.std[5] > 0


def test_normalizer_fit_sequence_pools_over_utterances_and_time():
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(2, 5, 1, generator=g) * 10 + 0.1
    offset = torch.randn(2, 5, 1, generator=g) * 20
    x = torch.randn(30, 2, 5, 40, generator=g) * scale + offset
    norm = FeatureNormalizer((2, 5, 40), "sequence").fit(x)
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 3)), torch.zeros(2, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 3), unbiased=False), torch.ones(2, 5), atol=1e-3, rtol=0)
    assert list(norm.parameters()) == []


def test_normalizer_on_real_features_and_scripted(extractors):
    ext = extractors["logmel"]
    feats = ext(white_noise(2.0, batch=6, seed=5))
    norm = FeatureNormalizer(ext.output_shape, ext.kind).fit(feats)
    y = norm(feats)
    assert abs(y.mean().item()) < 1e-3
    torch.testing.assert_close(torch.jit.script(norm)(feats), y)


def test_normalizer_rejects_bad_config():
    with pytest.raises(ValueError):
        FeatureNormalizer((3, 4), "sequence")
    with pytest.raises(ValueError):
        FeatureNormalizer((3,), "image")
    with pytest.raises(ValueError):
        FeatureNormalizer((3,), "vector").fit(torch.randn(5, 4))
