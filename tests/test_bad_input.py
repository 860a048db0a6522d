"""Bad input never crashes a run or poisons training: a fuzz set of broken and odd audio files, tables and caches.

Every generated file is either read correctly or skipped with a counted reason, by the loaders and by
``clients.validate`` alike; bad table rows get a message naming the file, the line and the fix; a path
outside the corpus root is refused before anything is opened; a damaged feature cache is rebuilt; and a
two-round federated run on a manifest mixing the fuzz files with good speech finishes with no NaN anywhere.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import pickle
import struct
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from clients import validate
from fl_ser.data.audio import REASONS, AudioError, AudioPolicy, load_audio
from fl_ser.data.corpus import SAMPLE_RATE, CorpusError
from fl_ser.data.loaders import DeviceFolder, Manifest
from fl_ser.data.synthetic import SyntheticCorpus
from fl_ser.features import Functionals, LogMel
from fl_ser.task import extract, speaker_data
from tests.conftest import REPO, make_config

LABELS = ["anger", "happiness", "sadness", "neutral"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the fuzz files ---------------------------------------------------------------------------------
def tone(seconds: float = 1.0, rate: int = SAMPLE_RATE, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    wave = amp * np.sin(2 * np.pi * 220 * t)
    return np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else wave


def written(data: np.ndarray, rate: int = SAMPLE_RATE, **kwargs) -> Callable[[Path], None]:
    return lambda path: sf.write(path, data, rate, **kwargs)


def with_sample(value: float) -> Callable[[Path], None]:
    data = tone()
    data[len(data) // 2] = value
    return written(data, subtype="FLOAT")


def raw_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def wav_prefix(size: int, seconds: float = 1.0) -> Callable[[Path], None]:
    """A good 16-bit WAV cut after ``size`` bytes (a truncated header, or truncated data)."""

    def make(path: Path) -> None:
        sf.write(path, tone(seconds), SAMPLE_RATE, subtype="PCM_16")
        path.write_bytes(path.read_bytes()[:size])

    return make


def one_hour(path: Path, head_seconds: float = 6.0) -> None:
    """A real one-hour 16 kHz 16-bit WAV, cheaply: a header for an hour, a tone at the start, then a sparse tail."""
    data_bytes = 3600 * SAMPLE_RATE * 2
    header = (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt "
              + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16)
              + b"data" + struct.pack("<I", data_bytes))
    with open(path, "wb") as f:
        f.write(header + (tone(head_seconds) * 32767).astype("<i2").tobytes())
        f.truncate(len(header) + data_bytes)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], None] | None  # None: the file is listed but absent
    reason: str | None = None  # None: read correctly
    notes: tuple[str, ...] = ()
    seconds: float = 1.0  # the duration read, when read


CASES = [
    # read correctly: any PCM width or float, 1 to 8 channels, 16 to 192 kHz, FLAC/OGG under a .wav name
    Case("pcm_u8", written(tone(), subtype="PCM_U8")),
    Case("pcm_24", written(tone(), subtype="PCM_24")),
    Case("float32", written(tone(), subtype="FLOAT")),
    Case("float64_over_full_scale", written(tone(amp=2.0), subtype="DOUBLE"), notes=("clipped",)),
    *[Case(f"{n}_channels", written(tone(channels=n))) for n in (2, 3, 6, 8)],
    *[Case(f"{rate}_hz", written(tone(rate=rate), rate)) for rate in (22050, 44100, 96000, 192000)],
    Case("flac_named_wav", written(tone(), format="FLAC")),
    Case("ogg_named_wav", written(tone(), format="OGG")),
    Case("clipped_square", written(np.sign(tone()), subtype="PCM_16"), notes=("clipped",)),
    Case("truncated_data", wav_prefix(44 + 2 * SAMPLE_RATE, seconds=2.0)),
    Case("shortest_kept", written(tone(0.3)), seconds=0.3),
    # skipped, each with its reason
    Case("nan", with_sample(np.nan), "non-finite"),
    Case("inf", with_sample(np.inf), "non-finite"),
    Case("minus_inf", with_sample(-np.inf), "non-finite"),
    Case("absurd_amplitude", written(tone(amp=3e3), subtype="FLOAT"), "out of range"),
    Case("unscaled_int_as_float", written(tone(amp=0.3) * 32768, subtype="FLOAT"), "out of range"),
    Case("dc_pcm16", written(np.full(SAMPLE_RATE, 0.5), subtype="PCM_16"), "dc only"),
    Case("dc_float", written(np.full(SAMPLE_RATE, -0.25), subtype="FLOAT"), "dc only"),
    Case("zeros", written(np.zeros(SAMPLE_RATE)), "silent"),
    Case("whisper", written(tone(amp=1e-4)), "silent"),
    Case("one_sample", written(np.array([0.5])), "too short"),
    Case("8000_hz", written(tone(rate=8000), 8000), "low sample rate"),
    Case("11025_hz", written(tone(rate=11025), 11025), "low sample rate"),
    Case("16001_hz", written(tone(rate=16001), 16001), "odd sample rate"),
    Case("one_hour", one_hour, "too long"),
    Case("truncated_header", wav_prefix(20), "unreadable"),
    Case("random_bytes", raw_bytes(np.random.default_rng(0).bytes(20_000)), "unreadable"),
    Case("text_named_wav", raw_bytes(b"this is a text file, not audio\n" * 40), "unreadable"),
    Case("zero_bytes", raw_bytes(b""), "empty"),
    Case("header_only", wav_prefix(44), "empty"),
    Case("missing", None, "missing"),
]
SKIPPED = Counter(c.reason for c in CASES if c.reason)
NOTED = Counter(n for c in CASES for n in c.notes)


def plant(folder: Path, cases=CASES) -> dict[str, Path]:
    """Write each case's file as ``folder/NAME.wav``; the paths by case name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in cases:
        paths[case.name] = folder / f"{case.name}.wav"
        if case.make:
            case.make(paths[case.name])
    return paths


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory) -> dict[str, Path]:
    return plant(tmp_path_factory.mktemp("fuzz"))


def test_every_reason_is_planted():
    assert set(SKIPPED) == set(REASONS)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_file_is_read_correctly_or_skipped_with_its_reason(fuzz, case):
    if case.reason:
        with pytest.raises(AudioError) as err:
            load_audio(fuzz[case.name])
        assert err.value.reason == case.reason
        message = str(err.value)  # names the file, the problem and the fix
        assert str(fuzz[case.name]) in message and case.reason in message and message.endswith(REASONS[case.reason])
        return
    audio = load_audio(fuzz[case.name])
    assert audio.wave.dtype == np.float32 and audio.wave.ndim == 1 and np.isfinite(audio.wave).all()
    assert abs(len(audio.wave) - case.seconds * SAMPLE_RATE) <= 2
    assert audio.seconds == pytest.approx(case.seconds, abs=1e-3) and audio.notes == case.notes
    assert 0.1 < np.abs(audio.wave).max() <= 2.0


def test_long_files_are_skipped_unread_or_cropped_in_bounded_memory(fuzz):
    path = fuzz["one_hour"]
    size = path.stat().st_size
    assert size > 100e6  # an hour of 16-bit audio at 16 kHz, mostly a sparse hole on disk
    tracemalloc.start()
    try:
        with pytest.raises(AudioError, match=r"too long \(3600\.0 s > max_seconds 60\.0 s\)"):
            load_audio(path)
        cropped = load_audio(path, AudioPolicy(max_seconds=5.0, long_files="crop"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cropped.notes == ("cropped",) and cropped.seconds == 3600.0 and len(cropped.wave) == 5 * SAMPLE_RATE
    np.testing.assert_allclose(cropped.wave, tone(5.0), atol=1e-3)  # the file's first 5 s
    assert peak < size / 20, f"peak {peak / 1e6:.1f} MB traced for a {size / 1e6:.0f} MB file"


def test_audio_policy_refuses_nonsense_settings():
    for bad in ({"long_files": "trim"}, {"min_seconds": 2.0, "max_seconds": 1.0}, {"max_peak": 0}):
        with pytest.raises(ValueError, match="audio"):
            AudioPolicy(**bad)
    with pytest.raises(ValueError, match=r"unknown audio setting\(s\) \['max_minutes'\]"):
        AudioPolicy.of({"max_minutes": 1})


@pytest.mark.parametrize("corpus", ["emodb", "ravdess", "crema_d", "manifest"])
def test_each_corpus_config_carries_the_policy_defaults(corpus):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"data={corpus}", "data.audio.long_files=crop"])
    block = OmegaConf.to_container(cfg.data.audio)
    assert block.pop("_target_") == "fl_ser.data.audio.AudioPolicy"
    assert AudioPolicy(**block) == AudioPolicy(long_files="crop")  # the YAML mirrors the defaults; overridable


def test_features_of_every_accepted_file_are_finite(fuzz):
    kept = [load_audio(fuzz[c.name]).wave for c in CASES if not c.reason]
    kept.append(load_audio(fuzz["one_hour"], AudioPolicy(long_files="crop")).wave)
    for extractor in (Functionals().eval(), LogMel().eval()):
        assert torch.isfinite(extract(extractor, kept)).all()


# -- corpora and clients.validate on the fuzz set -------------------------------------------------------
def fuzz_folder(root: Path) -> Path:
    """A participant folder holding every fuzz file, each labelled, plus a row for a file that is absent."""
    paths = plant(root / "takes")
    rows = ["file,emotion"] + [f"takes/{p.name},{LABELS[i % 4]}" for i, p in enumerate(paths.values())]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def counts(uids_by_reason: dict[str, list[str]]) -> Counter:
    return Counter({reason: len(uids) for reason, uids in uids_by_reason.items()})


def by_reason(uids_by_reason: dict[str, list[str]]) -> dict[str, list[str]]:
    return {reason: sorted(uids) for reason, uids in uids_by_reason.items()}


def test_loader_and_validate_count_the_same_reasons(tmp_path):
    folder = fuzz_folder(tmp_path / "alice")
    utts, waves, report = DeviceFolder(folder).load_speaker("alice")
    assert counts(report.skipped) == SKIPPED and counts(report.noted) == NOTED
    assert report.loaded == len(utts) == len(CASES) - sum(SKIPPED.values())
    assert all(np.isfinite(w).all() for w in waves)
    checked = validate.validate_folder(folder, min_utterances=0, min_per_emotion=0)
    assert by_reason(checked.audio.skipped) == by_reason(report.skipped)
    assert by_reason(checked.audio.noted) == by_reason(report.noted)
    assert checked.audio.loaded == report.loaded == checked.num_utterances
    errors = {p.where.split("(")[1].rstrip(")"): p.message for p in checked.errors if "(" in p.where}
    for case in CASES:
        if case.reason:
            assert errors[f"takes/{case.name}.wav"].startswith(f"{case.reason} audio (")
            assert errors[f"takes/{case.name}.wav"].endswith(REASONS[case.reason])
    assert any(w.message.startswith("clipped: ") for w in checked.warnings)


def test_validate_applies_the_experiments_audio_policy(tmp_path, capsys):
    folder = tmp_path / "bob"
    plant(folder, [c for c in CASES if c.name in ("one_hour", "8000_hz", "float32")])
    (folder / "labels.csv").write_text("file,emotion\none_hour.wav,anger\n8000_hz.wav,sad\nfloat32.wav,sad\n")
    assert counts(validate.validate_folder(folder).audio.skipped) == {"too long": 1, "low sample rate": 1}
    assert validate.main([str(folder), "--long-files", "crop", "--min-sample-rate", "8000", "--min-utterances", "3",
                          "--min-per-emotion", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["audio"] == {"loaded": 3, "skipped": {}, "noted": {"cropped": ["one_hour.wav"]}}
    assert out["durations"]["one_hour.wav"] == 60.0
    assert any("cropped: longer than max_seconds" in w["message"] for w in out["warnings"])


# -- tables: manifests and labels.csv --------------------------------------------------------------------
KINDS = ("manifest", "labels")


def write_table(kind: str, root: Path, rows: list[tuple[str, str]], *, bom: bool = False, crlf: bool = False,
                encoding: str = "utf-8") -> Path:
    header, row = ("path,speaker,emotion", "{},spk,{}") if kind == "manifest" else ("file,emotion", "{},{}")
    text = (("\r\n" if crlf else "\n").join([header, *(row.format(p, e) for p, e in rows)])) + "\n"
    table = root / ("m.csv" if kind == "manifest" else "labels.csv")
    table.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return table


def open_table(kind: str, root: Path):
    return Manifest(root / "m.csv") if kind == "manifest" else DeviceFolder(root, speaker="spk")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.fixture
def corpus_root(tmp_path) -> Path:
    wav = _mkdir(tmp_path / "corpus" / "wav")
    for name in ("a", "b", "c"):
        sf.write(wav / f"{name}.wav", tone(), SAMPLE_RATE)
    return wav.parent


GOOD_ROWS = [("wav/a.wav", "anger"), ("wav/b.wav", "happy"), ("wav/c.wav", "sad")]


@pytest.mark.parametrize("kind", KINDS)
def test_bom_and_crlf_tables_read_like_plain_ones(corpus_root, kind):
    write_table(kind, corpus_root, GOOD_ROWS)
    plain = [(u.uid, u.emotion, u.source) for u in open_table(kind, corpus_root).utterances]
    write_table(kind, corpus_root, GOOD_ROWS, bom=True, crlf=True)
    assert [(u.uid, u.emotion, u.source) for u in open_table(kind, corpus_root).utterances] == plain
    assert [e for _, e, _ in plain] == ["anger", "happiness", "sadness"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "rows,match",
    [
        ([*GOOD_ROWS[:2], ("wav/c.wav", "grumpy")], r"line 4: unknown emotion 'grumpy'; use one of"),
        ([*GOOD_ROWS, ("./wav/../wav/a.wav", "anger")], r"line 5: \S+ is listed again \(first on line 2\); remove"),
        ([*GOOD_ROWS, ("wav/c.wav", "")], r"line 5: empty 'emotion'; fill it in or remove the row"),
        ([*GOOD_ROWS, ("../../etc/passwd", "anger")], r"line 5: '\.\./\.\./etc/passwd' resolves to \S+, outside"),
        ([*GOOD_ROWS, ("/etc/passwd", "anger")], r"line 5: '/etc/passwd' resolves to /etc/passwd, outside"),
        ([*GOOD_ROWS, ("link.wav", "anger")], r"line 5: 'link\.wav' resolves to \S+/elsewhere\.wav, outside"),
        ([*GOOD_ROWS, ("wav/a\x00.wav", "anger")], r"line 5: 'wav/a\\x00\.wav' is not a usable path"),
    ],
    ids=["unknown_emotion", "duplicate", "empty_value", "dotdot", "absolute_outside", "symlink_out", "nul_byte"],
)
def test_bad_rows_name_the_table_line_and_fix(corpus_root, kind, rows, match):
    (corpus_root / "link.wav").symlink_to(corpus_root.parent / "elsewhere.wav")
    table = write_table(kind, corpus_root, rows)
    with pytest.raises(CorpusError, match=match) as err:
        open_table(kind, corpus_root)
    assert str(table) in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_every_bad_row_is_named_at_once(corpus_root, kind):
    write_table(kind, corpus_root, [("wav/a.wav", "grumpy"), ("wav/b.wav", "sad"), ("../x.wav", "anger")])
    with pytest.raises(CorpusError, match=r"2 bad row\(s\): line 2: unknown emotion .*; line 4: '\.\./x\.wav'"):
        open_table(kind, corpus_root)


@pytest.mark.parametrize("kind", KINDS)
def test_a_path_outside_the_root_is_never_opened(corpus_root, kind, tmp_path, monkeypatch):
    secret = tmp_path / "secret.wav"
    sf.write(secret, tone(), SAMPLE_RATE)
    opened = []

    def spy(real):
        return lambda file, *args, **kwargs: opened.append(str(file)) or real(file, *args, **kwargs)

    for module, name in ((builtins, "open"), (io, "open"), (sf, "SoundFile")):  # pathlib opens with io.open
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    write_table(kind, corpus_root, [*GOOD_ROWS, ("../secret.wav", "anger")])
    with pytest.raises(CorpusError, match="outside"):
        open_table(kind, corpus_root)
    if kind == "labels":  # the validator refuses the row too, and reads the other files
        report = validate.validate_folder(corpus_root, min_utterances=0, min_per_emotion=0)
        assert any("outside the folder" in p.message for p in report.errors) and report.audio.loaded == 3
    assert opened and not [p for p in opened if "secret" in p]


@pytest.mark.parametrize("kind", KINDS)
def test_absolute_paths_inside_the_root_are_accepted(corpus_root, kind):
    write_table(kind, corpus_root, [(str(corpus_root / "wav/a.wav"), "anger"), ("wav/b.wav", "sad")])
    corpus = open_table(kind, corpus_root)
    assert sorted(u.source for u in corpus.utterances) == [str(corpus_root / "wav/a.wav"),
                                                           str(corpus_root / "wav/b.wav")]
    if kind == "labels":  # the uid is the path inside the folder, however it was written
        assert sorted(u.uid for u in corpus.utterances) == ["wav/a.wav", "wav/b.wav"]


def _raw(content: bytes) -> Callable[[str, Path], Path]:
    return lambda kind, root: (root / ("m.csv" if kind == "manifest" else "labels.csv")).write_bytes(content)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda kind, root: write_table(kind, root, [*GOOD_ROWS[:1], ("wav/é.wav", "sad")], encoding="latin-1"),
         r"line 3 is not UTF-8 \(byte 0xe9\); save it as UTF-8 CSV"),
        (lambda kind, root: write_table(kind, root, GOOD_ROWS, encoding="utf-16"), r"is UTF-16 text; save it as UTF-8"),
        (lambda kind, root: write_table(kind, root, [("x" * 200_000, "sad")]), r"line \d+ is not valid CSV \(field"),
        (_raw(b""), r"is empty; expected"),
        (_raw(b" \r\n\r\n"), r"is empty; expected"),
        (_raw(b"who,what\nwav/a.wav,anger\n"), r"lacks required column\(s\) \[.*\]; found \['who', 'what'\]\. Fix:"),
    ],
    ids=["latin1", "utf16", "huge_field", "zero_bytes", "blank", "no_header"],
)
def test_unreadable_tables_say_why_and_how_to_fix(corpus_root, kind, make, match):
    make(kind, corpus_root)
    with pytest.raises(CorpusError, match=match):
        open_table(kind, corpus_root)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_files_are_counted_skips(corpus_root, kind):
    write_table(kind, corpus_root, [*GOOD_ROWS, ("wav/gone.wav", "anger")])
    utts, _, report = open_table(kind, corpus_root).load_speaker("spk")
    assert len(utts) == 3 and report.skipped == {"missing": ["wav/gone.wav"]}


def test_manifest_root_holds_lists_kept_beside_the_audio(corpus_root):
    lists = _mkdir(corpus_root / "lists")
    (lists / "m.csv").write_text("path,speaker,emotion\n../wav/a.wav,s1,anger\n../wav/b.wav,s2,sad\n")
    with pytest.raises(CorpusError, match=r"outside the corpus root .*set data\.root=DIR"):
        Manifest(lists / "m.csv")
    assert Manifest(lists / "m.csv", root=corpus_root).speakers == ["s1", "s2"]
    with pytest.raises(CorpusError, match=r"root .* is not a folder; set data\.root"):
        Manifest(lists / "m.csv", root=corpus_root / "nowhere")


# -- the feature cache ---------------------------------------------------------------------------------------
def cache_config(tmp_path: Path):
    return OmegaConf.create({"features": {"_target_": "fl_ser.features.Functionals", "sample_rate": SAMPLE_RATE},
                             "cache_dir": str(tmp_path / "cache"), "labels": None})


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "features").glob("*.pt"))


class RunsCode:
    """A pickle that would create a file if it were unpickled with ``weights_only=False``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _truncate(path: Path, tmp_path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path, tmp_path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).bytes(4096))


def _pickled_code(path: Path, tmp_path: Path) -> None:
    path.write_bytes(pickle.dumps({"x": RunsCode(tmp_path / "pwned")}, protocol=2))


def _nan_features(path: Path, tmp_path: Path) -> None:
    blob = torch.load(path, weights_only=True)
    blob["x"][0, 0] = float("nan")
    torch.save(blob, path)


def _wrong_lengths(path: Path, tmp_path: Path) -> None:
    blob = torch.load(path, weights_only=True)
    blob["ids"] = blob["ids"][:-1]
    torch.save(blob, path)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _pickled_code, _nan_features, _wrong_lengths])
def test_a_damaged_cache_file_is_rebuilt_not_trusted(corpus_root, tmp_path, damage, caplog):
    write_table("labels", corpus_root, GOOD_ROWS)
    cfg, corpus = cache_config(tmp_path), DeviceFolder(corpus_root, speaker="spk")
    fresh = speaker_data(cfg, "spk", corpus)
    [path] = cache_files(tmp_path)
    damage(path, tmp_path)
    with caplog.at_level(logging.WARNING, logger="fl_ser.task"):
        again = speaker_data(cfg, "spk", corpus)
    assert any("is damaged" in r.getMessage() and "rebuilding it" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "pwned").exists()
    assert torch.equal(again.x, fresh.x) and torch.equal(again.y, fresh.y) and again.ids == fresh.ids
    assert torch.load(path, weights_only=True)["report"] == fresh.report.to_dict()  # rewritten, plain data
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fl_ser.task"):
        speaker_data(cfg, "spk", corpus)
    assert not [r for r in caplog.records if "is damaged" in r.getMessage()]  # the rebuilt file is trusted


def test_the_cache_key_follows_files_and_audio_policy(corpus_root, tmp_path):
    write_table("labels", corpus_root, GOOD_ROWS)
    cfg = cache_config(tmp_path)
    first = speaker_data(cfg, "spk", DeviceFolder(corpus_root, speaker="spk"))
    speaker_data(cfg, "spk", DeviceFolder(corpus_root, speaker="spk"))
    assert len(cache_files(tmp_path)) == 1  # a hit
    sf.write(corpus_root / "wav/b.wav", tone(amp=0.5), SAMPLE_RATE)  # same size, new content and mtime
    stat = os.stat(corpus_root / "wav/b.wav")
    os.utime(corpus_root / "wav/b.wav", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = speaker_data(cfg, "spk", DeviceFolder(corpus_root, speaker="spk"))
    assert len(cache_files(tmp_path)) == 2 and not torch.equal(changed.x[1], first.x[1])
    speaker_data(cfg, "spk", DeviceFolder(corpus_root, speaker="spk", audio={"max_seconds": 30.0}))
    assert len(cache_files(tmp_path)) == 3


def test_non_finite_features_are_dropped_and_counted(corpus_root, tmp_path, monkeypatch):
    """The audio checks leave no way to it, but should an extractor ever return NaN, no model sees it."""
    import fl_ser.task

    def poisoned(extractor, waves):
        x = extract(extractor, waves)
        x[0, 3] = float("nan")
        return x

    monkeypatch.setattr(fl_ser.task, "extract", poisoned)
    write_table("labels", corpus_root, GOOD_ROWS)
    corpus = DeviceFolder(corpus_root, speaker="spk")
    data = speaker_data(cache_config(tmp_path), "spk", corpus)
    assert data.report.skipped == {"non-finite features": ["wav/a.wav"]} and data.report.loaded == 2
    assert len(data.x) == len(data.y) == len(data.ids) == 2 and torch.isfinite(data.x).all()
    assert data.y.tolist() == [corpus.emotions.index("happiness"), corpus.emotions.index("sadness")]


# -- a two-round federated run on a manifest mixing the fuzz files with good speech ---------------------
@pytest.mark.slow
def test_two_round_federated_run_survives_a_mixed_manifest(tmp_path):
    good = SyntheticCorpus(num_speakers=4, utterances_per_emotion=5, emotions=LABELS, seed=3)
    rows = ["path,speaker,emotion"]
    _mkdir(tmp_path / "corpus" / "good")
    for speaker in good.speakers:
        for utt, wave in zip(*good.load_speaker(speaker)[:2], strict=True):
            sf.write(tmp_path / "corpus" / "good" / f"{utt.uid}.wav", wave, SAMPLE_RATE)
            rows.append(f"good/{utt.uid}.wav,{speaker},{utt.emotion}")
    fuzzed = plant(tmp_path / "corpus" / "fuzz")
    rows += [f"fuzz/{p.name},{good.speakers[i % 4]},{LABELS[i % 4]}" for i, p in enumerate(fuzzed.values())]
    (tmp_path / "corpus" / "list.csv").write_text("\n".join(rows) + "\n")

    from experiments.train import run

    cfg = make_config(tmp_path, "data=manifest", f"data.manifest={tmp_path / 'corpus' / 'list.csv'}",
                      "partition.num_test_speakers=1", "rounds=2", "train.epochs=1")
    summary = run(cfg)
    run_dir = tmp_path / "run"
    assert summary["rounds"] == 2 and summary["num_devices"] == 3 and np.isfinite(summary["uar"])
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rounds[1:]] == [3, 3]  # every device trained in both rounds
    assert all(np.isfinite(r["loss"]) for r in rounds)
    checkpoints = sorted((run_dir / "checkpoints").glob("round_*.npz"))
    assert checkpoints and checkpoints[-1].name == "round_002.npz"  # the final model, among others
    for checkpoint in checkpoints:
        weights = [a for a in np.load(checkpoint).values() if a.dtype.kind == "f"]
        assert weights and all(np.isfinite(a).all() for a in weights), checkpoint
    # what the devices (3) and the server (1 test speaker) loaded: the planted skips and notes, no NaN
    blobs = [torch.load(p, weights_only=True) for p in (tmp_path / "cache" / "features").glob("*.pt")]
    skipped = sum((counts(b["report"]["skipped"]) for b in blobs), Counter())
    noted = sum((counts(b["report"]["noted"]) for b in blobs), Counter())
    assert skipped == SKIPPED and noted == NOTED
    assert all(torch.isfinite(b["x"]).all() for b in blobs)
