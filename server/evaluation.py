"""Server-side evaluation of the global model on held-out speakers that never trained, two ways.

*Own statistics* (the main figures: ``uar``, ``accuracy``, ``macro_f1``, ...):
each test speaker's features are standardised exactly as a training device
standardises its own (``privacy.normalization``: with ``dp``, through the same
noisy release, drawn once per speaker; with ``local``, the speaker's own
statistics; with ``public``, the public reference). That is how the federation
itself sees its devices once they have recorded a speaker's data, but
per-speaker statistics are computed over all of the speaker's utterances, i.e.
they assume every test speaker has already covered every emotion. EmoDB's
actors each act all seven, so these statistics are emotion-balanced there and
flatter the figures (``local`` is worth ~23 UAR points on EmoDB, DEVELOPERS.md).

*New device* (``new_device``): as a device that meets its first utterance
would see the speaker, with no statistics of that speaker at all: the public
reference statistics (:func:`fl_ser.privacy.normalization.reference_statistics`,
those the release's normaliser carries for ``public`` and ``dp``), with the same
``bound``. For ``local`` too, whose release carries none: pooled statistics of
the training speakers would be private. With ``public`` and ``utterance`` both
ways are the same transform by construction (``utterance`` needs no
statistics): they are evaluated once and ``new_device.same_as_own`` is true.

Each way reports UAR, accuracy, macro-F1, UAR per sex (``uar_by_group``) and
per held-out speaker (``uar_by_speaker``), and the worst speaker
(``worst_speaker``, ``worst_speaker_uar``); the own-statistics way also the
confusion matrix and per-class recall. Features are standardised once, at
construction, so a round costs two forward passes over the held-out set.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from fl_ser.features.normalize import FeatureNormalizer
from fl_ser.metrics import classification_report
from fl_ser.privacy import normalization
from fl_ser.task import new_classifier, set_arrays, speaker_data
from fl_ser.training import evaluate

#: Modes whose device normalisation needs no statistics of the speaker: "new device" is the same transform.
SAME_FOR_A_NEW_DEVICE = ("public", "utterance")
#: The figures each way reports (the own-statistics way also its confusion, recall and label list).
WAY_KEYS = ("uar", "accuracy", "macro_f1", "uar_by_group", "uar_by_speaker", "worst_speaker_uar", "worst_speaker")


def new_device_normalizer(cfg: DictConfig, norm: normalization.Normalization) -> FeatureNormalizer | None:
    """How a device that has no statistics of its speaker standardises: the public reference statistics with
    the experiment's ``bound`` (None: the mode's own normalisation already uses none of the speaker's)."""
    if norm.mode in SAME_FOR_A_NEW_DEVICE:
        return None
    ref = norm.reference if norm.reference is not None else normalization.reference_statistics(cfg)
    return FeatureNormalizer(norm.shape, norm.kind, bound=norm.bound).set_statistics(ref.mean, ref.std)


class HeldOutEvaluator:
    def __init__(self, cfg: DictConfig, test_speakers: tuple[str, ...]):
        self.cfg = cfg
        self.labels = list(cfg.labels)
        self.normalization = normalization.from_config(cfg)
        new_device = new_device_normalizer(cfg, self.normalization)
        own, fresh, ys, groups, speakers = [], [], [], [], []
        for spk in test_speakers:
            data = speaker_data(cfg, spk)
            own.append(self.normalization.standardise(data.x))
            if new_device is not None:
                with torch.no_grad():
                    fresh.append(new_device(data.x))
            ys.append(data.y)
            groups += [data.sex] * len(data.y)
            speakers += [spk] * len(data.y)
        self.x, self.y, self.groups, self.speakers = torch.cat(own), torch.cat(ys), groups, speakers
        self.x_new_device = torch.cat(fresh) if new_device is not None else None  # None: same as self.x
        self.num_utterances = len(self.y)

    def __call__(self, arrays: list[np.ndarray]) -> tuple[float, dict]:
        classifier = new_classifier(self.cfg, len(self.labels))
        set_arrays(classifier, arrays)
        return self.score(classifier)

    def _report(self, classifier, x: torch.Tensor) -> tuple[float, dict]:
        pred, loss = evaluate(classifier, x, self.y)
        return loss, classification_report(self.y.numpy(), pred.numpy(), self.labels, groups=self.groups,
                                           speakers=self.speakers)

    def score(self, classifier) -> tuple[float, dict]:
        """Loss and report of any classifier module (e.g. a quantised one) on the held-out speakers: the
        own-statistics figures at the top level, the new-device figures under ``new_device``."""
        loss, report = self._report(classifier, self.x)
        same = self.x_new_device is None
        new_loss, new_report = (loss, report) if same else self._report(classifier, self.x_new_device)
        report["new_device"] = {**{k: new_report[k] for k in WAY_KEYS}, "loss": new_loss, "same_as_own": same}
        report["normalization"] = self.normalization.mode
        return loss, report
