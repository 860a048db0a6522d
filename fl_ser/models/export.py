"""Export of the eager :class:`~fl_ser.models.pipeline.EmotionPipeline` into every release format, each checked.

From the one eager pipeline (float waveform (B, samples) at 16 kHz -> probabilities (B, C)) it writes

* ``emotion_model.onnx``: ``torch.onnx.export(..., dynamo=True)``, opset 18, one file (no ``.onnx.data``),
  batch and time axes dynamic; onnxruntime runs it without torch;
* ``emotion_model.pt2``: ``torch.export`` with dynamic batch and time, saved by ``torch.export.save``;
* ``emotion_model.pt``: TorchScript, for devices and tools that read releases made before the other two.

The ``.pt2`` is traced as the eager model runs (torch's graph: spectra by ``torch.fft``). ONNX is translated
from a second ``torch.export`` trace of the portable graph (:func:`~fl_ser.features.stft.portable`: spectra by
DFT matmuls, since ONNX Runtime's DFT op is ~20x slower, and no CumSum, Gather or ReduceL2 on frames), without
the onnxscript graph optimiser (``optimize=False``): it deletes ``x + 1e-10`` as if the constant were zero, and
its folding moved the functionals' spectral slopes by 0.5 % (onnxruntime optimises the graph itself). What a
device never reads is left out: the exporters' per-node notes (source lines and the build machine's paths,
three quarters of the ONNX file) and the ``.pt2``'s example inputs. Guards the symbolic
shapes cannot prove at trace time (e.g. that a slice of the pitch track fits) become runtime asserts instead of
fixing the input length. A model whose code branches on the input length in Python (or calls an op that fixes
it) cannot be traced with a dynamic time axis: :class:`UnsupportedExport` names the format, the guard and the
fix, and :func:`export_formats` leaves that format out (logged) rather than write a model that accepts one
length only.

Before anything is written where it was asked, every format is loaded back from its bytes with the
runtime a device uses (:mod:`fl_ser.models.runtimes`) and compared with the eager model on
deterministic voice-like test signals of two lengths (2.5 s, shorter than the fixed 3 s window of the
spectrogram features, and 4.1 s, longer), a batch of two, and any real waveforms given; a difference
above :data:`ATOL` in any probability raises :class:`ParityError` naming the format and the difference.
Files are written into a fresh folder and moved into place only when all pass (:func:`staged`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fl_ser.data.corpus import SAMPLE_RATE
from fl_ser.features.stft import portable
from fl_ser.models.pipeline import EmotionPipeline
from fl_ser.models.runtimes import open_model, probe_signal  # probe_signal: torch-free, for devices
from fl_ser.protocol import MODEL_FILES

log = logging.getLogger("fl_ser.export")
# The ONNX exporter warns, once per export and through torch's own console handler, that it skips torchvision's
# ops when torchvision is absent; fl-ser's models use none of them, so that notice is only noise in a run's console.
logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(
    lambda record: "torchvision is not installed" not in record.getMessage())

#: Largest difference in any probability allowed between a format and the eager model.
ATOL = 1e-4
ONNX_OPSET = 18
#: The exported models accept waveforms of at least this many samples (0.1 s; read_audio's default minimum is 0.3 s).
MIN_SAMPLES = SAMPLE_RATE // 10
#: Lengths (s) of the deterministic test signals: shorter and longer than the 3 s window of logmel/mfcc.
PROBE_SECONDS = (2.5, 4.1)
#: Every release format, in the order they are written.
FORMATS = ("onnx", "pt2", "torchscript")
#: The runtime that checks each format (the one a device runs it with).
RUNTIME_OF = {"onnx": "onnxruntime", "pt2": "torch", "torchscript": "torchscript", "pte": "executorch"}


class ExportError(RuntimeError):
    """A release format could not be made, or does not compute what the eager model computes."""


class UnsupportedExport(ExportError):
    """The model cannot be exported to a format with a dynamic time axis (the reason names the guard and the fix)."""


class ParityError(ExportError):
    """A format, loaded back, gives probabilities that differ from the eager model's by more than :data:`ATOL`."""


@dataclass
class Exported:
    """What :func:`export_formats` wrote: each format's file and its largest difference from the eager model."""

    files: dict[str, Path] = field(default_factory=dict)
    max_difference: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # format -> why it could not be exported


def probes(waves: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """The batches each format is checked on: each test signal alone, two of the first as a batch, each real wave."""
    signals = [probe_signal(s, seed) for seed, s in enumerate(PROBE_SECONDS)]
    batch = np.stack([signals[0], 0.5 * probe_signal(PROBE_SECONDS[0], seed=7)])
    return [s[None] for s in signals] + [batch] + [np.asarray(w, dtype=np.float32)[None] for w in waves]


def frozen(pipe: EmotionPipeline) -> EmotionPipeline:
    """An inference copy of the pipeline: eval mode, CPU, no gradients; ``pipe`` itself is untouched."""
    import copy

    return copy.deepcopy(pipe).cpu().eval().requires_grad_(False)


def failure_reason(err: BaseException) -> str:
    """The first line of ``err`` and of each exception it was raised from (the innermost names the op)."""
    lines = []
    while err is not None and len(lines) < 6:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
        lines.append(f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300])
        err = err.__cause__ or err.__context__
    return " <- ".join(lines)


def write_torchscript(pipe: EmotionPipeline, path: Path) -> None:
    """Script ``pipe`` (a :func:`frozen` copy) and save it as TorchScript."""
    with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit; the file is kept for existing users
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=FutureWarning)
        torch.jit.script(pipe).save(str(path))


def program(pipe: EmotionPipeline, fft: bool = True, max_samples: int | None = None,
            batch: int | None = None) -> torch.export.ExportedProgram:
    """The ``torch.export`` program of the pipeline, batch and time dynamic; raises :class:`UnsupportedExport`.

    ``fft=False`` traces the portable graph (:func:`~fl_ser.features.stft.portable`: DFT matmuls instead of FFTs,
    among others), for runtimes without a fast FFT: ONNX Runtime, ExecuTorch. ``max_samples`` bounds the time axis
    and ``batch`` fixes the batch axis (ExecuTorch plans its memory for the largest input:
    :mod:`fl_ser.models.mobile`).
    """
    rows = 2 if batch is None else batch  # a dynamic batch axis needs an example of 2: one of 1 specialises it
    example = torch.from_numpy(np.stack([probe_signal(3.5, seed=i) for i in range(rows)]))
    time = torch.export.Dim("time", min=MIN_SAMPLES, max=max_samples)
    dims = {0: torch.export.Dim("batch"), 1: time} if batch is None else {1: time}
    try:
        with portable(pipe, enabled=not fft):
            return torch.export.export(pipe, (example,), dynamic_shapes=(dims,), strict=False,
                                       prefer_deferred_runtime_asserts_over_guards=True)
    except Exception as err:  # torch.export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        lines = [line.strip() for line in str(err).splitlines() if line.strip().startswith("- ")]
        raise UnsupportedExport(
            f"torch.export cannot trace {type(pipe.extractor).__name__} with a dynamic time axis: "
            f"{failure_reason(err)} {' '.join(lines[:2])[:400]}. Fix: in the extractor, replace Python branches on the "
            "input length and ops that fix it with tensor operations (DEVELOPERS.md 'Release formats')"
        ) from err


def _pt2(exported: torch.export.ExportedProgram, path: Path) -> None:
    """Save the program without what a device never reads: the trace's example inputs (0.45 MB) and each node's
    source notes (stack traces, module paths: 0.3 MB and the build machine's file paths)."""
    for node in exported.graph.nodes:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "from_node"):
            node.meta.pop(key, None)
    exported.example_inputs = None
    torch.export.save(exported, str(path))


def _onnx(exported: torch.export.ExportedProgram, path: Path) -> None:
    try:
        onnx_program = torch.onnx.export(exported, (), dynamo=True, external_data=False, opset_version=ONNX_OPSET,
                                         input_names=["wave"], output_names=["probabilities"], verbose=False,
                                         optimize=False)  # see the module docstring
    except Exception as err:  # the translator raises its own error types, per unsupported op
        raise UnsupportedExport(
            f"torch.onnx cannot translate the model: {failure_reason(err)}. Fix: express the op named there with ops "
            "onnxscript translates (DEVELOPERS.md 'Release formats')"
        ) from err
    model = onnx_program.model_proto
    for node in model.graph.node:  # the exporter's per-node notes: the build machine's paths and source lines, 3/4
        del node.metadata_props[:]  # of the file; a device needs none of them
    path.write_bytes(model.SerializeToString())


def check(fmt: str, path: Path, pipe: EmotionPipeline, batches: Sequence[np.ndarray]) -> float:
    """The largest difference between ``fmt`` (loaded back from ``path``) and the eager model over ``batches``."""
    run = open_model(RUNTIME_OF[fmt], path.read_bytes())
    worst = 0.0
    for wave in batches:
        with torch.no_grad():
            want = pipe(torch.from_numpy(wave)).numpy()
        got = np.asarray(run(wave))
        if got.shape != want.shape:
            raise ParityError(f"{fmt} ({path.name}) gave shape {got.shape} for input {wave.shape}, the eager model "
                              f"{want.shape}: the export fixed an axis. Fix: export with dynamic batch and time axes")
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst <= ATOL:  # also catches NaN
        raise ParityError(
            f"{fmt} ({path.name}) differs from the eager model by {worst:.3g} in a probability (allowed {ATOL}) on "
            f"{len(batches)} test batches. Fix: find the op that differs (export the extractor alone and compare)"
        )
    return worst


def export_formats(pipe: EmotionPipeline, folder: str | Path, waves: Sequence[np.ndarray] = (),
                   formats: Sequence[str] = FORMATS) -> Exported:
    """Write ``formats`` of ``pipe`` (every one by default) into ``folder`` and check each (see the module
    docstring).

    ``waves`` are real waveforms (float, 16 kHz) checked besides the test signals. A format the model
    cannot be exported to is left out and logged (:attr:`Exported.unavailable`); TorchScript never is, and
    is always written (model stores and personalisation read it). Use :func:`staged` so that a failure
    leaves nothing behind.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown release format(s) {sorted(unknown)}; release.formats takes any of {list(FORMATS)}")
    folder = Path(folder)
    model = frozen(pipe)
    batches = probes(waves)
    done = Exported()
    writers = {"torchscript": lambda path: write_torchscript(model, path)}
    for fmt, fft, write in (("pt2", True, _pt2), ("onnx", False, _onnx)):
        if fmt in formats:
            try:
                writers[fmt] = functools.partial(write, program(model, fft))
            except UnsupportedExport as err:
                done.unavailable[fmt] = str(err)
    for fmt in FORMATS:
        if fmt not in writers or (fmt not in formats and fmt != "torchscript"):
            continue
        path = folder / MODEL_FILES[fmt]
        try:
            writers[fmt](path)
        except UnsupportedExport as err:
            done.unavailable[fmt] = str(err)
            continue
        done.max_difference[fmt] = check(fmt, path, model, batches)
        done.files[fmt] = path
    for fmt, reason in done.unavailable.items():
        log.warning("the release has no %s file: %s", MODEL_FILES[fmt], reason)
    return done


@contextlib.contextmanager
def staged(target: str | Path) -> Iterator[Path]:
    """A fresh folder beside ``target`` that becomes ``target`` when the block succeeds (removed if it fails).

    ``target`` must not exist yet, or be empty.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} already holds files; a release is written into a new folder only")
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
