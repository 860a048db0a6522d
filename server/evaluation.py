"""Server-side evaluation of the global model on held-out speakers that never trained.

Each test speaker's features are standardised exactly as a training device
standardises its own (``privacy.normalization``: with ``dp``, through the same
noisy release, drawn once per speaker; with ``local``, the speaker's own
statistics). Reports UAR, accuracy, macro-F1, the confusion matrix and UAR per
sex.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from fl_ser.metrics import classification_report
from fl_ser.privacy import normalization
from fl_ser.task import new_classifier, set_arrays, speaker_data
from fl_ser.training import evaluate


class HeldOutEvaluator:
    def __init__(self, cfg: DictConfig, test_speakers: tuple[str, ...]):
        self.cfg = cfg
        self.labels = list(cfg.labels)
        self.normalization = normalization.from_config(cfg)
        xs, ys, groups = [], [], []
        for spk in test_speakers:
            data = speaker_data(cfg, spk)
            xs.append(self.normalization.standardise(data.x))
            ys.append(data.y)
            groups += [data.sex] * len(data.y)
        self.x, self.y, self.groups = torch.cat(xs), torch.cat(ys), groups
        self.num_utterances = len(self.y)

    def __call__(self, arrays: list[np.ndarray]) -> tuple[float, dict]:
        classifier = new_classifier(self.cfg, len(self.labels))
        set_arrays(classifier, arrays)
        return self.score(classifier)

    def score(self, classifier) -> tuple[float, dict]:
        """Loss and report of any classifier module (e.g. a quantised one) on the held-out speakers."""
        pred, loss = evaluate(classifier, self.x, self.y)
        report = classification_report(self.y.numpy(), pred.numpy(), self.labels, groups=self.groups)
        return loss, report
