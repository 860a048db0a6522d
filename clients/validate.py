"""Check a participant's folder before a trial: every problem, with its file and line, and whether it is usable.
With ``--store``, check that the device's stored model loads and runs, too.

    python -m clients.validate DATA_DIR [--labels anger,boredom,...] [--min-utterances N]
                               [--min-per-emotion K] [--min-sample-rate HZ] [--max-seconds S]
                               [--long-files skip|crop] [--json] ...
    python -m clients.validate [DATA_DIR ...] --store STORE_DIR [--version N] [--runtime R] [--json]

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

The model check (``--store``) reads the store's latest version (``--version N``: that one), its file for the
runtime (``--runtime onnxruntime|torch|torchscript|executorch``; default: the best present, as
``clients.predict`` chooses), checked against its recorded sha256, loads it in that runtime and runs it on a
deterministic 3 s test signal (:func:`~fl_ser.models.runtimes.probe_signal`). It reports the output's shape, which
must be one row of one probability per label, and their sum, which must be 1 (within 1e-4) with none negative or
not finite. Each failure is an error naming the fix: an empty store, a missing version or file, a runtime that is
not installed, a damaged file, a model that does not load or gives the wrong output. Under onnxruntime it needs
no torch (``pip install fl-ser[device]``, see README "Inference on a device").
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from clients.cli import EXIT_FAILED, EXIT_OK, table, to_json
from clients.model_store import ModelStore, StoreError
from fl_ser.data.audio import LONG_FILES, NOTES, AudioError, AudioPolicy, load_audio
from fl_ser.data.corpus import EMOTIONS, SAMPLE_RATE, CorpusError, LoadReport
from fl_ser.data.loaders import DeviceFolder, normalise_emotion, wav_files
from fl_ser.models.runtimes import RUNTIMES, RuntimeMissing, file_of, open_model, probe_signal

#: Defaults: enough utterances for a useful local update, and for a personalisation hold-out per emotion.
MIN_UTTERANCES = 20
MIN_PER_EMOTION = 3
_LIST_AT_MOST = 5  # files named in a warning that groups many
#: The model check: the test signal's length (s), and how far from 1 its probabilities may sum (float32 softmax).
PROBE_SECONDS, SUM_TOLERANCE = 3.0, 1e-4


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


@dataclass
class ModelReport:
    """What :func:`validate_model` found; the model is usable when there are no errors."""

    store: str
    version: int | None = None
    runtime: str | None = None
    file: str | None = None
    labels: list[str] = field(default_factory=list)
    output_shape: list[int] | None = None  # for one waveform of PROBE_SECONDS
    probability_sum: float | None = None
    top: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}

    def text(self) -> str:
        name = f"model v{self.version:04d} in {self.store}" if self.version is not None else f"model store {self.store}"
        lines = [f"checking {name}"]
        if self.output_shape is not None:
            lines.append(f"{self.file} under {self.runtime}: output {tuple(self.output_shape)} for a "
                         f"{PROBE_SECONDS:g} s test signal, probabilities sum to {self.probability_sum:.6f} "
                         f"(top: {self.top})")
        lines += [f"ERROR    {error}" for error in self.errors]
        lines.append(f"{'OK' if self.ok else 'NOT USABLE'}: {len(self.errors)} error(s)")
        return "\n".join(lines)


def validate_model(store_dir: str | Path, version: int | None = None, runtime: str | None = None) -> ModelReport:
    """Load the stored model (the latest version unless ``version``) in ``runtime`` (default: the best present) and
    run it on a test signal; see the module docstring. Imports torch only for a torch runtime."""
    import numpy as np

    from clients.predict import choose_runtime

    report = ModelReport(str(Path(store_dir).expanduser()))
    try:
        store = ModelStore(store_dir)
        stored = store.latest() if version is None else store.get(version)
        report.version, report.labels = stored.version, list(stored.labels)
        report.runtime = choose_runtime(stored, runtime)
        report.file = file_of(report.runtime)
        data = store.read(stored, report.file)
    except (StoreError, RuntimeMissing) as err:
        report.errors.append(str(err))
        return report
    try:
        probs = np.asarray(open_model(report.runtime, data)(probe_signal(PROBE_SECONDS)[None]), dtype=np.float64)
    except Exception as err:  # each runtime raises its own types for a file it cannot load or run
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        report.errors.append(
            f"{report.file} does not load or run under {report.runtime} ({type(err).__name__}: {first}). Fix: use "
            "another --version or --runtime, or delete this version and let the device receive the model again"
        )
        return report
    report.output_shape = list(probs.shape)
    if probs.shape != (1, len(report.labels)):
        report.errors.append(f"the model gave shape {probs.shape} for one waveform, but its {len(report.labels)} "
                             f"labels need (1, {len(report.labels)}). Fix: use another version; this one is broken")
        return report
    report.probability_sum = float(probs.sum())
    report.top = report.labels[int(probs.argmax())]
    if not np.isfinite(probs).all() or (probs < 0).any() or abs(report.probability_sum - 1) > SUM_TOLERANCE:
        report.errors.append(f"the model's probabilities {np.round(probs[0], 6).tolist()} are not a distribution "
                             f"(sum {report.probability_sum:.6f}, allowed 1 +- {SUM_TOLERANCE}). Fix: use another "
                             "version; this one is broken")
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
    parser.add_argument("data_dir", metavar="DATA_DIR", nargs="?",
                        help="the participant's folder (WAV files + labels.csv)")
    parser.add_argument("--labels", type=_label_set, help="the experiment's label set, comma-separated")
    parser.add_argument("--min-utterances", type=_count, default=MIN_UTTERANCES, metavar="N")
    parser.add_argument("--min-per-emotion", type=_count, default=MIN_PER_EMOTION, metavar="K")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--store", metavar="STORE_DIR", help="also check that the device's stored model runs")
    parser.add_argument("--version", type=int, metavar="N", help="with --store: the version (default: the latest)")
    parser.add_argument("--runtime", choices=list(RUNTIMES), help="with --store: run the model with this runtime "
                        f"(default: the first installed of {', '.join(RUNTIMES)} whose file the version has)")
    for setting in fields(AudioPolicy):  # the audio policy's settings, named as in the experiment's data.audio
        parser.add_argument(f"--{setting.name.replace('_', '-')}", type=type(setting.default), default=setting.default,
                            choices=LONG_FILES if setting.name == "long_files" else None,
                            help=f"audio policy (fl_ser.data.audio.AudioPolicy); default {setting.default}")
    args = parser.parse_args(argv)
    if args.data_dir is None and args.store is None:
        parser.error("give a participant folder (DATA_DIR), a model store (--store STORE_DIR), or both")
    if args.store is None and (args.version is not None or args.runtime is not None):
        parser.error("--version and --runtime choose the stored model to check: give --store STORE_DIR too")
    try:
        audio = AudioPolicy(**{setting.name: getattr(args, setting.name) for setting in fields(AudioPolicy)})
    except ValueError as err:
        parser.error(str(err))
    folder = (validate_folder(args.data_dir, args.labels, args.min_utterances, args.min_per_emotion, audio)
              if args.data_dir is not None else None)
    model = validate_model(args.store, args.version, args.runtime) if args.store is not None else None
    reports = [report for report in (folder, model) if report is not None]
    ok = all(report.ok for report in reports)
    if args.json:
        answer = folder.to_dict() if folder is not None else {}
        print(to_json(answer | ({"model": model.to_dict()} if model is not None else {}) | {"ok": ok}))
    else:
        print("\n\n".join(report.text() for report in reports))
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
