"""On-device costs, on one core: DP-SGD versus plain training, feature extraction speed, release latency and size."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from experiments.bench.timing import interleaved_ratio, median_seconds
from fl_ser.data.corpus import SAMPLE_RATE, corpus_from_config
from fl_ser.data.partition import split_from_config
from fl_ser.features import Functionals, LogMel, MFCCDeltas
from fl_ser.privacy import normalization
from fl_ser.task import new_classifier, pipeline, speaker_data
from fl_ser.training import DPSGDConfig, LocalTrainConfig, train_local


def _device(cfg):
    speaker = split_from_config(cfg, corpus_from_config(cfg)).train[0]
    data = speaker_data(cfg, speaker)
    norm = normalization.from_config(cfg)
    return norm.standardise(data.x), data.y, norm.published()


def dp_sgd_overhead(cfg) -> dict:
    """One local epoch with Opacus (set-up included, as a device pays it every round) versus without DP, with the
    vetted noise (the default) and with Opacus's own torch noise, each timed interleaved with the plain epoch."""
    x, y, _ = _device(cfg)
    local = LocalTrainConfig(epochs=1, batch_size=cfg.train.batch_size, lr=float(cfg.train.lr),
                             momentum=float(cfg.train.momentum))
    dp = DPSGDConfig(noise_multiplier=float(cfg.privacy.dp_sgd.noise_multiplier),
                     max_grad_norm=float(cfg.privacy.dp_sgd.max_grad_norm), delta=1e-5, epsilon_budget=1e9,
                     grad_sample_mode="hooks")
    num_classes = len(cfg.labels)

    def private(vetted: bool):
        train_local(new_classifier(cfg, num_classes), x, y, local, dp=replace(dp, vetted_noise=vetted))

    def plain():
        train_local(new_classifier(cfg, num_classes), x, y, local)

    t_dp, t_plain, ratio = interleaved_ratio(lambda: private(True), plain, repeats=15)
    t_torch, _, ratio_torch = interleaved_ratio(lambda: private(False), plain, repeats=15)
    return {"dp_sgd_overhead": ratio, "dp_sgd_overhead_torch_noise": ratio_torch, "epoch_ms_dp_hooks": 1e3 * t_dp,
            "epoch_ms_dp_torch_noise": 1e3 * t_torch, "epoch_ms_plain": 1e3 * t_plain, "epoch_examples": len(y),
            "model": str(cfg.model._target_).rsplit(".", 1)[-1]}


def feature_rtf(seconds: float = 3.0) -> dict:
    """Real-time factor (audio seconds per second of compute) of each extractor, scripted, on one core."""
    wave = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, int(seconds * SAMPLE_RATE)).astype(np.float32))
    out = {}
    for name, ext in (("logmel", LogMel()), ("mfcc", MFCCDeltas()), ("functionals", Functionals())):
        scripted = torch.jit.script(ext.eval())
        with torch.no_grad():
            t = median_seconds(lambda s=scripted: s(wave[None]), repeats=21, warmup=3)
        out[name] = seconds / t
    return out


def release_latency(cfg) -> dict:
    """Latency of the released artifact on a 3 s utterance (audio -> emotion, features included), and its size."""
    _, _, norm = _device(cfg)
    pipe = pipeline(cfg, new_classifier(cfg, len(cfg.labels)), norm, list(cfg.labels)).eval()
    wave = torch.from_numpy(np.random.default_rng(1).normal(0, 0.1, 3 * SAMPLE_RATE).astype(np.float32))[None]
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"float": pipe,
                    "int8": torch.ao.quantization.quantize_dynamic(pipe, {torch.nn.Linear}, dtype=torch.qint8)}
        for name, module in variants.items():
            path = Path(tmp) / f"{name}.pt"
            torch.jit.script(module).save(str(path))
            loaded = torch.jit.load(str(path))
            with torch.no_grad():
                t = median_seconds(lambda m=loaded: m(wave), repeats=51, warmup=5)
            result[name] = {"ms_3s": 1e3 * t, "mb": path.stat().st_size / 2**20}
    return result


def int8_accuracy(cfg) -> dict:
    """Held-out UAR of a trained classifier, float vs int8 dynamic quantisation of its Linear layers.

    The classifier is the default model trained centrally without DP (experiments.centralised): the
    quantisation error depends on the weights' scale, not on how they were learnt.
    """
    from experiments.centralised import fit_centralised
    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.data.partition import split_from_config
    from server.evaluation import HeldOutEvaluator

    classifier, _ = fit_centralised(cfg)
    evaluator = HeldOutEvaluator(cfg, split_from_config(cfg, corpus_from_config(cfg)).test)
    quantised = torch.ao.quantization.quantize_dynamic(classifier, {torch.nn.Linear}, dtype=torch.qint8)
    (_, full), (_, int8) = evaluator.score(classifier), evaluator.score(quantised)
    return {"uar_float": full["uar"], "uar_int8": int8["uar"], "uar_change": int8["uar"] - full["uar"],
            "test_utterances": evaluator.num_utterances}
