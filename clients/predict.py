"""Emotions of recordings from a stored model, on the device: per file, or scored against a participant's labels.

    python -m clients.predict --store STORE_DIR [--version N] FILE_OR_FOLDER [--json]
    python -m clients.predict --store STORE_DIR [--version N] --evaluate DATA_DIR [--json]

For each WAV file (a folder is searched recursively) it prints the top emotion and the
probability of each class; ``--json`` prints a list of ``{file, top, probabilities: {label: p}}``.
With ``--evaluate``, DATA_DIR is a participant folder (WAV files plus ``labels.csv``, see
``clients.validate``) and the model is scored against its labels: UAR, accuracy, macro-F1,
recall per class and the confusion matrix; recordings of emotions the model does not know are
left out. The model is the store's latest version unless ``--version`` names one.

Audio is read with :func:`~fl_ser.data.audio.read_audio` (mono, resampled to 16 kHz). A file
it rejects is reported with the reason and skipped, and the exit status is then 1 (2 for a
usage error). Nothing leaves the device.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clients.cli import EXIT_FAILED, EXIT_OK, fail, table, to_json
from clients.model_store import ModelStore, StoreError
from fl_ser.data.audio import AudioError, read_audio
from fl_ser.data.corpus import CorpusError
from fl_ser.data.loaders import DeviceFolder, wav_files
from fl_ser.metrics import classification_report

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Prediction:
    file: str
    top: str
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Failure:
    file: str
    reason: str  # one of fl_ser.data.audio.REASONS
    detail: str


def predict_files(
    model: torch.jit.ScriptModule, labels: Sequence[str], files: Sequence[Path], base: Path | None = None
) -> tuple[list[Prediction], list[Failure]]:
    """Run the model on each file; files that cannot be read are returned as failures, not raised.

    Files are named by their path relative to ``base`` when given, else as passed.
    """
    import torch

    predictions, failures = [], []
    for path in files:
        name = path.relative_to(base).as_posix() if base is not None else str(path)
        try:
            wave = read_audio(path)
        except AudioError as err:
            failures.append(Failure(name, err.reason, err.detail))
            continue
        with torch.no_grad():
            probs = model(torch.from_numpy(wave)[None])
        if tuple(probs.shape) != (1, len(labels)):
            raise StoreError(
                f"the model returned shape {tuple(probs.shape)} for one waveform, but its labels "
                f"say (1, {len(labels)}); the stored version is broken, use another one"
            )
        values = [float(p) for p in probs[0]]
        predictions.append(Prediction(name, labels[int(probs.argmax())], dict(zip(labels, values, strict=True))))
    return predictions, failures


@dataclass
class Evaluation:
    """A model scored on a participant's labelled recordings."""

    folder: str
    speaker: str
    report: dict  # fl_ser.metrics.classification_report of the scored recordings
    predictions: list[Prediction]
    failures: list[Failure]

    def to_dict(self) -> dict:
        return {
            "folder": self.folder,
            "speaker": self.speaker,
            **self.report,
            "predictions": [asdict(p) for p in self.predictions],
            "failures": [asdict(f) for f in self.failures],
        }

    def text(self) -> str:
        r = self.report
        rows = list(zip(r["labels"], r["confusion"], strict=True))
        return "\n".join(
            [
                f"{self.folder} (speaker {self.speaker}): {r['num_utterances']} utterances scored",
                f"UAR {r['uar']:.3f}  accuracy {r['accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}  "
                f"(chance UAR {1 / len(rows):.3f})",
                "",
                table(["emotion", "recall", "utterances"], [[e, r["recall"][e], sum(row)] for e, row in rows]),
                "",
                "confusion (rows: true emotion, columns: predicted)",
                table(["", *r["labels"]], [[e, *row] for e, row in rows]),
            ]
        )


def evaluate_folder(model: torch.jit.ScriptModule, labels: Sequence[str], folder: str | Path) -> Evaluation:
    """Score the model on a participant folder's labelled recordings (those of emotions in ``labels``)."""
    corpus = DeviceFolder(folder, emotions=list(labels))
    utterances = corpus.utterances_of(corpus.speaker)
    truth = {u.uid: corpus.label_of(u) for u in utterances}
    predictions, failures = predict_files(model, labels, [Path(u.source) for u in utterances], base=corpus.root)
    y_true = [truth[p.file] for p in predictions]
    y_pred = [list(labels).index(p.top) for p in predictions]
    report = classification_report(y_true, y_pred, list(labels))
    return Evaluation(str(corpus.root), corpus.speaker, report, predictions, failures)


def _prediction_table(predictions: list[Prediction], labels: Sequence[str]) -> str:
    rows = [[p.file, p.top, *p.probabilities.values()] for p in predictions]
    return table(["file", "top", *labels], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, metavar="STORE_DIR", help="the device's model store")
    parser.add_argument("--version", type=int, metavar="N", help="model version (default: the latest)")
    parser.add_argument("target", metavar="FILE_OR_FOLDER", help="a WAV file, or a folder of them")
    parser.add_argument("--evaluate", action="store_true", help="score the model on a participant folder's labels")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    target = Path(args.target).expanduser()
    if not target.exists():
        parser.error(f"{target} does not exist")
    if args.evaluate and not target.is_dir():
        parser.error(f"--evaluate needs a participant folder (WAV files plus labels.csv), not the file {target}")
    files = wav_files(target, recursive=True) if target.is_dir() else [target]
    if not files:
        parser.error(f"{target} holds no .wav files; give a WAV file or a folder of them")
    try:
        model, labels, meta = ModelStore(args.store).load(args.version)
        if args.evaluate:
            evaluation = evaluate_folder(model, labels, target)
            failures = evaluation.failures
            output = to_json({"model": meta, **evaluation.to_dict()}) if args.json else evaluation.text()
        else:
            predictions, failures = predict_files(model, labels, files, target if target.is_dir() else None)
            output = to_json([asdict(p) for p in predictions]) if args.json else _prediction_table(predictions, labels)
    except StoreError as err:
        return fail(err)
    except CorpusError as err:  # only a participant folder's labels.csv raises it
        return fail(err, folder=target)
    heading = f"model v{meta['version']:04d} (round {meta['round']}) from {args.store}"
    if args.evaluate and "personalised_from" in meta:
        heading += (
            f"\nnote: this model was personalised on {meta['adaptation_size']} recordings, perhaps of this folder, "
            "which inflates its scores here; its held-out scores are in its meta.json"
        )
    print(output if args.json else f"{heading}\n{output}")
    for failure in failures:
        print(f"error: {failure.file}: {failure.reason} ({failure.detail}); skipped", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
