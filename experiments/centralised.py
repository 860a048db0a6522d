"""The centralised, non-private baseline: the same speakers, features and model, trained on pooled data.

This is the upper bound a federation is compared with: the same training
speakers (each standardised with its own statistics, as on its device), the
same held-out speakers and evaluator, and the same number of passes over the
data as ``rounds x train.epochs``, but all in one place and without DP.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from fl_ser.data.corpus import corpus_from_config
from fl_ser.data.partition import split_from_config
from fl_ser.privacy import normalization
from fl_ser.task import get_arrays, new_classifier, speaker_data
from fl_ser.training import LocalTrainConfig, train_local
from server.evaluation import HeldOutEvaluator


def fit_centralised(cfg: DictConfig):
    """The classifier trained on all training speakers' pooled data (each standardised as its device would)."""
    split = split_from_config(cfg, corpus_from_config(cfg))
    norm = normalization.from_config(cfg)
    xs, ys = [], []
    for spk in split.train:
        data = speaker_data(cfg, spk)
        xs.append(norm.standardise(data.x))
        ys.append(data.y)
    x, y = torch.cat(xs), torch.cat(ys)
    torch.manual_seed(int(cfg.seed))
    classifier = new_classifier(cfg, len(cfg.labels))
    local = LocalTrainConfig(epochs=int(cfg.rounds) * int(cfg.train.epochs), batch_size=cfg.train.batch_size or 32,
                             lr=float(cfg.train.lr), momentum=float(cfg.train.momentum),
                             weight_decay=float(cfg.train.weight_decay))
    train_local(classifier, x, y, local)
    return classifier, len(y)


def train_centralised(cfg: DictConfig) -> dict:
    t0 = time.monotonic()
    split = split_from_config(cfg, corpus_from_config(cfg))
    classifier, num_train = fit_centralised(cfg)
    evaluator = HeldOutEvaluator(cfg, split.test)
    loss, report = evaluator(get_arrays(classifier))
    summary = {"mode": "centralised", "uar": report["uar"], "accuracy": report["accuracy"],
               "macro_f1": report["macro_f1"], "uar_by_group": report.get("uar_by_group"), "loss": loss,
               "uar_by_speaker": report.get("uar_by_speaker"), "worst_speaker_uar": report.get("worst_speaker_uar"),
               "worst_speaker": report.get("worst_speaker"), "uar_new_device": report["new_device"]["uar"],
               "new_device": report["new_device"],
               "confusion": report["confusion"], "labels": list(cfg.labels), "num_train_speakers": len(split.train),
               "test_speakers": list(split.test), "num_train_utterances": num_train,
               "num_test_utterances": evaluator.num_utterances, "epsilon_sample_max": None, "epsilon_user": None,
               "wall_s": round(time.monotonic() - t0, 2)}
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
