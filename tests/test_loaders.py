"""Corpus loaders on tiny generated fixtures in each published layout, plus the real EmoDB when present."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fl_ser.data.audio import AudioError, read_audio
from fl_ser.data.corpus import SAMPLE_RATE, CorpusError
from fl_ser.data.loaders import RAVDESS, CremaD, EmoDB, Manifest

EMODB = Path(__file__).resolve().parents[1].parent / "shared/datasets/emodb"


def tone(path: Path, rate: int = 22050, seconds: float = 0.5, channels: int = 1, amp: float = 0.3) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    wave = amp * np.sin(2 * np.pi * 220 * t)
    data = np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else wave
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, rate)
    return path


def check_wave(wave: np.ndarray, seconds: float = 0.5) -> None:
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - seconds * SAMPLE_RATE) <= 2
    assert np.abs(wave).max() > 0.1


# -- read_audio ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rate,channels", [(16000, 1), (22050, 1), (48000, 1), (44100, 2)])
def test_read_audio_resamples_to_16k_mono_float32(tmp_path, rate, channels):
    wave = read_audio(tone(tmp_path / "a.wav", rate=rate, channels=channels))
    check_wave(wave)


def test_read_audio_downmixes_by_mean(tmp_path):
    path = tmp_path / "s.wav"
    wave = np.sin(2 * np.pi * 220 * np.arange(8000) / SAMPLE_RATE)
    sf.write(path, np.stack([0.2 * wave, 0.4 * wave], axis=1), SAMPLE_RATE)
    np.testing.assert_allclose(read_audio(path), 0.3 * wave, atol=1e-4)


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda p: p.write_bytes(b"this is not audio" * 10), "unreadable"),
        (lambda p: None, "missing"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: sf.write(p, np.zeros(0), SAMPLE_RATE), "empty"),
        (lambda p: sf.write(p, np.zeros(SAMPLE_RATE), SAMPLE_RATE), "silent"),
        (lambda p: tone(p, amp=1e-4), "silent"),
        (lambda p: tone(p, seconds=0.1), "too short"),
    ],
)
def test_read_audio_rejects_bad_files(tmp_path, make, reason):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(AudioError) as err:
        read_audio(path)
    assert err.value.reason == reason
    assert str(path) in str(err.value) and reason in str(err.value)


# -- EmoDB --------------------------------------------------------------------------------------
def make_emodb(root: Path) -> Path:
    for name in ["03a01Fa", "03a02Wb", "08b01Nc", "08a05Ta", "16a07Ld", "16b03Ea"]:
        tone(root / "wav" / f"{name}.wav", rate=22050)
    (root / "wav" / "notes.wav").write_bytes(b"x")  # does not match the naming: ignored
    (root / "README.md").write_text("readme")
    return root


def test_emodb_layout(tmp_path):
    corpus = EmoDB(make_emodb(tmp_path / "emodb"))
    assert corpus.name == "emodb"
    assert corpus.speakers == ["03", "08", "16"]
    assert corpus.emotions == ("anger", "boredom", "disgust", "happiness", "sadness", "neutral")
    assert [corpus.speaker_sex(s) for s in corpus.speakers] == ["m", "f", "f"]
    by_uid = {u.uid: u for u in corpus.utterances}
    assert by_uid["03a01Fa"].emotion == "happiness" and by_uid["08b01Nc"].emotion == "neutral"
    assert corpus.label_of(by_uid["03a02Wb"]) == 0
    utts, waves, report = corpus.load_speaker("08")
    assert [u.uid for u in utts] == ["08a05Ta", "08b01Nc"] and report.loaded == 2 and not report.num_skipped
    for wave in waves:
        check_wave(wave)


def test_emodb_wavs_directly_in_root_and_emotion_subset(tmp_path):
    for name in ["09a01Wa", "09a01Aa", "10a01Wa"]:
        tone(tmp_path / f"{name}.wav")
    corpus = EmoDB(tmp_path, emotions=["fear", "anger"])
    assert corpus.emotions == ("fear", "anger")
    assert [(u.uid, corpus.label_of(u)) for u in corpus.utterances] == [("09a01Aa", 0), ("09a01Wa", 1), ("10a01Wa", 1)]
    assert corpus.speaker_sex("10") == "m"


def test_load_speaker_skips_bad_files_by_reason(tmp_path):
    root = make_emodb(tmp_path / "emodb")
    wav = root / "wav"
    (wav / "03a04Wa.wav").write_bytes(b"garbage bytes, not a RIFF header" * 4)
    (wav / "03a05Wa.wav").write_bytes(b"")
    sf.write(wav / "03a07Wa.wav", np.zeros(8000), 22050)
    tone(wav / "03b01Wa.wav", seconds=0.1)
    utts, waves, report = EmoDB(root).load_speaker("03")
    assert [u.uid for u in utts] == ["03a01Fa", "03a02Wb"] and len(waves) == 2
    assert report.loaded == 2 and report.num_skipped == 4
    assert report.skipped == {
        "unreadable": ["03a04Wa"],
        "empty": ["03a05Wa"],
        "silent": ["03a07Wa"],
        "too short": ["03b01Wa"],
    }


# -- RAVDESS ------------------------------------------------------------------------------------
def test_ravdess_layout_speech_only(tmp_path):
    root = tmp_path / "ravdess"
    tone(root / "Actor_01" / "03-01-05-01-01-01-01.wav", rate=48000)
    tone(root / "Actor_01" / "03-01-02-02-02-01-01.wav", rate=48000, channels=2)
    tone(root / "Actor_02" / "03-01-08-01-01-02-02.wav", rate=48000)
    tone(root / "Actor_02" / "03-02-03-01-01-01-02.wav", rate=48000)  # song: ignored
    tone(root / "Actor_02" / "01-01-03-01-01-01-02.wav", rate=48000)  # audio-video: ignored
    tone(root / "Actor_02" / "junk.wav", rate=48000)  # ignored
    corpus = RAVDESS(root)
    assert corpus.name == "ravdess"
    assert corpus.speakers == ["01", "02"]
    assert corpus.speaker_sex("01") == "m" and corpus.speaker_sex("02") == "f"
    assert corpus.emotions == ("anger", "calm", "surprise")
    assert {u.uid: u.emotion for u in corpus.utterances} == {
        "03-01-05-01-01-01-01": "anger",
        "03-01-02-02-02-01-01": "calm",
        "03-01-08-01-01-02-02": "surprise",
    }
    _, waves, report = corpus.load_speaker("01")
    assert report.loaded == 2
    for wave in waves:
        check_wave(wave)


def test_ravdess_one_level_deeper(tmp_path):
    tone(tmp_path / "Audio_Speech_Actors_01-24" / "Actor_12" / "03-01-01-01-01-01-12.wav", rate=48000)
    corpus = RAVDESS(tmp_path)
    assert corpus.speakers == ["12"] and corpus.emotions == ("neutral",)


# -- CREMA-D ------------------------------------------------------------------------------------
def make_crema(root: Path) -> Path:
    for name in ["1001_DFA_ANG_XX", "1001_IEO_HAP_LO", "1002_DFA_SAD_XX", "1002_TIE_NEU_XX", "1003_MTI_FEA_HI"]:
        tone(root / "AudioWAV" / f"{name}.wav", rate=16000)
    return root


def test_crema_d_without_demographics(tmp_path):
    corpus = CremaD(make_crema(tmp_path))
    assert corpus.name == "crema_d"
    assert corpus.speakers == ["1001", "1002", "1003"]
    assert corpus.emotions == ("anger", "fear", "happiness", "sadness", "neutral")
    assert all(u.sex is None for u in corpus.utterances)
    _, waves, _ = corpus.load_speaker("1001")
    for wave in waves:
        check_wave(wave)


def test_crema_d_with_demographics(tmp_path):
    root = make_crema(tmp_path)
    (root / "VideoDemographics.csv").write_text(
        "ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n1002,21,Female,Caucasian,Not Hispanic\n"
    )
    corpus = CremaD(root, emotions=["anger", "sadness"])
    assert corpus.speakers == ["1001", "1002"]
    assert corpus.speaker_sex("1001") == "m" and corpus.speaker_sex("1002") == "f"


# -- Manifest -----------------------------------------------------------------------------------
def test_manifest(tmp_path):
    tone(tmp_path / "clips" / "a.wav", rate=22050)
    tone(tmp_path / "clips" / "b.wav", rate=48000, channels=2)
    absolute = tone(tmp_path / "elsewhere" / "c.wav", rate=16000)
    (tmp_path / "m.csv").write_text(
        "path,speaker,emotion,sex\n"
        "clips/a.wav,alice,Angry,female\n"
        f"clips/b.wav,alice,happy,F\n{absolute},bob,sad,m\n"
        "clips/missing.wav,bob,neutral,\n"
    )
    corpus = Manifest(tmp_path / "m.csv")
    assert corpus.name == "manifest"
    assert corpus.speakers == ["alice", "bob"]
    assert corpus.emotions == ("anger", "happiness", "sadness", "neutral")
    assert corpus.speaker_sex("alice") == "f" and corpus.speaker_sex("bob") == "m"
    utts, waves, report = corpus.load_speaker("alice")
    assert report.loaded == 2
    for wave in waves:
        check_wave(wave)
    utts, waves, report = corpus.load_speaker("bob")
    assert [u.source for u in utts] == [str(absolute)]
    assert report.skipped == {"missing": ["clips/missing.wav"]}


def test_manifest_without_sex_column(tmp_path):
    tone(tmp_path / "a.wav")
    (tmp_path / "m.csv").write_text("speaker,emotion,path\ns1,surprised,a.wav\n")
    corpus = Manifest(tmp_path / "m.csv")
    assert corpus.utterances[0].emotion == "surprise" and corpus.utterances[0].sex is None


def test_manifest_missing_columns(tmp_path):
    (tmp_path / "m.csv").write_text("file,speaker\na.wav,s1\n")
    with pytest.raises(CorpusError, match=r"\['path', 'emotion'\]"):
        Manifest(tmp_path / "m.csv")


def test_manifest_unknown_emotion_names_the_row(tmp_path):
    (tmp_path / "m.csv").write_text("path,speaker,emotion\na.wav,s1,anger\nb.wav,s1,grumpy\n")
    with pytest.raises(CorpusError, match=r"line 3.*grumpy"):
        Manifest(tmp_path / "m.csv")


def test_manifest_missing_file(tmp_path):
    with pytest.raises(CorpusError, match=r"nope\.csv.*does not exist.*data\.manifest="):
        Manifest(tmp_path / "nope.csv")


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [EmoDB, RAVDESS, CremaD])
def test_wrong_root_names_path_layout_and_fix(tmp_path, cls):
    root = tmp_path / "does-not-exist"
    with pytest.raises(CorpusError) as err:
        cls(root)
    message = str(err.value)
    assert str(root) in message and "does not exist" in message
    assert cls.layout in message and "data.root=" in message


@pytest.mark.parametrize("cls", [EmoDB, RAVDESS, CremaD])
def test_empty_root(tmp_path, cls):
    (tmp_path / "unrelated.txt").write_text("x")
    with pytest.raises(CorpusError, match="no files in the expected layout") as err:
        cls(tmp_path)
    assert str(tmp_path) in str(err.value) and "expected" in str(err.value)


def test_requested_emotion_not_present(tmp_path):
    with pytest.raises(CorpusError, match="surprise"):
        EmoDB(make_emodb(tmp_path), emotions=["anger", "surprise"])


# -- the real EmoDB -----------------------------------------------------------------------------
@pytest.mark.skipif(not EMODB.is_dir(), reason=f"EmoDB not found at {EMODB}")
def test_real_emodb():
    corpus = EmoDB(EMODB)
    assert len(corpus.utterances) == 535
    assert corpus.emotions == ("anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral")
    counts = {"03": 49, "08": 58, "09": 43, "10": 38, "11": 55, "12": 35, "13": 61, "14": 69, "15": 56, "16": 71}
    assert Counter(u.speaker for u in corpus.utterances) == counts
    assert Counter(u.emotion for u in corpus.utterances) == {
        "anger": 127,
        "boredom": 81,
        "neutral": 79,
        "happiness": 71,
        "fear": 69,
        "sadness": 62,
        "disgust": 46,
    }
    assert {s: corpus.speaker_sex(s) for s in corpus.speakers} == {
        "03": "m",
        "08": "f",
        "09": "f",
        "10": "m",
        "11": "m",
        "12": "m",
        "13": "f",
        "14": "f",
        "15": "m",
        "16": "f",
    }
    _, waves, report = corpus.load_speaker("12")
    assert report.loaded == 35 and not report.num_skipped
    assert all(w.dtype == np.float32 and w.ndim == 1 and len(w) > 0.3 * SAMPLE_RATE for w in waves)
