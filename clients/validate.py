"""Check a participant's folder before a trial: every problem, with its file and line, and whether it is usable.

    python -m clients.validate DATA_DIR [--labels anger,boredom,...] [--min-utterances N]
                               [--min-per-emotion K] [--min-sample-rate HZ] [--max-seconds S]
                               [--long-files skip|crop] [--json] ...

The folder is what :class:`~fl_ser.data.loaders.DeviceFolder` reads: WAV files plus
``labels.csv`` with header ``file,emotion``. Errors make the folder unusable as it is
(exit status 1); warnings do not (exit status 0); usage errors exit with 2.

Errors: a missing folder or ``labels.csv``, a table that is not UTF-8 CSV or lacks a column,
a bad row (empty value, unknown emotion, a file outside the folder, a file listed twice), an
emotion outside ``--labels`` (the experiment's label set), a listed file that
:func:`~fl_ser.data.audio.load_audio` refuses, and too few usable utterances overall or of
an emotion present. Refused files are counted by the reasons the loaders count
(``fl_ser.data.audio.REASONS``, e.g. non-finite, too long, low sample rate), under the same
audio policy, whose settings are options here (``--min-sample-rate``, ``--max-seconds``,
``--long-files`` ...; defaults as in the experiment's ``data.audio``).

Files recorded below 16 kHz are errors, not warnings: the features use the whole band up
to 8 kHz (mel bands, alpha ratio 1-5 kHz, Hammarberg index 2-5 kHz), which upsampling
cannot restore, so such a device's features (and the updates it trains) would differ
systematically from everyone else's. Re-record at 16 kHz or more.

Warnings: files at other rates above 16 kHz (resampled when read), clipped or cropped files
(``fl_ser.data.audio.NOTES``: kept), WAV files in the folder that ``labels.csv`` does not
list (ignored), two rows with identical audio, and emotions of ``--labels`` with no usable
recording. Nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from clients.cli import EXIT_FAILED, EXIT_OK, table, to_json
from fl_ser.data.audio import LONG_FILES, NOTES, AudioError, AudioPolicy, load_audio
from fl_ser.data.corpus import EMOTIONS, SAMPLE_RATE, CorpusError, LoadReport
from fl_ser.data.loaders import DeviceFolder, normalise_emotion, wav_files

#: Defaults: enough utterances for a useful local update, and for a personalisation hold-out per emotion.
MIN_UTTERANCES = 20
MIN_PER_EMOTION = 3
_LIST_AT_MOST = 5  # files named in a warning that groups many


@dataclass(frozen=True)
class Problem:
    where: str  # "labels.csv line 4 (take_03.wav)", a file, or the folder
    message: str  # what is wrong and how to fix it

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class ValidationReport:
    """What :func:`validate_folder` found; the folder is usable when there are no errors."""

    folder: str
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # usable utterances per emotion
    durations: dict[str, float] = field(default_factory=dict)  # seconds per usable file (labels.csv path)
    sample_rates: dict[str, int] = field(default_factory=dict)  # native rate per usable file
    audio: LoadReport = field(default_factory=LoadReport)  # listed files read, skipped (by reason) and noted

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def num_utterances(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        verdict = "OK" if self.ok else "NOT USABLE"
        return (
            f"{verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s); "
            f"{self.num_utterances} usable utterances, {sum(self.durations.values()):.1f} s"
        )

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}

    def text(self) -> str:
        lines = [f"checking {self.folder}"]
        lines += [f"ERROR    {p}" for p in self.errors]
        lines += [f"WARNING  {p}" for p in self.warnings]
        if self.counts:
            lines += ["", table(["emotion", "utterances"], list(self.counts.items())), ""]
        lines += [f"audio files: {self.audio.summary()}", self.summary()]
        return "\n".join(lines)


def _named(files: list[str]) -> str:
    more = f" and {len(files) - _LIST_AT_MOST} more" if len(files) > _LIST_AT_MOST else ""
    return ", ".join(files[:_LIST_AT_MOST]) + more


def _amount_problems(
    counts: dict[str, int], labels: list[str] | None, min_utterances: int, min_per_emotion: int
) -> tuple[list[str], list[str]]:
    """(errors, warnings) about how many usable utterances there are, overall and per emotion."""
    errors, warnings = [], []
    total = sum(counts.values())
    if total < min_utterances:
        errors.append(f"{total} usable utterances, fewer than the {min_utterances} needed; record more")
    for emotion, n in counts.items():
        if n < min_per_emotion:
            errors.append(
                f"only {n} usable {emotion!r} utterance(s), fewer than {min_per_emotion}; "
                f"record more of them or remove the {emotion!r} rows"
            )
    missing = [e for e in labels or [] if e not in counts]
    if missing:
        warnings.append(f"no usable recordings of {missing}; the device cannot learn or be scored on them")
    return errors, warnings


def validate_folder(
    path: str | Path,
    labels: list[str] | None = None,
    min_utterances: int = MIN_UTTERANCES,
    min_per_emotion: int = MIN_PER_EMOTION,
    audio: AudioPolicy | None = None,
) -> ValidationReport:
    """Check a participant folder (see the module docstring); ``labels`` is the experiment's label set, if known,
    and ``audio`` the experiment's audio policy (default: :class:`~fl_ser.data.audio.AudioPolicy`'s defaults)."""
    folder = Path(path).expanduser()
    report = ValidationReport(str(folder))
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        report.errors.append(Problem(str(folder), f"{state}; give the participant's folder, the one with labels.csv"))
        return report
    try:
        rows = DeviceFolder.read_labels(folder, folder.resolve().name)
    except CorpusError as err:
        report.errors.append(Problem(DeviceFolder.TABLE, str(err)))
        return report

    listed: set[Path] = set()
    first_with_audio: dict[str, str] = {}  # sha256 of the file -> the row that listed it first
    resampled: dict[int, list[str]] = {}  # native rate -> files
    counts: Counter[str] = Counter()
    for row in rows:
        where = f"{DeviceFolder.TABLE} line {row.line}"
        if row.utterance is None:
            report.errors.append(Problem(where, str(row.problem)))
            continue
        utt, source = row.utterance, Path(row.utterance.source)
        where = f"{where} ({utt.uid})"
        listed.add(source)
        if labels is not None and utt.emotion not in labels:
            problem = f"emotion {utt.emotion!r} is not in the experiment's label set {labels}"
            report.errors.append(Problem(where, f"{problem}; relabel or remove the row"))
            continue
        try:
            loaded = load_audio(source, audio)
        except AudioError as err:
            report.audio.skip(err.reason, utt.uid)
            report.errors.append(Problem(where, f"{err.reason} audio ({err.detail}); {err.fix}"))
            continue
        for note in loaded.notes:
            report.audio.note(note, utt.uid)
        report.sample_rates[utt.uid] = loaded.rate
        report.durations[utt.uid] = len(loaded.wave) / SAMPLE_RATE
        counts[utt.emotion] += 1
        if loaded.rate != SAMPLE_RATE:
            resampled.setdefault(loaded.rate, []).append(utt.uid)
        with open(source, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest in first_with_audio:
            report.warnings.append(
                Problem(where, f"same audio as {first_with_audio[digest]}; remove one unless both are intended")
            )
        first_with_audio.setdefault(digest, where)

    report.audio.loaded = sum(counts.values())
    for rate, files in sorted(resampled.items()):
        report.warnings.append(
            Problem(_named(files), f"recorded at {rate} Hz; will be resampled to {SAMPLE_RATE} Hz when read")
        )
    for note, files in sorted(report.audio.noted.items()):
        report.warnings.append(Problem(_named(files), f"{note}: {NOTES[note]}"))
    for wav in wav_files(folder, recursive=True):
        if wav.resolve() not in listed:
            name = wav.relative_to(folder).as_posix()
            report.warnings.append(
                Problem(name, f"not listed in {DeviceFolder.TABLE}, so it is ignored; add a row '{name},EMOTION'")
            )
    order = labels or list(EMOTIONS)
    report.counts = {e: counts[e] for e in sorted(counts, key=order.index)}
    errors, warnings = _amount_problems(report.counts, labels, min_utterances, min_per_emotion)
    report.errors += [Problem(str(folder), message) for message in errors]
    report.warnings += [Problem(str(folder), message) for message in warnings]
    return report


def _label_set(text: str) -> list[str]:
    names = [name for name in (part.strip() for part in text.split(",")) if name]
    canonical = [normalise_emotion(name) for name in names]
    unknown = [name for name, c in zip(names, canonical, strict=True) if c is None]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown emotion(s) {unknown}; use names from {list(EMOTIONS)}")
    return [c for c in canonical if c is not None]


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.validate", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", metavar="DATA_DIR", help="the participant's folder (WAV files + labels.csv)")
    parser.add_argument("--labels", type=_label_set, help="the experiment's label set, comma-separated")
    parser.add_argument("--min-utterances", type=_count, default=MIN_UTTERANCES, metavar="N")
    parser.add_argument("--min-per-emotion", type=_count, default=MIN_PER_EMOTION, metavar="K")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    for setting in fields(AudioPolicy):  # the audio policy's settings, named as in the experiment's data.audio
        parser.add_argument(f"--{setting.name.replace('_', '-')}", type=type(setting.default), default=setting.default,
                            choices=LONG_FILES if setting.name == "long_files" else None,
                            help=f"audio policy (fl_ser.data.audio.AudioPolicy); default {setting.default}")
    args = parser.parse_args(argv)
    try:
        audio = AudioPolicy(**{setting.name: getattr(args, setting.name) for setting in fields(AudioPolicy)})
    except ValueError as err:
        parser.error(str(err))
    report = validate_folder(args.data_dir, args.labels, args.min_utterances, args.min_per_emotion, audio)
    print(to_json(report.to_dict()) if args.json else report.text())
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
