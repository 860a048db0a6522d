"""The runtimes that run a released emotion model, one per file format, each opened from the file's bytes.

A release (:mod:`fl_ser.models.export`) holds the same model three times: ONNX (``emotion_model.onnx``,
run by onnxruntime, no torch needed), a ``torch.export`` program (``emotion_model.pt2``, torch) and
TorchScript (``emotion_model.pt``, torch; the only format of releases made before these). Each
:func:`open_model` result maps a float32 waveform batch (B, samples) at 16 kHz to probabilities (B, C)
as a numpy array. This module imports neither torch nor onnxruntime until a model of theirs is opened,
so a device without torch can import it.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from fl_ser.protocol import MODEL_FILES

if TYPE_CHECKING:
    import numpy as np

#: A runtime's model: float32 waveforms (B, samples) at 16 kHz -> probabilities (B, C).
Run = Callable[["np.ndarray"], "np.ndarray"]

#: Runtimes in order of preference (the first present wins), each with the format it runs and the package it needs.
RUNTIMES = {"onnxruntime": ("onnx", "onnxruntime"), "torch": ("pt2", "torch"), "torchscript": ("torchscript", "torch")}


class RuntimeMissing(RuntimeError):
    """The runtime asked for is not installed, or the model has no file in its format."""


def installed(runtime: str) -> bool:
    """Whether ``runtime``'s package can be imported here (without importing it)."""
    return importlib.util.find_spec(RUNTIMES[runtime][1]) is not None


def _onnx(data: bytes) -> Run:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one utterance is too small to share; threads contend on a busy device
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its notes on graph folding say nothing a device user can act on
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    (name,) = (i.name for i in session.get_inputs())
    return lambda wave: session.run(None, {name: np.ascontiguousarray(wave, dtype=np.float32)})[0]


def _torch_run(module) -> Run:
    import numpy as np
    import torch

    def run(wave: np.ndarray) -> np.ndarray:
        with torch.no_grad():
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


_OPEN = {"onnxruntime": _onnx, "torch": _pt2, "torchscript": _torchscript}


def require(runtime: str) -> None:
    """Raise :class:`RuntimeMissing`, naming the package to install, unless ``runtime`` is installed."""
    if not installed(runtime):
        package = RUNTIMES[runtime][1]
        raise RuntimeMissing(
            f"runtime {runtime} needs the Python package {package}, which is not installed. Fix: pip install "
            f"{package}{' (or fl-ser[device])' if package == 'onnxruntime' else ''}, or choose another runtime"
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
