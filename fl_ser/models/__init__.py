"""Emotion classifiers small enough for a phone and valid for Opacus (no BatchNorm)."""

from fl_ser.models.classifiers import CNN, MLP, build_classifier, count_parameters
from fl_ser.models.pipeline import EmotionPipeline

__all__ = ["CNN", "MLP", "EmotionPipeline", "build_classifier", "count_parameters"]
