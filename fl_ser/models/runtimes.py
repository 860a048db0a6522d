"""The runtimes that run a released emotion model, one per file format, each opened from the file's bytes.

A release (:mod:`fl_ser.models.export`) holds the same model three times: ONNX (``emotion_model.onnx``,
run by onnxruntime, no torch needed), a ``torch.export`` program (``emotion_model.pt2``, torch) and
TorchScript (``emotion_model.pt``, torch; the only format of releases made before these). An ExecuTorch
program for phones (``emotion_model.pte``, :mod:`fl_ser.models.mobile`) runs under ExecuTorch's Python
runtime (``pip install fl-ser[mobile]``; it needs torch), which checks it and runs it on a computer. Each
:func:`open_model` result maps a float32 waveform batch (B, samples) at 16 kHz to probabilities (B, C)
as a numpy array. This module imports neither torch nor onnxruntime until a model of theirs is opened,
so a device without torch can import it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from fl_ser.protocol import MODEL_FILES

if TYPE_CHECKING:
    import numpy as np

#: A runtime's model: float32 waveforms (B, samples) at 16 kHz -> probabilities (B, C).
Run = Callable[["np.ndarray"], "np.ndarray"]

#: Runtimes in order of preference (the first present wins), each with the format it runs and the package it needs.
RUNTIMES = {"onnxruntime": ("onnx", "onnxruntime"), "torch": ("pt2", "torch"), "torchscript": ("torchscript", "torch"),
            "executorch": ("pte", "executorch")}
#: The fl-ser extra that installs a runtime's package, where one does.
EXTRAS = {"onnxruntime": "fl-ser[device]", "executorch": "fl-ser[mobile]"}


class RuntimeMissing(RuntimeError):
    """The runtime asked for is not installed, or the model has no file in its format."""


class InputTooLong(ValueError):
    """A waveform longer than a model with a bounded time axis accepts (an ExecuTorch ``.pte``)."""


def probe_signal(seconds: float, seed: int = 0) -> np.ndarray:
    """A deterministic voice-like test signal at 16 kHz: a harmonic tone gliding 120 -> 220 Hz with vibrato,
    a syllable-rate envelope with pauses, and a little noise (float32, peak ~0.3). Needs numpy only: exports
    are checked on it (:mod:`fl_ser.models.export`) and devices run it to check a stored model (clients.validate)."""
    import numpy as np

    from fl_ser.data.corpus import SAMPLE_RATE

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 120.0 + 100.0 * t / seconds + 3.0 * np.sin(2 * np.pi * 5.0 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 16))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t), 0.0, None) ** 0.5
    wave = 0.15 * envelope * voice + 0.003 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


def installed(runtime: str) -> bool:
    """Whether ``runtime``'s package can be imported here (without importing it)."""
    return importlib.util.find_spec(RUNTIMES[runtime][1]) is not None


def onnx_session(data: bytes, profile_prefix: str | None = None):
    """An onnxruntime session of the ONNX model ``data`` as a device runs it: one thread, CPU. ``profile_prefix``
    turns on onnxruntime's profiler, writing its trace there (``session.end_profiling()``; the benchmarks')."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one utterance is too small to share; threads contend on a busy device
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its notes on graph folding say nothing a device user can act on
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _onnx(data: bytes) -> Run:
    import numpy as np

    session = onnx_session(data)
    (name,) = (i.name for i in session.get_inputs())
    return lambda wave: session.run(None, {name: np.ascontiguousarray(wave, dtype=np.float32)})[0]


def _torch_run(module) -> Run:
    import numpy as np
    import torch

    def run(wave: np.ndarray) -> np.ndarray:
        with torch.inference_mode():  # no autograd records at all: 10-20 % less per op than no_grad here
            return module(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))).numpy()

    return run


def _pt2(data: bytes) -> Run:
    import torch

    return _torch_run(torch.export.load(io.BytesIO(data)).module())


def load_torchscript(data: bytes):
    """The TorchScript module in ``data`` (eval mode, CPU); torch.jit's deprecation warning is not shown."""
    import torch

    with warnings.catch_warnings():  # torch.jit's deprecation notice says nothing a device user can act on
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=FutureWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def _torchscript(data: bytes) -> Run:
    return _torch_run(load_torchscript(data))


@contextlib.contextmanager
def quiet_pytree():
    """Within the block, torch's pytree logs errors only: torchao, which ExecuTorch imports, registers an Enum the
    way torch 2.14 deprecates, and torch warns about it on every import (nothing a user can act on)."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _native_log(call: Callable[[], object]):
    """``call()`` with what native code writes to stderr (fd 2) held back: ExecuTorch logs its CPU probing on every
    load, and on failure it says only there (not in the exception) which op, kernel or input failed, so its last
    lines go into the error."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as log:
            os.dup2(log.fileno(), 2)
            try:
                return call()
            except RuntimeError as err:
                os.dup2(saved, 2)
                log.seek(0)
                said = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
                raise RuntimeError(f"{err}; ExecuTorch logged: {' | '.join(said[-6:]) or 'nothing'}") from err
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _pte(data: bytes) -> Run:
    import numpy as np
    import torch

    from fl_ser.data.corpus import SAMPLE_RATE

    with quiet_pytree():
        from executorch.runtime import Runtime
    program = _native_log(lambda: Runtime.get().load_program(data))
    method = _native_log(lambda: program.load_method("forward"))
    rows, samples = method.metadata.input_tensor_meta(0).sizes()  # the upper bounds its memory is planned for

    def run(wave: np.ndarray) -> np.ndarray:
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        if wave.shape[-1] > samples:
            raise InputTooLong(
                f"{wave.shape[-1] / SAMPLE_RATE:.1f} s of audio, but this ExecuTorch model takes at most "
                f"{samples / SAMPLE_RATE:.1f} s ({samples} samples; its memory is planned for that). Fix: cut the "
                "recording into utterances, or export the model again with a larger --max-seconds "
                "(python -m clients.export_mobile)"
            )
        parts = (torch.from_numpy(wave[i : i + rows]) for i in range(0, len(wave), rows))  # `rows` at a time: 1
        return np.concatenate([_native_log(lambda p=p: method.execute([p]))[0].numpy() for p in parts])

    run.program = program  # keep the program alive as long as its method
    return run


_OPEN = {"onnxruntime": _onnx, "torch": _pt2, "torchscript": _torchscript, "executorch": _pte}


def require(runtime: str) -> None:
    """Raise :class:`RuntimeMissing`, naming the package to install, unless ``runtime`` is installed."""
    if not installed(runtime):
        package = RUNTIMES[runtime][1]
        extra = f" (or {EXTRAS[runtime]})" if runtime in EXTRAS else ""
        raise RuntimeMissing(
            f"runtime {runtime} needs the Python package {package}, which is not installed. Fix: pip install "
            f"{package}{extra}, or choose another runtime"
        )


def open_model(runtime: str, data: bytes) -> Run:
    """The model in ``data`` (the bytes of its :data:`~fl_ser.protocol.MODEL_FILES` file) under ``runtime``.

    Raises :class:`RuntimeMissing` when the runtime's package is not installed.
    """
    require(runtime)
    return _OPEN[runtime](data)


def file_of(runtime: str) -> str:
    """The release file ``runtime`` runs."""
    return MODEL_FILES[RUNTIMES[runtime][0]]
