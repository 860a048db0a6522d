"""Emotions of recordings from a stored model, on the device: per file, or scored against a participant's labels.

    python -m clients.predict --store STORE_DIR [--version N] [--runtime R] FILE_OR_FOLDER [--json]
    python -m clients.predict --store STORE_DIR [--version N] [--runtime R] --evaluate DATA_DIR [--json]
    python -m clients.predict --store STORE_DIR --fhe URL FILE_OR_FOLDER [--evaluate] [--json]

For each WAV file (a folder is searched recursively) it prints the top emotion and the
probability of each class; ``--json`` prints a list of ``{file, top, probabilities: {label: p}}``.
With ``--evaluate``, DATA_DIR is a participant folder (WAV files plus ``labels.csv``, see
``clients.validate``) and the model is scored against its labels: UAR, accuracy, macro-F1,
recall per class and the confusion matrix; recordings of emotions the model does not know are
left out. The model is the store's latest version unless ``--version`` names one.

The model runs under the best runtime present (:mod:`fl_ser.models.runtimes`): onnxruntime
(``emotion_model.onnx``, no torch needed), else torch (``emotion_model.pt2``), else TorchScript
(``emotion_model.pt``, the only file of versions stored before the other formats existed), else
ExecuTorch (``emotion_model.pte``, in versions ``clients.export_mobile --add`` stored).
``--runtime onnxruntime|torch|torchscript|executorch`` chooses one; a runtime that is not installed, or a
version without its file, is an error that says what to install or choose instead. A recording longer
than an ExecuTorch program takes (``--max-seconds`` of its export) is reported and skipped.

With ``--fhe URL`` the classifier runs on an inference server (``python -m server.inference_service``)
that sees only ciphertexts: the device computes the features and normalisation itself, encrypts
them under its own CKKS key (kept in ``STORE_DIR/fhe/``, mode 0600) and decrypts the scores
(:mod:`clients.fhe_client`); the output is the same. The server must serve the release the store's
version came from.

Audio is read with :func:`~fl_ser.data.audio.read_audio` (mono, resampled to 16 kHz). A file
it rejects is reported with the reason and skipped, and the exit status is then 1 (2 for a
usage error). Nothing leaves the device (with ``--fhe``, only ciphertexts and public keys).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clients.cli import EXIT_FAILED, EXIT_OK, fail, table, to_json
from clients.fhe_client import FHEClient, FHEError
from clients.model_store import ModelStore, StoredModel, StoreError
from fl_ser.data.audio import AudioError, read_audio
from fl_ser.data.corpus import CorpusError
from fl_ser.data.loaders import DeviceFolder, wav_files
from fl_ser.metrics import classification_report
from fl_ser.models.runtimes import (
    RUNTIMES,
    InputTooLong,
    Run,
    RuntimeMissing,
    file_of,
    installed,
    open_model,
    require,
)

#: The device's CKKS keys for encrypted inference, inside its model store.
FHE_KEY_DIR = "fhe"

if TYPE_CHECKING:
    import numpy as np

#: A waveform (16 kHz, mono, float) -> the probability of each class.
Classify = Callable[["np.ndarray"], Sequence[float]]


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


def _checked(run: Run, labels: Sequence[str]) -> Classify:
    """``run`` on one waveform, checked to give one probability per label."""

    def classify(wave: np.ndarray) -> list[float]:
        probs = run(wave[None])
        if tuple(probs.shape) != (1, len(labels)):
            raise StoreError(
                f"the model returned shape {tuple(probs.shape)} for one waveform, but its labels "
                f"say (1, {len(labels)}); the stored version is broken, use another one"
            )
        return [float(p) for p in probs[0]]

    return classify


def onnx_classifier(data: bytes, labels: Sequence[str]) -> Classify:
    """The stored ONNX model (``emotion_model.onnx``) under onnxruntime as a :data:`Classify`."""
    return _checked(open_model("onnxruntime", data), labels)


def program_classifier(data: bytes, labels: Sequence[str]) -> Classify:
    """The stored ``torch.export`` program (``emotion_model.pt2``) under torch as a :data:`Classify`."""
    return _checked(open_model("torch", data), labels)


def torchscript_classifier(data: bytes, labels: Sequence[str]) -> Classify:
    """The stored TorchScript model (``emotion_model.pt``) as a :data:`Classify`."""
    return _checked(open_model("torchscript", data), labels)


def executorch_classifier(data: bytes, labels: Sequence[str]) -> Classify:
    """The stored ExecuTorch program (``emotion_model.pte``, clients.export_mobile) as a :data:`Classify`."""
    return _checked(open_model("executorch", data), labels)


#: One function per runtime (:data:`~fl_ser.models.runtimes.RUNTIMES`, in order of preference).
CLASSIFIERS = {"onnxruntime": onnx_classifier, "torch": program_classifier, "torchscript": torchscript_classifier,
               "executorch": executorch_classifier}


def choose_runtime(stored: StoredModel, runtime: str | None = None) -> str:
    """``runtime`` if it can run this version here, else (None) the first of :data:`CLASSIFIERS` that can.

    Raises :class:`StoreError` when the version lacks the chosen runtime's file and
    :class:`~fl_ser.models.runtimes.RuntimeMissing` when its package is not installed.
    """
    held = sorted(stored.digests)
    if runtime is not None:
        if file_of(runtime) not in held:
            usable = [r for r in CLASSIFIERS if file_of(r) in held]
            make = (f"make one: python -m clients.export_mobile --store {stored.path.parent} --version "
                    f"{stored.version} --add" if runtime == "executorch" else
                    "a version released since fl-ser exports every format")
            raise StoreError(
                f"model v{stored.version:04d} in {stored.path.parent} has no {file_of(runtime)} for --runtime "
                f"{runtime} (it holds {held}). Fix: use --runtime {' or '.join(usable)}, or {make}"
            )
        require(runtime)
        return runtime
    for candidate in CLASSIFIERS:
        if file_of(candidate) in held and installed(candidate):
            return candidate
    raise RuntimeMissing(
        f"no runtime installed here can run model v{stored.version:04d} in {stored.path.parent} (it holds {held}). "
        "Fix: pip install onnxruntime (fl-ser[device]) for emotion_model.onnx, torch for emotion_model.pt2 "
        "and emotion_model.pt, or executorch (fl-ser[mobile]) for emotion_model.pte"
    )


def stored_classifier(store: ModelStore, stored: StoredModel, runtime: str) -> Classify:
    """The version's model under ``runtime`` (its file checked against the sha256 recorded) as a :data:`Classify`."""
    return CLASSIFIERS[runtime](store.read(stored, file_of(runtime)), stored.labels)


def predict_files(
    classify: Classify, labels: Sequence[str], files: Sequence[Path], base: Path | None = None
) -> tuple[list[Prediction], list[Failure]]:
    """Classify each file; files that cannot be read are returned as failures, not raised.

    Files are named by their path relative to ``base`` when given, else as passed.
    """
    predictions, failures = [], []
    for path in files:
        name = path.relative_to(base).as_posix() if base is not None else str(path)
        try:
            wave = read_audio(path)
        except AudioError as err:
            failures.append(Failure(name, err.reason, err.detail))
            continue
        try:
            values = [float(p) for p in classify(wave)]
        except InputTooLong as err:  # longer than an ExecuTorch program's bound
            failures.append(Failure(name, "too long", str(err)))
            continue
        top = max(range(len(values)), key=values.__getitem__)
        predictions.append(Prediction(name, labels[top], dict(zip(labels, values, strict=True))))
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


def evaluate_folder(classify: Classify, labels: Sequence[str], folder: str | Path) -> Evaluation:
    """Score the model on a participant folder's labelled recordings (those of emotions in ``labels``)."""
    corpus = DeviceFolder(folder, emotions=list(labels))
    utterances = corpus.utterances_of(corpus.speaker)
    truth = {u.uid: corpus.label_of(u) for u in utterances}
    predictions, failures = predict_files(classify, labels, [Path(u.source) for u in utterances], base=corpus.root)
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
    parser.add_argument("--runtime", choices=list(RUNTIMES), help="run the model with this runtime "
                        f"(default: the first installed of {', '.join(RUNTIMES)} whose file the version has)")
    parser.add_argument("--fhe", metavar="URL", help="classify encrypted on this inference server "
                        "(python -m server.inference_service); features and key stay on the device")
    args = parser.parse_args(argv)
    target = Path(args.target).expanduser()
    if not target.exists():
        parser.error(f"{target} does not exist")
    if args.fhe and args.runtime:
        parser.error("--runtime chooses how the device runs the whole model; with --fhe the server runs the "
                     "classifier: give one of them")
    if args.evaluate and not target.is_dir():
        parser.error(f"--evaluate needs a participant folder (WAV files plus labels.csv), not the file {target}")
    files = wav_files(target, recursive=True) if target.is_dir() else [target]
    if not files:
        parser.error(f"{target} holds no .wav files; give a WAV file or a folder of them")
    try:
        store = ModelStore(args.store)
        with contextlib.ExitStack() as stack:
            if args.fhe:
                model, labels, meta = store.load(args.version)
                client = stack.enter_context(FHEClient(args.fhe, store.root / FHE_KEY_DIR))
                client.check_release(labels, meta["sha256"])
                classify = client.classifier(model)
            else:
                stored = store.latest() if args.version is None else store.get(args.version)
                labels, meta = stored.labels, stored.meta
                runtime = choose_runtime(stored, args.runtime)
                classify = stored_classifier(store, stored, runtime)
            if args.evaluate:
                evaluation = evaluate_folder(classify, labels, target)
                failures = evaluation.failures
                output = to_json({"model": meta, **evaluation.to_dict()}) if args.json else evaluation.text()
            else:
                predictions, failures = predict_files(classify, labels, files, target if target.is_dir() else None)
                output = to_json([asdict(p) for p in predictions]) if args.json else _prediction_table(predictions,
                                                                                                        labels)
    except (StoreError, FHEError, RuntimeMissing) as err:
        return fail(err)
    except CorpusError as err:  # only a participant folder's labels.csv raises it
        return fail(err, folder=target)
    heading = f"model v{meta['version']:04d} (round {meta['round']}) from {args.store}"
    heading += f", classified encrypted by {args.fhe}" if args.fhe else f", run by {runtime}"
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
