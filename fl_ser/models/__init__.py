"""Emotion classifiers small enough for a phone and valid for Opacus (no BatchNorm)."""

from fl_ser.models.classifiers import CNN, MLP, PolyActivation, PolyMLP, build_classifier, count_parameters
from fl_ser.models.pipeline import EmotionPipeline

__all__ = ["CNN", "MLP", "EmotionPipeline", "PolyActivation", "PolyMLP", "build_classifier", "count_parameters"]
