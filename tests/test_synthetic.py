"""The synthetic corpus: determinism, laziness, audio sanity, emotion cues and learnability."""

from __future__ import annotations

import time
from dataclasses import astuple

import numpy as np
import pytest

from fl_ser.data import synthetic
from fl_ser.data.corpus import SAMPLE_RATE, CorpusError
from fl_ser.data.synthetic import DEFAULT_EMOTIONS, EMOTION_PROFILES, SUPPORTED_EMOTIONS, SyntheticCorpus

# ----------------------------------------------------------------------------- a tiny acoustic analyser
_FRAME, _HOP, _NFFT = 640, 160, 1024  # 40 ms frames, 10 ms hop
_WIN = np.hanning(_FRAME)
_WIN_AC = np.fft.irfft(np.abs(np.fft.rfft(_WIN, _NFFT)) ** 2)[:_FRAME]
_WIN_AC = _WIN_AC / _WIN_AC[0]
_FREQS = np.fft.rfftfreq(_NFFT, 1.0 / SAMPLE_RATE)
_LAG_MIN, _LAG_MAX = SAMPLE_RATE // 600, SAMPLE_RATE // 60


def _analyse(wave: np.ndarray):
    """Per 10 ms frame: F0 in semitones re 100 Hz (voiced frames), energy (dB), power spectra, activity."""
    frames = np.lib.stride_tricks.sliding_window_view(wave.astype(np.float64), _FRAME)[::_HOP] * _WIN
    spec = np.abs(np.fft.rfft(frames, _NFFT)) ** 2
    ac = np.fft.irfft(spec, _NFFT)[:, : _LAG_MAX + 1]
    energy = 10.0 * np.log10(ac[:, 0] / np.sum(_WIN**2) + 1e-12)
    acn = ac / (ac[:, :1] + 1e-12) / _WIN_AC[: _LAG_MAX + 1]
    seg = acn[:, _LAG_MIN:]
    peak = seg.max(axis=1)
    lag = np.argmax(seg >= 0.9 * peak[:, None], axis=1) + _LAG_MIN  # shortest good lag: no octave-down errors
    active = energy > max(energy.max() - 30.0, np.percentile(energy, 5) + 6.0)
    voiced = active & (peak > 0.6)
    st = 12.0 * np.log2(SAMPLE_RATE / lag[voiced] / 100.0)
    if len(st) > 4:  # drop the remaining octave jumps
        st = st[np.abs(st - np.median(st)) < 9.0]
    return st, energy, spec, active, voiced


def _features(wave: np.ndarray) -> np.ndarray:
    st, energy, spec, active, voiced = _analyse(wave)
    if len(st) < 3:
        st = np.zeros(3)
    e = energy[active]
    idx = np.flatnonzero(active)
    s = spec[active]
    hf = s[:, _FREQS > 1000].sum(1) / (s[:, _FREQS <= 1000].sum(1) + 1e-12)
    return np.array(
        [
            np.median(st),  # F0 level
            np.percentile(st, 80) - np.percentile(st, 20),  # F0 range
            np.std(st),
            e.mean(),  # energy
            np.percentile(e, 95),
            e.std(),
            (idx[-1] - idx[0] + 1) * _HOP / SAMPLE_RATE,  # duration of the active span
            voiced.sum() / len(idx),  # voiced share
            np.mean((s * _FREQS).sum(1) / (s.sum(1) + 1e-12)),  # spectral centroid
            np.mean(10.0 * np.log10(hf + 1e-12)),  # energy above / below 1 kHz
        ]
    )


F0, F0_RANGE, F0_SD, ENERGY, ENERGY_95, ENERGY_SD, DURATION, VOICED, CENTROID, HF = range(10)


@pytest.fixture(scope="module")
def dataset():
    """Features of 16 speakers x 7 emotions x 4 takes (about 450 utterances)."""
    corpus = SyntheticCorpus(num_speakers=16, utterances_per_emotion=4, seed=7)
    feats, labels, groups = [], [], []
    for g, speaker in enumerate(corpus.speakers):
        utts, waves, report = corpus.load_speaker(speaker)
        assert report.num_skipped == 0
        for utt, wave in zip(utts, waves, strict=True):
            feats.append(_features(wave))
            labels.append(corpus.label_of(utt))
            groups.append(g)
    return corpus, np.array(feats), np.array(labels), np.array(groups)


# ----------------------------------------------------------------------------- metadata and laziness
def test_metadata_counts_and_labels():
    corpus = SyntheticCorpus(num_speakers=3, utterances_per_emotion=2, emotions=["sadness", "anger"], seed=1)
    assert corpus.name == "synthetic"
    assert corpus.emotions == ("sadness", "anger")
    assert corpus.speakers == ["spk0000", "spk0001", "spk0002"]
    utts = corpus.utterances
    assert len(utts) == corpus.num_utterances == 3 * 2 * 2
    assert [u.uid for u in utts] == sorted(u.uid for u in utts)
    assert len({u.uid for u in utts}) == len(utts)
    assert utts[0].uid == "spk0000_anger_00"
    assert {corpus.label_of(u) for u in utts} == {0, 1}
    assert all(corpus.label_of(u) == corpus.emotions.index(u.emotion) for u in utts)
    for spk in corpus.speakers:
        mine = corpus.utterances_of(spk)
        assert mine == [u for u in utts if u.speaker == spk]
        assert {u.sex for u in mine} == {corpus.speaker_sex(spk)}
        assert all(u.source.startswith("synthetic(") for u in mine)
    assert corpus.utterances_of("nobody") == []
    with pytest.raises(KeyError):
        corpus.speaker_sex("spk0003")


def test_default_emotions():
    corpus = SyntheticCorpus()
    assert corpus.emotions == DEFAULT_EMOTIONS
    assert len(corpus.speakers) == 14
    assert corpus.num_utterances == 14 * 7 * 8
    assert set(SUPPORTED_EMOTIONS) <= set(EMOTION_PROFILES)


def test_docstring_table_matches_the_code():
    """The emotion table in the module docstring (quoted in the README) shows the values actually used."""
    lines = synthetic.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| emotion "))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert {r.split("|")[1].strip() for r in rows} == set(EMOTION_PROFILES)
    for row in rows:
        name, *values = (c.strip() for c in row.strip("|").split("|"))
        assert tuple(float(v) for v in values) == astuple(EMOTION_PROFILES[name]), name


def test_speakers_of_both_sexes_about_half_each():
    corpus = SyntheticCorpus(num_speakers=14)
    sexes = [corpus.speaker_sex(s) for s in corpus.speakers]
    assert sexes.count("f") == sexes.count("m") == 7
    big = SyntheticCorpus(num_speakers=1001)
    share = sum(big.speaker_sex(s) == "f" for s in big.speakers) / 1001
    assert 0.45 < share < 0.55
    f0 = {"f": [], "m": []}
    for s in corpus.speakers:
        f0[corpus.speaker_sex(s)].append(corpus.speaker_profile(s).f0_hz)
    assert min(f0["f"]) > 160 > max(f0["m"])


def test_ten_thousand_speakers_are_lazy():
    start = time.perf_counter()
    corpus = SyntheticCorpus(num_speakers=10_000, utterances_per_emotion=8)
    assert corpus.num_utterances == 10_000 * 7 * 8
    speakers = corpus.speakers
    last = corpus.utterances_of(speakers[-1])
    assert time.perf_counter() - start < 2.0
    assert corpus._utterances is None  # the full list was never built
    assert speakers[0] == "spk0000" and speakers[-1] == "spk9999" and len(speakers) == 10_000
    assert len(last) == 7 * 8 and last[0].uid == "spk9999_anger_00"
    wave = corpus._load_audio(last[-1])
    assert wave.dtype == np.float32 and len(wave) > SAMPLE_RATE
    assert SyntheticCorpus(num_speakers=10_001).speakers[-1] == "spk10000"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_speakers": 1}, "num_speakers must be >= 2"),
        ({"num_speakers": 2.5}, "num_speakers must be an integer"),
        ({"utterances_per_emotion": 0}, "utterances_per_emotion must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"emotions": ["anger", "joy"]}, "unknown emotions ['joy']; supported:"),
        ({"emotions": []}, "emotions is empty"),
        ({"emotions": ["anger", "anger"]}, "more than once"),
        ({"emotions": "anger"}, "list of names"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(CorpusError) as err:
        SyntheticCorpus(**kwargs)
    assert message in str(err.value)


def test_foreign_utterance_is_rejected():
    a = SyntheticCorpus(num_speakers=2, utterances_per_emotion=1, emotions=["anger"])
    b = SyntheticCorpus(num_speakers=2, utterances_per_emotion=3)
    with pytest.raises(CorpusError):
        a._load_audio(b.utterances_of("spk0001")[-1])


# ----------------------------------------------------------------------------- audio
def test_deterministic_per_seed_and_independent_of_other_utterances():
    a = SyntheticCorpus(num_speakers=4, seed=3)
    b = SyntheticCorpus(num_speakers=50, utterances_per_emotion=2, emotions=["fear", "neutral"], seed=3)
    utt = a.utterances_of("spk0002")[-1]  # spk0002_sadness_07 ... generated without generating any other
    same = a._load_audio(utt)
    assert np.array_equal(same, a._load_audio(utt))
    assert np.array_equal(a.synthesize("spk0002", "fear", 1), b.synthesize("spk0002", "fear", 1))
    other_seed = SyntheticCorpus(num_speakers=4, seed=4).synthesize("spk0002", "fear", 1)
    assert not np.array_equal(a.synthesize("spk0002", "fear", 1), other_seed)
    assert not np.array_equal(a.synthesize("spk0002", "fear", 0), a.synthesize("spk0002", "fear", 1))


def test_audio_format_and_range():
    corpus = SyntheticCorpus(num_speakers=6, utterances_per_emotion=1, emotions=list(SUPPORTED_EMOTIONS), seed=11)
    for speaker in corpus.speakers[:3]:
        utts, waves, report = corpus.load_speaker(speaker)
        assert report.loaded == len(SUPPORTED_EMOTIONS) and len(waves) == len(utts)
        for wave in waves:
            assert wave.dtype == np.float32 and wave.ndim == 1
            assert 1.0 * SAMPLE_RATE <= len(wave) <= 4.5 * SAMPLE_RATE
            assert np.all(np.isfinite(wave))
            peak = np.abs(wave).max()
            assert 0.01 < peak < 1.0
            rms_db = 20 * np.log10(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))
            assert -60 < rms_db < -10


def test_generation_is_fast():
    corpus = SyntheticCorpus(num_speakers=4, seed=5)
    corpus.synthesize("spk0000", "neutral", 0)  # warm the speaker cache
    best = []
    for take in range(5):
        start = time.perf_counter()
        wave = corpus.synthesize("spk0000", "anger", take)
        best.append((time.perf_counter() - start) / (len(wave) / SAMPLE_RATE))
    assert min(best) * 2.0 < 0.05, f"{min(best) * 2000:.1f} ms per 2 s of audio"  # typically 3-8 ms


# ----------------------------------------------------------------------------- emotion cues and learnability
def _relative_to_neutral(corpus, feats, labels, groups) -> dict[str, np.ndarray]:
    """Mean feature change of each emotion from the same speaker's neutral, averaged over speakers."""
    neutral = corpus.emotions.index("neutral")
    out = {}
    for e, name in enumerate(corpus.emotions):
        deltas = [
            feats[(groups == g) & (labels == e)].mean(0) - feats[(groups == g) & (labels == neutral)].mean(0)
            for g in np.unique(groups)
        ]
        out[name] = np.mean(deltas, axis=0)
    return out


def test_emotion_cues_follow_the_literature(dataset):
    corpus, feats, labels, groups = dataset
    d = _relative_to_neutral(corpus, feats, labels, groups)
    high, low = ("anger", "happiness", "fear"), ("sadness", "boredom")
    for h in high:
        assert d[h][F0] > 1.0, (h, d[h][F0])  # semitones above neutral
        assert d[h][ENERGY] > 0.5, (h, d[h][ENERGY])
        for lo in low:
            assert d[h][F0] > d[lo][F0] + 2.0
            assert d[h][ENERGY] > d[lo][ENERGY] + 2.0
            assert d[h][HF] > d[lo][HF]  # flatter spectrum with vocal effort
    for lo in low:
        assert d[lo][F0] < -0.5 and d[lo][ENERGY] < -0.5
        assert d[lo][DURATION] > 0.05  # slower than neutral
    assert d["sadness"][DURATION] > d["anger"][DURATION] + 0.2
    assert d["boredom"][F0_RANGE] < d["happiness"][F0_RANGE] - 0.5
    assert d["boredom"][F0_RANGE] < 0.0 and d["happiness"][F0_RANGE] > 0.0
    assert d["fear"][DURATION] < 0.0 and d["disgust"][DURATION] > 0.0


def test_sexes_differ_more_than_most_emotions(dataset):
    corpus, feats, labels, groups = dataset
    neutral = corpus.emotions.index("neutral")
    level = np.array([feats[(groups == g) & (labels == neutral), F0].mean() for g in range(len(corpus.speakers))])
    female = np.array([corpus.speaker_sex(s) == "f" for s in corpus.speakers])
    sex_gap = level[female].mean() - level[~female].mean()
    d = _relative_to_neutral(corpus, feats, labels, groups)
    assert sex_gap > 6.0  # semitones
    assert all(abs(d[e][F0]) < sex_gap for e in corpus.emotions)


def _softmax_regression(x, y, k, steps=400, lr=0.5, l2=1e-2):
    x = np.c_[x, np.ones(len(x))]
    w = np.zeros((x.shape[1], k))
    onehot = np.eye(k)[y]
    for _ in range(steps):
        p = x @ w
        p = np.exp(p - p.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= lr * (x.T @ (p - onehot) / len(x) + l2 * w)
    return w


def test_speaker_independent_emotion_recognition_is_learnable_but_not_trivial(dataset):
    corpus, feats, labels, groups = dataset
    z = feats.copy()
    for g in np.unique(groups):  # per-speaker z-normalisation, standard in speaker-independent SER
        m = groups == g
        z[m] = (feats[m] - feats[m].mean(0)) / (feats[m].std(0) + 1e-9)
    k = len(corpus.emotions)
    accs = []
    for fold in range(2):  # 2-fold cross-validation over speakers: test speakers are never seen in training
        test = (groups % 2) == fold
        w = _softmax_regression(z[~test], labels[~test], k)
        pred = (np.c_[z[test], np.ones(test.sum())] @ w).argmax(1)
        accs.append(np.mean(pred == labels[test]))
    acc = float(np.mean(accs))
    print(f"speaker-independent accuracy, 7 classes: {acc:.3f} (folds {np.round(accs, 3)})")
    assert 0.35 < acc < 0.98
    # Neighbouring emotions overlap: not every class is recognised almost perfectly.
    assert acc < 0.9
