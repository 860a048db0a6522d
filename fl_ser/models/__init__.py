"""Emotion classifiers small enough for a phone and valid for Opacus (no BatchNorm), and the released model.

The names below are imported on first use, so :mod:`fl_ser.models.runtimes` (what a device runs a
release with) imports without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"CNN": "classifiers", "MLP": "classifiers", "PolyActivation": "classifiers", "PolyMLP": "classifiers",
            "build_classifier": "classifiers", "count_parameters": "classifiers", "EmotionPipeline": "pipeline"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
