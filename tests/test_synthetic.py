"""The synthetic corpus: determinism, laziness, audio sanity, emotion cues and learnability."""

from __future__ import annotations

import inspect
import time
from dataclasses import astuple
from pathlib import Path

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


# ----------------------------------------------------------------------------- uneven federations (metadata only)
def _emotions_of(corpus, speaker) -> set[str]:
    return {u.emotion for u in corpus.utterances_of(speaker)}


def test_default_mode_is_unchanged():
    """The defaults give today's corpus: the same utterance lists (uid order, every take) and the same repr."""
    corpus = SyntheticCorpus(num_speakers=3, utterances_per_emotion=2, emotions=["sadness", "anger"], seed=1)
    explicit = SyntheticCorpus(num_speakers=3, utterances_per_emotion=2, emotions=["sadness", "anger"], seed=1,
                               utterances="uniform", emotions_per_speaker=None)
    assert repr(corpus) == repr(explicit) == (
        "SyntheticCorpus(num_speakers=3, utterances_per_emotion=2, emotions=['sadness', 'anger'], seed=1)")
    expected = [f"spk{i:04d}_{e}_{t:02d}" for i in range(3) for e in ("anger", "sadness") for t in range(2)]
    assert [u.uid for u in corpus.utterances] == [u.uid for u in explicit.utterances] == expected
    assert corpus.num_utterances == 12
    assert repr(SyntheticCorpus()) == (
        "SyntheticCorpus(num_speakers=14, utterances_per_emotion=8, emotions=['anger', 'boredom', 'disgust', "
        "'fear', 'happiness', 'sadness', 'neutral'], seed=0)")


def test_uneven_corpus_is_deterministic_and_seeded():
    kwargs = {"num_speakers": 30, "utterances": "zipf", "emotions_per_speaker": "mixed"}
    a, b = SyntheticCorpus(seed=3, **kwargs), SyntheticCorpus(seed=3, **kwargs)
    assert a.utterances == b.utterances and a.num_utterances == b.num_utterances
    other = SyntheticCorpus(seed=4, **kwargs)
    assert [len(a.utterances_of(s)) for s in a.speakers] != [len(other.utterances_of(s)) for s in other.speakers]
    # A speaker's utterances depend on (seed, index), not on how many speakers there are.
    more = SyntheticCorpus(seed=3, **{**kwargs, "num_speakers": 2000})
    assert all(more.utterances_of(s) == a.utterances_of(s) for s in a.speakers)
    assert "utterances='zipf'" in repr(a) and "emotions_per_speaker='mixed'" in repr(a)


def test_zipf_counts_are_bounded_and_uneven():
    corpus = SyntheticCorpus(num_speakers=30, utterances="zipf", seed=0)
    counts = [len(corpus.utterances_of(s)) for s in corpus.speakers]
    assert all(2 <= n <= 80 for n in counts)
    assert max(counts) / min(counts) >= 10
    assert corpus.num_utterances == sum(counts) == len(corpus.utterances)
    assert len({u.uid for u in corpus.utterances}) == len(corpus.utterances)
    # The shape of the law over many speakers (metadata only): a heavy tail, most speakers with few utterances.
    big = SyntheticCorpus(num_speakers=2000, utterances="zipf", seed=0)
    many = np.array([len(big.utterances_of(s)) for s in big.speakers])
    assert big.num_utterances == many.sum()
    assert 6 <= np.median(many) <= 12 and 0.1 < np.mean(many == 2) < 0.2 and 0.1 < np.mean(many >= 40) < 0.2
    assert many.min() == 2 and many.max() == 80
    narrow = SyntheticCorpus(num_speakers=50, utterances="zipf", min_utterances=5, max_utterances=6, zipf_exponent=2)
    assert {len(narrow.utterances_of(s)) for s in narrow.speakers} == {5, 6}


@pytest.mark.parametrize("utterances", ["uniform", "zipf"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_each_speaker_covers_k_emotions_and_every_emotion_occurs(utterances, k):
    corpus = SyntheticCorpus(num_speakers=12, utterances=utterances, emotions_per_speaker=k, seed=2,
                             **({"min_utterances": k} if utterances == "zipf" else {}))
    covered = [frozenset(_emotions_of(corpus, s)) for s in corpus.speakers]
    assert all(len(c) == k for c in covered)
    assert set().union(*covered) == set(corpus.emotions)
    if k < len(corpus.emotions):  # different speakers get different subsets
        assert len(set(covered)) > 3
    total = sum(len(corpus.utterances_of(s)) for s in corpus.speakers)
    assert corpus.num_utterances == total
    if utterances == "uniform":
        assert total == 12 * k * corpus.utterances_per_emotion
    else:  # the takes of a speaker's emotions differ by at most one
        for s in corpus.speakers:
            per = [sum(u.emotion == e for u in corpus.utterances_of(s)) for e in _emotions_of(corpus, s)]
            assert max(per) - min(per) <= 1


def test_few_speakers_still_cover_every_emotion():
    """Emotions are dealt so that ceil(E / k) speakers cover all E of them."""
    corpus = SyntheticCorpus(num_speakers=3, emotions_per_speaker=3, utterances_per_emotion=1)
    assert set().union(*(_emotions_of(corpus, s) for s in corpus.speakers)) == set(DEFAULT_EMOTIONS)


def test_mixed_is_mostly_single_emotion_speakers():
    corpus = SyntheticCorpus(num_speakers=600, emotions_per_speaker="mixed", utterances_per_emotion=1, seed=5)
    covered = [len(_emotions_of(corpus, s)) for s in corpus.speakers]
    assert 0.85 < covered.count(1) / len(covered) < 0.95
    assert set(covered) == {1, 2, 3, 4}
    assert corpus.num_utterances == sum(covered)
    assert set().union(*(_emotions_of(corpus, s) for s in corpus.speakers)) == set(DEFAULT_EMOTIONS)
    # In zipf mode nobody covers more emotions than it has utterances.
    zipf = SyntheticCorpus(num_speakers=300, utterances="zipf", emotions_per_speaker="mixed", seed=5)
    assert all(len(_emotions_of(zipf, s)) <= min(4, len(zipf.utterances_of(s))) for s in zipf.speakers)


def test_ten_thousand_uneven_speakers_are_metadata_only():
    start = time.perf_counter()
    corpus = SyntheticCorpus(num_speakers=10_000, utterances="zipf", emotions_per_speaker="mixed")
    total = corpus.num_utterances
    last = corpus.utterances_of(corpus.speakers[-1])
    assert time.perf_counter() - start < 2.0
    assert corpus._utterances is None
    assert 10_000 * 2 <= total <= 10_000 * 80 and 2 <= len(last) <= 80
    head = SyntheticCorpus(num_speakers=200, utterances="zipf", emotions_per_speaker="mixed")
    assert sum(len(corpus.utterances_of(s)) for s in head.speakers) == head.num_utterances


def test_listed_utterances_load_and_unlisted_ones_are_refused():
    corpus = SyntheticCorpus(num_speakers=8, utterances_per_emotion=2, utterances="zipf", emotions_per_speaker=1)
    speaker = max(corpus.speakers, key=lambda s: len(corpus.utterances_of(s)))
    mine = corpus.utterances_of(speaker)
    assert len(mine) > corpus.utterances_per_emotion  # zipf takes go past utterances_per_emotion
    (emotion,) = _emotions_of(corpus, speaker)
    last = mine[-1]
    assert last.uid == f"{speaker}_{emotion}_{len(mine) - 1:02d}"
    wave = corpus._load_audio(last)
    uniform = SyntheticCorpus(num_speakers=8, utterances_per_emotion=len(mine))
    assert np.array_equal(wave, uniform.synthesize(speaker, emotion, len(mine) - 1))  # same audio in every mode
    with pytest.raises(CorpusError, match="out of range"):
        corpus.synthesize(speaker, emotion, len(mine))
    other = next(e for e in corpus.emotions if e != emotion)
    with pytest.raises(CorpusError, match=f"has no '{other}' utterances"):
        corpus.synthesize(speaker, other, 0)
    longer = SyntheticCorpus(num_speakers=8, utterances_per_emotion=len(mine) + 1).utterances_of(speaker)
    unlisted = (next(u for u in longer if u.emotion == other), [u for u in longer if u.emotion == emotion][-1])
    for utt in unlisted:
        assert utt not in mine
        with pytest.raises(CorpusError):
            corpus._load_audio(utt)


def test_uneven_corpus_splits_like_any_other():
    from fl_ser.data.partition import holdout_split, kfold_splits

    corpus = SyntheticCorpus(num_speakers=20, utterances="zipf", emotions_per_speaker="mixed")
    split = holdout_split(corpus.speakers, 4, seed=1, sex_of=corpus.speaker_sex)
    assert sorted(split.train + split.test) == corpus.speakers and len(split.test) == 4
    assert {corpus.speaker_sex(s) for s in split.test} == {"f", "m"}
    assert all(corpus.utterances_of(s) for s in split.train + split.test)
    folds = kfold_splits(corpus.speakers, 5, seed=1, sex_of=corpus.speaker_sex)
    assert sorted(s for f in folds for s in f.test) == corpus.speakers


def test_hydra_one_liner_builds_an_uneven_corpus():
    from hydra import compose, initialize_config_dir

    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.data.partition import split_from_config

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["data.utterances=zipf", "data.emotions_per_speaker=1"])
    corpus = corpus_from_config(cfg)
    assert isinstance(corpus, SyntheticCorpus) and corpus.utterance_mode == "zipf"
    assert all(len(_emotions_of(corpus, s)) == 1 for s in corpus.speakers)
    split = split_from_config(cfg, corpus)
    assert len(split.test) == cfg.partition.num_test_speakers
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        default = compose("config")
    data = {k: v for k, v in default.data.items() if k != "_target_"}
    assert set(data) <= set(inspect.signature(SyntheticCorpus).parameters)
    built = corpus_from_config(default)
    assert repr(built) == repr(SyntheticCorpus(num_speakers=14, utterances_per_emotion=20, seed=default.seed))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"utterances": "power"}, "utterances must be one of ['uniform', 'zipf'], got 'power'"),
        ({"emotions_per_speaker": 0}, "emotions_per_speaker=0 is out of range: this corpus has 7 emotions"),
        ({"emotions_per_speaker": 3, "emotions": ["anger", "fear"]}, "emotions_per_speaker=3 is out of range"),
        ({"emotions_per_speaker": "some"}, "emotions_per_speaker must be null (every emotion), an integer 1..7 or"),
        ({"emotions_per_speaker": True}, "emotions_per_speaker must be null"),
        ({"utterances": "zipf", "min_utterances": 10, "max_utterances": 5}, "min_utterances=10 is above max_utter"),
        ({"utterances": "zipf", "min_utterances": 0}, "min_utterances must be >= 1"),
        ({"utterances": "zipf", "max_utterances": 2.5}, "max_utterances must be an integer"),
        ({"utterances": "zipf", "zipf_exponent": 0}, "zipf_exponent must be a positive number"),
        ({"utterances": "zipf", "zipf_exponent": float("nan")}, "zipf_exponent must be a positive number"),
        ({"max_utterances": 20}, "max_utterances=20: zipf settings, unused with utterances='uniform'"),
        ({"utterances": "zipf", "emotions_per_speaker": 3}, "min_utterances=2 is below emotions_per_speaker=3"),
        ({"num_speakers": 3, "emotions_per_speaker": 1}, "Fix: raise num_speakers to >= 7, or"),
        ({"num_speakers": 2, "emotions_per_speaker": 2, "utterances_per_emotion": 1}, "raise num_speakers to >= 4"),
    ],
)
def test_bad_uneven_settings(kwargs, message):
    with pytest.raises(CorpusError) as err:
        SyntheticCorpus(**kwargs)
    assert message in str(err.value)
