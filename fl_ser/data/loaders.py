"""Loaders for real emotional-speech corpora in their published folder layouts.

Each loader only reads file *names* (and, where the corpus ships one, a
demographics table) when constructed; audio is read on the device side by
:meth:`~fl_ser.data.corpus.Corpus.load_speaker` through :func:`read_audio`.

* :class:`EmoDB`    ``root/wav/03a01Fa.wav``
* :class:`RAVDESS`  ``root/Actor_01/03-01-05-01-01-01-01.wav``
* :class:`CremaD`   ``root/AudioWAV/1001_DFA_ANG_XX.wav`` (+ ``root/VideoDemographics.csv``)
* :class:`Manifest` a CSV ``path,speaker,emotion[,sex]`` for any other corpus
* :class:`DeviceFolder` one participant's folder of WAV files plus ``labels.csv`` (``file,emotion``)

Every loader reads audio under an :class:`~fl_ser.data.audio.AudioPolicy` (its ``audio``
argument, the ``audio:`` block of ``conf/data/*.yaml``).

The two table-driven loaders share :class:`TableCorpus`: it parses each row into an
utterance or a problem (with its line number), so a loader can refuse the table naming every
bad row while ``clients.validate`` reports them all. A table must be UTF-8 (a BOM and CRLF
line ends are fine). A listed path (relative to the table's folder, or absolute) must
resolve, symbolic links followed, inside the corpus root: one that leads elsewhere
(``../../etc/passwd``) is refused before anything is opened. Listed files that are missing
or unusable are skipped and counted when their speaker is loaded.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from fl_ser.data.audio import AudioPolicy, PolicyLike, load_audio
from fl_ser.data.corpus import EMOTIONS, Corpus, CorpusError, Utterance

log = logging.getLogger(__name__)

#: Common spellings of emotion labels, mapped to the canonical names in :data:`EMOTIONS`.
EMOTION_ALIASES = {
    "angry": "anger",
    "happy": "happiness",
    "sad": "sadness",
    "fearful": "fear",
    "bored": "boredom",
    "disgusted": "disgust",
    "surprised": "surprise",
}

_SEX_VALUES = {"f": "f", "female": "f", "m": "m", "male": "m", "": None}


def normalise_emotion(label: str) -> str | None:
    """Return the canonical name for ``label`` (case-insensitive, aliases allowed), or None."""
    key = label.strip().lower()
    key = EMOTION_ALIASES.get(key, key)
    return key if key in EMOTIONS else None


def wav_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The ``.wav`` files (any case) in ``folder`` (and its subfolders if ``recursive``), sorted; [] if no folder."""
    if not folder.is_dir():
        return []
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() == ".wav")


class FileCorpus(Corpus):
    """A corpus whose utterances are audio files on disk (``Utterance.source`` is the path)."""

    #: Human description of the expected layout, and the corpus's display name, for error messages.
    layout: str = ""
    display: str = ""

    def __init__(self, emotions: list[str] | tuple[str, ...] | None = None, audio: PolicyLike = None):
        super().__init__(emotions)
        self.audio = AudioPolicy.of(audio)

    @property
    def fix(self) -> str:
        """How to point the loader at the right folder (ends every error about the root)."""
        return f"pass data.root=DIR pointing at the {self.display} folder"

    def _load_noted(self, utt: Utterance) -> tuple[np.ndarray, tuple[str, ...]]:
        audio = load_audio(utt.source, self.audio)
        return audio.wave, audio.notes

    def _load_audio(self, utt: Utterance) -> np.ndarray:
        return self._load_noted(utt)[0]

    def fingerprint(self, speaker: str) -> dict:
        files = []
        for utt in self.utterances_of(speaker):
            try:
                stat = os.stat(utt.source)
                files.append([utt.uid, stat.st_size, stat.st_mtime_ns])
            except OSError:
                files.append([utt.uid, None, None])
        return {"audio": asdict(self.audio), "files": files}

    def _fail(self, root: Path, problem: str) -> CorpusError:
        return CorpusError(f"{self.name}: {root} {problem}; expected {self.layout}. Fix: {self.fix}.")

    def _check_root(self, root: str | Path) -> Path:
        root = Path(root).expanduser()
        if not root.exists():
            raise self._fail(root, "does not exist")
        if not root.is_dir():
            raise self._fail(root, "is not a folder")
        return root

    def _collect(self, root: Path, files: Iterable[Path], parse) -> None:
        """Build utterances from ``files`` with ``parse(path) -> Utterance | None``, then finalise.

        Names that ``parse`` rejects are ignored and counted; a second file with an
        already-seen uid is ignored with a warning.
        """
        utterances: dict[str, Utterance] = {}
        ignored: list[str] = []
        for path in files:
            utt = parse(path)
            if utt is None:
                ignored.append(path.name)
            elif utt.uid in utterances:
                log.warning("%s: %s duplicates %s; ignoring it", self.name, path, utterances[utt.uid].source)
            else:
                utterances[utt.uid] = utt
        if ignored:
            log.warning(
                "%s: ignored %d file(s) in %s not named like %s (e.g. %s)",
                self.name,
                len(ignored),
                root,
                self.layout,
                ", ".join(ignored[:3]),
            )
        if not utterances:
            raise self._fail(root, "has no files in the expected layout")
        self._finalise(list(utterances.values()), where=str(root))


class EmoDB(FileCorpus):
    """Berlin Database of Emotional Speech: ``root/wav/SSTTTEV.wav`` (or the wavs directly in ``root``)."""

    name = "emodb"
    display = "EmoDB"
    layout = "wav/03a01Fa.wav-style files (speaker, text, emotion letter, version)"

    CODES: ClassVar[dict[str, str]] = {
        "W": "anger",
        "L": "boredom",
        "E": "disgust",
        "A": "fear",
        "F": "happiness",
        "T": "sadness",
        "N": "neutral",
    }
    SEX: ClassVar[dict[str, str]] = {
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
    _NAME = re.compile(r"^(\d\d)([a-z]\d\d)([WLEAFTN])([a-z])$")

    def __init__(self, root: str | Path, emotions: list[str] | tuple[str, ...] | None = None, audio: PolicyLike = None):
        super().__init__(emotions, audio)
        self.root = self._check_root(root)
        self._collect(self.root, wav_files(self.root / "wav") + wav_files(self.root), self._parse)

    def _parse(self, path: Path) -> Utterance | None:
        m = self._NAME.match(path.stem)
        if not m:
            return None
        speaker, _text, code, _version = m.groups()
        return Utterance(path.stem, speaker, self.CODES[code], self.SEX.get(speaker), str(path))


class RAVDESS(FileCorpus):
    """RAVDESS speech: ``root/Actor_NN/03-01-EE-II-SS-RR-AA.wav`` (audio-only speech files only).

    ``Actor_*`` folders are searched directly under ``root`` and one level deeper.
    Song (vocal channel 02) and video files are ignored.
    """

    name = "ravdess"
    display = "RAVDESS"
    layout = "Actor_01/03-01-05-01-01-01-01.wav-style files (audio-only speech)"

    CODES: ClassVar[dict[str, str]] = {
        "01": "neutral",
        "02": "calm",
        "03": "happiness",
        "04": "sadness",
        "05": "anger",
        "06": "fear",
        "07": "disgust",
        "08": "surprise",
    }
    _NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")

    def __init__(self, root: str | Path, emotions: list[str] | tuple[str, ...] | None = None, audio: PolicyLike = None):
        super().__init__(emotions, audio)
        self.root = self._check_root(root)
        actors = [p for p in sorted(self.root.glob("Actor_*")) + sorted(self.root.glob("*/Actor_*")) if p.is_dir()]
        self._collect(self.root, [f for d in actors for f in wav_files(d)], self._parse)

    def _parse(self, path: Path) -> Utterance | None:
        m = self._NAME.match(path.stem)
        if not m or m.group(3) not in self.CODES:
            return None
        modality, channel, emotion, _intensity, _statement, _rep, actor = m.groups()
        if (modality, channel) != ("03", "01"):
            return None
        sex = "m" if int(actor) % 2 else "f"
        return Utterance(path.stem, actor, self.CODES[emotion], sex, str(path))


class CremaD(FileCorpus):
    """CREMA-D: ``root/AudioWAV/AAAA_SSS_EEE_LL.wav``; sex from ``root/VideoDemographics.csv`` if present."""

    name = "crema_d"
    display = "CREMA-D"
    layout = "AudioWAV/1001_DFA_ANG_XX.wav-style files"

    CODES: ClassVar[dict[str, str]] = {
        "ANG": "anger",
        "DIS": "disgust",
        "FEA": "fear",
        "HAP": "happiness",
        "NEU": "neutral",
        "SAD": "sadness",
    }
    _NAME = re.compile(r"^(\d+)_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")

    def __init__(self, root: str | Path, emotions: list[str] | tuple[str, ...] | None = None, audio: PolicyLike = None):
        super().__init__(emotions, audio)
        self.root = self._check_root(root)
        self.sexes = self._read_demographics(self.root / "VideoDemographics.csv")
        self._collect(self.root, wav_files(self.root / "AudioWAV") + wav_files(self.root), self._parse)

    def _read_demographics(self, path: Path) -> dict[str, str]:
        if not path.is_file():
            log.info("%s: %s not found; speaker sex unknown", self.name, path)
            return {}
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"ActorID", "Sex"} <= set(rows[0]):
            raise CorpusError(f"{self.name}: {path} lacks the ActorID and Sex columns; found {sorted(rows[0])}")
        sexes = {}
        for row in rows:
            sex = _SEX_VALUES.get((row["Sex"] or "").strip().lower())
            if sex:
                sexes[row["ActorID"].strip()] = sex
        return sexes

    def _parse(self, path: Path) -> Utterance | None:
        m = self._NAME.match(path.stem)
        if not m or m.group(3) not in self.CODES:
            return None
        actor, _sentence, emotion, _level = m.groups()
        return Utterance(path.stem, actor, self.CODES[emotion], self.sexes.get(actor), str(path))


@dataclass(frozen=True)
class TableRow:
    """One data row of a corpus table: its line number and the utterance it lists, or why it cannot be used."""

    line: int
    utterance: Utterance | None
    problem: str | None = None


_SAVE_AS_UTF8 = "save it as UTF-8 CSV (in a spreadsheet: 'CSV UTF-8')"
_LIST_AT_MOST = 10  # bad rows named in one error


def _require(values: dict[str, str], columns: Iterable[str]) -> None:
    for column in columns:
        if not values.get(column):
            raise CorpusError(f"empty {column!r}; fill it in or remove the row")


def _emotion(label: str) -> str:
    emotion = normalise_emotion(label)
    if emotion is None:
        raise CorpusError(f"unknown emotion {label!r}; use one of {EMOTIONS} or an alias {sorted(EMOTION_ALIASES)}")
    return emotion


def _inside(written: str, base: Path, root: Path, outside: str) -> Path:
    """``written`` (relative to ``base``, or absolute) resolved, symbolic links followed; nothing is opened.

    Raises :class:`CorpusError` with ``outside`` (the problem and its fix) unless it lies inside ``root`` (resolved).
    """
    try:
        path = Path(written).expanduser()
        resolved = (path if path.is_absolute() else base / path).resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a NUL byte, a symlink loop, an unknown ~user
        raise CorpusError(f"{written!r} is not a usable path ({err}); correct it or remove the row") from None
    if not resolved.is_relative_to(root):
        raise CorpusError(f"{written!r} resolves to {resolved}, {outside}")
    return resolved


class TableCorpus(FileCorpus):
    """A corpus listed in a CSV table, one utterance per row (:class:`Manifest`, :class:`DeviceFolder`).

    Column names are case-insensitive and values are stripped. Subclasses name their
    :attr:`REQUIRED` columns and turn a row's values into an :class:`Utterance` whose ``source`` is the
    resolved path, raising :class:`CorpusError` with the problem; the table's path and line number are added here.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _text(cls, table: Path) -> str:
        """The table's text; :class:`CorpusError` naming the line and the fix when it is unreadable, empty or not
        UTF-8 (a UTF-8 BOM is dropped)."""
        try:
            raw = table.read_bytes()
        except OSError as err:
            raise CorpusError(f"{cls.name}: {table} cannot be read ({err}); check its permissions") from None
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise CorpusError(f"{cls.name}: {table} is UTF-16 text; {_SAVE_AS_UTF8}")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise CorpusError(f"{cls.name}: {table} line {line} is not UTF-8 (byte {raw[err.start]:#04x}); "
                              f"{_SAVE_AS_UTF8}") from None
        if not text.strip():
            raise CorpusError(f"{cls.name}: {table} is empty; expected {cls.layout}")
        return text

    @classmethod
    def _read_table(cls, table: Path, parse: Callable[[dict[str, str]], Utterance]) -> list[TableRow]:
        """Every row of ``table``, parsed; a row's problem (a bad value, a file listed twice) is kept, not raised.

        Raises :class:`CorpusError` only when the table as a whole is unusable (not UTF-8 CSV, a required column
        missing).
        """
        reader = csv.DictReader(io.StringIO(cls._text(table), newline=""))
        try:
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            missing = [c for c in cls.REQUIRED if c not in columns]
            if missing:
                raise CorpusError(
                    f"{cls.name}: {table} lacks required column(s) {missing}; found {columns}. "
                    f"Fix: make its first line the header, e.g. {','.join(cls.REQUIRED)}. Expected {cls.layout}."
                )
            reader.fieldnames = columns
            first_line: dict[str, int] = {}  # resolved file -> the line that listed it first
            rows = []
            for record in reader:
                line = reader.line_num
                try:
                    utt = parse({k: (v or "").strip() for k, v in record.items() if k is not None})
                except CorpusError as err:
                    rows.append(TableRow(line, None, str(err)))
                    continue
                if utt.source in first_line:
                    problem = f"{utt.uid} is listed again (first on line {first_line[utt.source]}); remove one row"
                    rows.append(TableRow(line, None, problem))
                else:
                    first_line[utt.source] = line
                    rows.append(TableRow(line, utt))
        except csv.Error as err:
            raise CorpusError(
                f"{cls.name}: {table} line {reader.line_num} is not valid CSV ({err}); {_SAVE_AS_UTF8}: {cls.layout}"
            ) from None
        return rows

    def _accept(self, table: Path, rows: list[TableRow]) -> None:
        """Finalise the corpus from a table's rows; refuse it, naming every bad row (10 at most), if any is bad."""
        bad = [f"line {row.line}: {row.problem}" for row in rows if row.problem]
        if bad:
            more = f"; and {len(bad) - _LIST_AT_MOST} more" if len(bad) > _LIST_AT_MOST else ""
            raise CorpusError(f"{self.name}: {table} has {len(bad)} bad row(s): " + "; ".join(bad[:_LIST_AT_MOST])
                              + more)
        if not rows:
            raise CorpusError(f"{self.name}: {table} lists no utterances; expected {self.layout}. Fix: {self.fix}.")
        self._finalise([row.utterance for row in rows if row.utterance], where=str(table))


class Manifest(TableCorpus):
    """Any corpus described by a CSV with columns ``path,speaker,emotion`` and optional ``sex``.

    Paths are relative to the CSV's folder, or absolute; either way they must lie inside ``root``
    (default: the CSV's folder; set it when the manifest sits beside the audio, e.g. in
    ``corpus/lists/``). Emotion labels are case-insensitive and may use the aliases in
    :data:`EMOTION_ALIASES`; ``sex`` may be f, m, female, male or empty.
    """

    name = "manifest"
    display = "manifest"
    layout = "a CSV file with header path,speaker,emotion[,sex]"
    fix = "pass data.manifest=FILE pointing at the CSV"
    REQUIRED: ClassVar[tuple[str, ...]] = ("path", "speaker", "emotion")

    def __init__(self, manifest: str | Path, emotions: list[str] | tuple[str, ...] | None = None,
                 root: str | Path | None = None, audio: PolicyLike = None):
        super().__init__(emotions, audio)
        path = Path(manifest).expanduser()
        if not path.is_file():
            raise self._fail(path, "does not exist" if not path.exists() else "is not a file")
        self.manifest = path
        self.root = Path(root).expanduser().resolve() if root else path.parent.resolve()
        if not self.root.is_dir():
            raise CorpusError(f"{self.name}: root {self.root} is not a folder; set data.root to the folder holding "
                              "the listed files, or leave it null (the CSV's folder)")
        self._accept(path, self._read_table(path, self._parse))

    def _parse(self, values: dict[str, str]) -> Utterance:
        _require(values, self.REQUIRED)
        emotion = _emotion(values["emotion"])
        sex_text = values.get("sex", "").lower()
        if sex_text not in _SEX_VALUES:
            raise CorpusError(f"unknown sex {values['sex']!r}; use f, m, female, male or empty")
        outside = (f"outside the corpus root {self.root}; list only files under it, or set data.root=DIR to a "
                   "folder that holds every listed file")
        source = _inside(values["path"], self.manifest.parent, self.root, outside)
        return Utterance(values["path"], values["speaker"], emotion, _SEX_VALUES[sex_text], str(source))


class DeviceFolder(TableCorpus):
    """One participant's recordings on their device: WAV files plus ``labels.csv`` with columns ``file,emotion``.

    ``file`` is the path of a recording inside the folder (subfolders are fine; an absolute path
    inside the folder works too; the uid is the path relative to the folder). Emotion labels are as
    in :class:`Manifest`. Every utterance belongs to ``speaker`` (default: the folder's name). With
    ``emotions`` given, class ``i`` is ``emotions[i]`` even if the participant recorded none of some of
    them (one person rarely covers every emotion); rows of other emotions are left out.
    Check a folder before a trial with ``python -m clients.validate DATA_DIR``.
    """

    name = "device_folder"
    display = "participant"
    layout = "a folder of WAV files plus labels.csv with header file,emotion"
    fix = "point it at the participant's folder, the one holding labels.csv"
    requires_every_emotion = False
    TABLE: ClassVar[str] = "labels.csv"
    REQUIRED: ClassVar[tuple[str, ...]] = ("file", "emotion")

    def __init__(
        self,
        root: str | Path,
        speaker: str | None = None,
        emotions: list[str] | tuple[str, ...] | None = None,
        audio: PolicyLike = None,
    ):
        super().__init__(emotions, audio)
        self.root = self._check_root(root)
        self.speaker = speaker or self.root.resolve().name
        self._accept(self.root / self.TABLE, self.read_labels(self.root, self.speaker))

    @classmethod
    def read_labels(cls, root: Path, speaker: str) -> list[TableRow]:
        """Every row of ``root/labels.csv``, parsed, problems kept (see :meth:`TableCorpus._read_table`).

        Raises :class:`CorpusError` when ``labels.csv`` is missing, not UTF-8 CSV, or lacks a required column.
        """
        table = root / cls.TABLE
        if not table.is_file():
            raise CorpusError(
                f"{cls.name}: {root} has no {cls.TABLE}; expected {cls.layout}. Fix: add {cls.TABLE} with one row "
                "per recording, e.g. 'take_01.wav,happiness'."
            )
        return cls._read_table(table, lambda values: cls._utterance(root.resolve(), speaker, values))

    @classmethod
    def _utterance(cls, root: Path, speaker: str, values: dict[str, str]) -> Utterance:
        _require(values, cls.REQUIRED)
        emotion = _emotion(values["emotion"])
        source = _inside(values["file"], root, root, f"outside the folder; give its path relative to {root}")
        return Utterance(source.relative_to(root).as_posix(), speaker, emotion, None, str(source))
