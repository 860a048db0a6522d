"""Check a participant's folder before a trial: every problem, with its file and line, and whether it is usable.

    python -m clients.validate DATA_DIR [--labels anger,boredom,...] [--min-utterances N]
                               [--min-per-emotion K] [--json]

The folder is what :class:`~fl_ser.data.loaders.DeviceFolder` reads: WAV files plus
``labels.csv`` with header ``file,emotion``. Errors make the folder unusable as it is
(exit status 1); warnings do not (exit status 0); usage errors exit with 2.

Errors: a missing folder or ``labels.csv``, a missing column, a bad row (empty value,
unknown emotion, a file outside the folder, a file listed twice), a listed file that is
missing or that :func:`~fl_ser.data.audio.read_audio` rejects (unreadable, empty, too
short, silent), an emotion outside ``--labels`` (the experiment's label set), a file
recorded below 16 kHz, too few usable utterances overall or of an emotion present.

Files recorded below 16 kHz are errors, not warnings: the features use the whole band up
to 8 kHz (mel bands, alpha ratio 1-5 kHz, Hammarberg index 2-5 kHz), which upsampling
cannot restore, so such a device's features (and the updates it trains) would differ
systematically from everyone else's. Re-record at 16 kHz or more.

Warnings: files at other rates above 16 kHz (resampled when read), WAV files in the folder
that ``labels.csv`` does not list (ignored), two rows with identical audio, and emotions of
``--labels`` with no usable recording. Nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import soundfile as sf

from clients.cli import EXIT_FAILED, EXIT_OK, table, to_json
from fl_ser.data.audio import AudioError, read_audio
from fl_ser.data.corpus import EMOTIONS, SAMPLE_RATE, CorpusError
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
        lines.append(self.summary())
        return "\n".join(lines)


def _named(files: list[str]) -> str:
    more = f" and {len(files) - _LIST_AT_MOST} more" if len(files) > _LIST_AT_MOST else ""
    return ", ".join(files[:_LIST_AT_MOST]) + more


def _audio_problem(source: Path) -> str | None:
    """Why a listed file cannot be used as it is (and the fix), or None."""
    if not source.is_file():
        return "the file does not exist; add it to the folder or remove the row"
    try:
        read_audio(source)
    except AudioError as err:
        return f"{err.reason} audio ({err.detail}); replace the recording or remove the row"
    rate = sf.info(str(source)).samplerate
    if rate < SAMPLE_RATE:
        return (
            f"recorded at {rate} Hz, below the {SAMPLE_RATE} Hz the features need (upsampling cannot restore "
            "the missing band); re-record at 16 kHz or more"
        )
    return None


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
) -> ValidationReport:
    """Check a participant folder (see the module docstring); ``labels`` is the experiment's label set, if known."""
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
        listed.add(source.resolve())
        if labels is not None and utt.emotion not in labels:
            problem = (
                f"emotion {utt.emotion!r} is not in the experiment's label set {labels}; relabel or remove the row"
            )
        else:
            problem = _audio_problem(source)
        if problem:
            report.errors.append(Problem(where, problem))
            continue
        info = sf.info(str(source))
        report.sample_rates[utt.uid] = int(info.samplerate)
        report.durations[utt.uid] = float(info.duration)
        counts[utt.emotion] += 1
        if info.samplerate != SAMPLE_RATE:
            resampled.setdefault(int(info.samplerate), []).append(utt.uid)
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        if digest in first_with_audio:
            report.warnings.append(
                Problem(where, f"same audio as {first_with_audio[digest]}; remove one unless both are intended")
            )
        first_with_audio.setdefault(digest, where)

    for rate, files in sorted(resampled.items()):
        report.warnings.append(
            Problem(_named(files), f"recorded at {rate} Hz; will be resampled to {SAMPLE_RATE} Hz when read")
        )
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
    args = parser.parse_args(argv)
    report = validate_folder(args.data_dir, args.labels, args.min_utterances, args.min_per_emotion)
    print(to_json(report.to_dict()) if args.json else report.text())
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
