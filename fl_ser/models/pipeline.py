"""The deployable emotion model: waveform -> features -> device normaliser -> classifier -> probabilities.

One ``nn.Module`` composes the torchaudio feature extractor, the device-local
normaliser and the federated classifier: it maps a float waveform of shape
(B, samples) at 16 kHz to class probabilities of shape (B, C). The release
(:mod:`fl_ser.models.export`) exports this one eager module to ONNX, ``torch.export``
and TorchScript files, with no Python code of ours needed to run them.
"""

from __future__ import annotations

import torch
from torch import nn


class EmotionPipeline(nn.Module):
    def __init__(self, extractor: nn.Module, normalizer: nn.Module, classifier: nn.Module, labels: list[str]):
        super().__init__()
        self.extractor = extractor
        self.normalizer = normalizer
        self.classifier = classifier
        self.labels = list(labels)  # scripted as List[str] (inferred; an annotation would not script)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, samples) float waveform at 16 kHz -> (B, C) class probabilities."""
        feats = self.normalizer(self.extractor(wave))
        return torch.softmax(self.classifier(feats), dim=-1)
