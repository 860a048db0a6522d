"""The emotion model for phones: an ExecuTorch program (``emotion_model.pte``, XNNPACK), checked like every release
format before it is written. Optional: ``pip install fl-ser[mobile]`` (ExecuTorch 1.5.1, imported only here, lazily).

What is lowered is :func:`fl_ser.models.export.program` with ``fft=False``: the spectra as DFT matmuls (ExecuTorch has
no complex dtype and no FFT kernel), the same trace ONNX is made from, with two differences ExecuTorch needs:

* the time axis has an upper bound, ``max_seconds`` (:data:`MAX_SECONDS`, 30 s, by default; at least
  :data:`MIN_SECONDS`). ExecuTorch plans all of a method's memory ahead, for the largest input, so the bound sets the
  memory the model takes on the phone (the functionals' pipeline: ~41 MB at 30 s, linear in the bound). Longer input
  is refused: ExecuTorch's runtime cannot resize the input tensor past it and fails the call (``set_inputs``
  error 0x10); :mod:`fl_ser.models.runtimes` refuses it first with :class:`~fl_ser.models.runtimes.InputTooLong`.
  A recording cut into utterances, or a model exported with a larger bound, is the fix.
* the batch axis is fixed at one waveform. With a dynamic batch as well, XNNPACK's partitioner (ExecuTorch 1.5.1)
  takes ``unsqueeze`` nodes with two dynamic dimensions, which its serialiser then refuses ("XNNPACK reshape only
  supports 1 dynamic dimension"); a phone classifies one recording at a time anyway. The Python runtime runs a
  batch row by row.

Two steps work around ExecuTorch 1.5.1 with torch 2.14.1 (DEVELOPERS.md "ExecuTorch"), neither changes a value:

* ``EdgeCompileConfig(_check_ir_validity=False)``: its edge-dialect verifier refuses the Python functions
  ``torch.sym_not`` (in the runtime asserts of the length guards) and ``torch.sym_float`` (a frame count turned into
  seconds) that torch.export writes; ExecuTorch's own ``to_executorch`` maps both to its ``executorch_prim`` kernels a
  step later (and drops the asserts). The check of the loaded program against the eager model vouches for the result.
* constant tensors that are not contiguous (a transposed buffer) are made contiguous first: ExecuTorch's
  ``convert_constant_dim_order_pass`` looks such a non-persistent buffer up among the constant tensors and fails
  ("Missing input spec for lifted tensor").

What XNNPACK does not take runs on ExecuTorch's portable kernels. An op the runtime has no kernel for (``aten.sort``
in 1.5.1, which is why the functionals' percentiles use ``topk``) would load and then fail on the phone;
:func:`lower` refuses it with :class:`UnsupportedExport`, naming the op and its source line. Then the program is
loaded back with ExecuTorch's runtime and compared with the eager model on :func:`fl_ser.models.export.probes`
(:func:`~fl_ser.models.export.check`, the same :data:`ATOL`); only a file that passes is moved into place.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fl_ser.data.corpus import SAMPLE_RATE
from fl_ser.models.export import (
    PROBE_SECONDS,
    UnsupportedExport,
    check,
    failure_reason,
    frozen,
    probes,
    program,
)
from fl_ser.models.pipeline import EmotionPipeline
from fl_ser.models.runtimes import RuntimeMissing, installed, quiet_pytree
from fl_ser.protocol import MODEL_FILES

#: The ExecuTorch release this export is made and tested with (pyproject.toml's ``mobile`` extra).
EXECUTORCH_VERSION = "1.5.1"
#: Default upper bound of the input's length (s): memory is planned for it.
MAX_SECONDS = 30.0
#: The smallest bound allowed: the test signals the export is checked on (up to 4.1 s) and the trace's example (3.5 s)
#: must fit.
MIN_SECONDS = 5.0
FILE = MODEL_FILES["pte"]

Progress = Callable[[str], None]


@dataclass
class Mobile:
    """What :func:`export_pte` wrote."""

    path: Path
    size: int  # bytes
    max_seconds: float  # the longest input it takes
    max_difference: float  # from the eager model, over the test inputs
    checked_on: int  # test inputs (batches) compared
    planned: int  # bytes of working memory ExecuTorch allocates for it
    kernels: list[str] = field(default_factory=list)  # ExecuTorch kernels it calls outside XNNPACK


def require_executorch() -> str:
    """ExecuTorch's version; :class:`~fl_ser.models.runtimes.RuntimeMissing` naming the extra when it is absent."""
    if not installed("executorch"):
        raise RuntimeMissing(
            f"the phone export needs ExecuTorch {EXECUTORCH_VERSION}, which is not installed here. Fix: pip install "
            "'fl-ser[mobile]' (from a clone: pip install -e '.[mobile]'); it adds ~400 MB (executorch, coremltools, "
            "torchao, pandas, scikit-learn) and leaves torch as it is"
        )
    return importlib.metadata.version("executorch")


def _contiguous_constants(exported: torch.export.ExportedProgram) -> None:
    """Make every non-contiguous constant tensor of ``exported`` (and its placeholder's example) contiguous, in place.

    The values are unchanged; ExecuTorch 1.5.1's ``convert_constant_dim_order_pass`` fails on a non-persistent buffer
    that is not contiguous (it looks the buffer up as a constant tensor)."""
    placeholders = {node.name: node for node in exported.graph.nodes if node.op == "placeholder"}
    for spec in exported.graph_signature.input_specs:
        value = exported.constants.get(spec.target) if spec.target is not None else None
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            exported.constants[spec.target] = value.contiguous()
            node = placeholders[spec.arg.name]
            node.meta["val"] = node.meta["val"].contiguous()


def _source_of(exported: torch.export.ExportedProgram, op: str) -> str:
    """Where the model's code calls ``op`` ("aten::sort.values"): the innermost line torch.export recorded for it,
    as "file:line (code)" (its stacks end at the call, in the traced module's code, that reaches the op)."""
    for node in exported.graph.nodes:
        name = getattr(node.target, "name", None)
        if node.op != "call_function" or not callable(name) or name() != op:
            continue
        frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', node.meta.get("stack_trace") or "")
        if frames:
            path, line, code = frames[-1]
            path = path[path.rindex("/fl_ser/") + 1 :] if "/fl_ser/" in path else path
            return f"{path}:{line} ({code.strip()[:80]})"
    return "no source line recorded"


class Lowered(NamedTuple):
    program: bytes  # the .pte file's bytes
    kernels: list[str]  # the ExecuTorch kernels it calls outside XNNPACK (a selective runtime build must have them)
    planned: int  # bytes of working memory the runtime allocates for it (planned for the longest input)


def lower(pipe: EmotionPipeline, max_seconds: float = MAX_SECONDS, progress: Progress = lambda _: None) -> Lowered:
    """The ExecuTorch program of ``pipe`` (in eval mode: :func:`~fl_ser.models.export.frozen`): one waveform of 0.1 s
    to ``max_seconds``, XNNPACK where it takes the ops. Raises :class:`UnsupportedExport` naming the step and the op
    that failed, :class:`~fl_ser.models.runtimes.RuntimeMissing` without ExecuTorch."""
    version = require_executorch()
    if version != EXECUTORCH_VERSION:
        progress(f"note: ExecuTorch {version} is installed; this export is made and tested with {EXECUTORCH_VERSION}")
    if not max_seconds >= MIN_SECONDS:
        raise ValueError(f"max_seconds must be at least {MIN_SECONDS} (the export is checked on test signals of up to "
                         f"{max(PROBE_SECONDS)} s), got {max_seconds}")
    name = type(pipe.extractor).__name__
    progress(f"tracing {name} + {type(pipe.classifier).__name__} with torch.export (one waveform, 0.1 to "
             f"{max_seconds:g} s)")
    exported = program(pipe, fft=False, max_samples=round(max_seconds * SAMPLE_RATE), batch=1)
    _contiguous_constants(exported)
    progress("lowering to ExecuTorch with XNNPACK (the slow step: about a minute for the functionals)")
    with quiet_pytree():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
        from executorch.runtime import Runtime

    try:
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        lowered = edge.to_executorch()
    except Exception as err:  # ExecuTorch raises many types (AssertionError, RuntimeError, SpecViolationError, ...)
        raise UnsupportedExport(
            f"ExecuTorch {version} cannot lower {name}: {failure_reason(err)}. Fix: "
            "express the op named there with ops ExecuTorch or XNNPACK take (DEVELOPERS.md 'ExecuTorch')"
        ) from err
    have = Runtime.get().operator_registry.operator_names
    plan = lowered.executorch_program.execution_plan[0]
    needed = sorted({f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators})
    missing = [op for op in needed if op not in have]
    if missing:  # it would load, then fail on the phone
        where = "; ".join(f"{op} at {_source_of(lowered.exported_program(), op)}" for op in missing)
        raise UnsupportedExport(
            f"ExecuTorch {version}'s runtime has no kernel for {where} (XNNPACK does "
            f"not take it either), so {name}'s program cannot run. Fix: express it with ops that have one (for "
            "torch.sort: torch.topk(x, x.shape[-1], largest=False)); DEVELOPERS.md 'ExecuTorch'"
        )
    kernels = [op for op in needed if not op.startswith(("executorch_prim::", "aten::sym_"))]
    return Lowered(lowered.buffer, kernels, sum(plan.non_const_buffer_sizes))


def export_pte(pipe: EmotionPipeline, path: str | Path, waves: Sequence[np.ndarray] = (),
               max_seconds: float = MAX_SECONDS, progress: Progress = lambda _: None) -> Mobile:
    """Lower ``pipe`` (:func:`lower`), load the program back with ExecuTorch's runtime, compare it with the eager
    model on the test signals and ``waves`` (float, 16 kHz; :func:`~fl_ser.models.export.check`), and only then
    write it to ``path`` (which must not exist). Raises :class:`~fl_ser.models.export.ParityError` naming the
    difference, and writes nothing, when it differs by more than ``ATOL``."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; give a new file name (a model is never overwritten)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} does not exist; create it or give another --out")
    model = frozen(pipe)
    data, kernels, planned = lower(model, max_seconds, progress)
    batches = probes(waves)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{path.name}-", dir=path.parent) as staging:
        staged = Path(staging) / FILE
        staged.write_bytes(data)
        progress(f"checking it under ExecuTorch's runtime against the eager model on {len(batches)} test inputs")
        worst = check("pte", staged, model, batches)
        os.replace(staged, path)  # same folder: whole or not at all
    return Mobile(path, len(data), max_seconds, worst, len(batches), planned, kernels)


def timed_progress(stream=None) -> Progress:
    """A :data:`Progress` that prints each step with the seconds since the first one."""
    start = time.perf_counter()
    return lambda message: print(f"[{time.perf_counter() - start:5.1f} s] {message}", file=stream, flush=True)
