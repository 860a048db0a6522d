"""The deployable emotion model: waveform -> features -> device normaliser -> classifier -> probabilities.

One ``nn.Module`` composes the torchaudio feature extractor, the device-local
normaliser and the federated classifier, so the released artifact is a single
TorchScript file that maps a float waveform of shape (1, samples) at 16 kHz to
class probabilities of shape (1, C), with no Python code of ours needed to run it.
"""

from __future__ import annotations

import copy
from pathlib import Path

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

    def export(self, path: str | Path) -> Path:
        """Script and save the pipeline as a TorchScript artifact (eval mode, on CPU)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        frozen = copy.deepcopy(self).cpu().eval().requires_grad_(False)  # inference artifact; self is untouched
        scripted = torch.jit.script(frozen)
        scripted.save(str(path))
        return path
