"""On-device costs, on one core: DP-SGD versus plain training, feature extraction speed, the release's latency per
runtime (torch eager, ONNX Runtime, torch.export, TorchScript) and its file sizes, against their targets."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from experiments.bench.timing import interleaved_ratio
from fl_ser.data.corpus import SAMPLE_RATE, corpus_from_config
from fl_ser.data.partition import split_from_config
from fl_ser.features import Functionals, LogMel, MFCCDeltas
from fl_ser.privacy import normalization
from fl_ser.task import new_classifier, pipeline, speaker_data
from fl_ser.timing import best_median_seconds
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


#: Real-time-factor targets (audio seconds per compute second, one core) and the release's latency and size budgets.
TARGETS = {"functionals_rtf": 1000.0, "feature_rtf": 500.0, "release_rtf": 1500.0, "release_onnx_rtf": 1500.0,
           "release_onnx_logmel_cnn_rtf": 500.0, "release_ms_3s": 5.0, "release_mb": 1.0}


def noise_wave(seconds: float, seed: int) -> torch.Tensor:
    """The benchmarks' input: ``seconds`` of Gaussian noise at 16 kHz (std 0.1), seeded."""
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 0.1, int(seconds * SAMPLE_RATE)).astype(np.float32))


def feature_rtf(seconds: float = 3.0, repeats: int = 5) -> dict:
    """Real-time factor (audio seconds per second of compute) of each extractor, eager and TorchScript, on one
    core: the best of ``repeats`` medians of 21 calls."""
    wave = noise_wave(seconds, 0)[None]
    out = {}
    for name, ext in (("logmel", LogMel()), ("mfcc", MFCCDeltas()), ("functionals", Functionals())):
        modules = {"eager": ext.eval(), "torchscript": torch.jit.script(ext)}
        with torch.inference_mode():  # as the device runtimes run (fl_ser.models.runtimes)
            out[name] = {kind: seconds / best_median_seconds(lambda m=module: m(wave), repeats=repeats)
                         for kind, module in modules.items()}
    return out


def release_latency(cfg, repeats: int = 5) -> dict:
    """The released artifact on a 3 s utterance (audio -> emotion, features included), one core: latency and
    real-time factor of the eager pipeline and of each release format under the runtime a device runs it with
    (:func:`fl_ser.models.export.export_formats` writes and checks the files), the files' sizes, and TorchScript
    of the pipeline with int8 dynamic quantisation of its Linear layers."""
    from fl_ser.models.export import export_formats
    from fl_ser.models.runtimes import RUNTIMES, open_model

    _, _, norm = _device(cfg)
    pipe = pipeline(cfg, new_classifier(cfg, len(cfg.labels)), norm, list(cfg.labels)).eval()
    seconds = 3.0
    wave = noise_wave(seconds, 1)[None]
    result = {"features": str(cfg.features._target_).rsplit(".", 1)[-1],
              "model": str(cfg.model._target_).rsplit(".", 1)[-1]}

    def timed(fn) -> dict:
        t = best_median_seconds(fn, calls=51, repeats=repeats, warmup=5)
        return {"ms_3s": 1e3 * t, "rtf": seconds / t}

    with torch.inference_mode():  # as the device runtimes run (fl_ser.models.runtimes)
        result["eager"] = timed(lambda: pipe(wave))
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_formats(pipe, tmp)
        result["mb"] = {fmt: path.stat().st_size / 2**20 for fmt, path in exported.files.items()}
        result["unavailable"] = exported.unavailable
        for runtime, (fmt, _) in RUNTIMES.items():
            if fmt in exported.files:
                run = open_model(runtime, exported.files[fmt].read_bytes())
                result[runtime] = timed(lambda r=run: r(wave.numpy()))
        quantised = torch.ao.quantization.quantize_dynamic(pipe, {torch.nn.Linear}, dtype=torch.qint8)
        path = Path(tmp) / "int8.pt"
        torch.jit.script(quantised).save(str(path))
        run = open_model("torchscript", path.read_bytes())
        result["int8"] = {**timed(lambda: run(wave.numpy())), "mb": path.stat().st_size / 2**20}
    if "onnxruntime" in result:
        result["onnx_vs_torch"] = result["onnxruntime"]["ms_3s"] / result["eager"]["ms_3s"]
    return result


def speed(cfg, cnn_cfg, repeats: int = 5) -> dict:
    """The extractors' and the release's speed and size (call on one thread): the default release (``cfg``) and
    the log-mel + CNN one (``cnn_cfg``), with each figure against its target (:func:`speed_rows`)."""
    figures = {"feature_rtf": feature_rtf(repeats=repeats), "release": release_latency(cfg, repeats),
               "release_logmel_cnn": release_latency(cnn_cfg, repeats)}
    return figures | {"speed_targets": speed_rows(figures)}


def speed_rows(bench: dict) -> list[dict]:
    """The feature and release figures of ``bench`` with their targets: measure, value, target, met (None where
    the figure is missing)."""
    release, cnn = bench["release"], bench["release_logmel_cnn"]
    name = f"{release['features']} + {release['model']}"
    rows = [(f"feature real-time factor, {k}, {kind} (1 core)", v, TARGETS["functionals_rtf" if k == "functionals"
                                                                           else "feature_rtf"], ">=")
            for k, kinds in bench["feature_rtf"].items() for kind, v in kinds.items()]
    rows += [(f"release real-time factor, {name}, 3 s, {runtime} (1 core)", release.get(runtime, {}).get("rtf"),
              TARGETS["release_onnx_rtf" if runtime == "onnxruntime" else "release_rtf"], ">=")
             for runtime in ("eager", "onnxruntime", "torch", "torchscript")]
    rows += [(f"release real-time factor, {cnn['features']} + {cnn['model']}, 3 s, onnxruntime (1 core)",
              cnn.get("onnxruntime", {}).get("rtf"), TARGETS["release_onnx_logmel_cnn_rtf"], ">="),
             (f"release latency, {name}, 3 s, eager, ms (1 core)", release["eager"]["ms_3s"],
              TARGETS["release_ms_3s"], "<="),
             (f"release latency, onnxruntime / torch eager, {name}", release.get("onnx_vs_torch"), None, ""),
             (f"release latency, onnxruntime / torch eager, {cnn['features']} + {cnn['model']}",
              cnn.get("onnx_vs_torch"), None, "")]
    rows += [(f"release size, {name}, {fmt}, MB", mb, TARGETS["release_mb"], "<=") for fmt, mb in release["mb"].items()]
    rows += [(f"release size, {cnn['features']} + {cnn['model']}, {fmt}, MB", mb, None, "")
             for fmt, mb in cnn["mb"].items()]
    out = []
    for measure, value, target, sense in rows:
        met = None if value is None or target is None else value >= target if sense == ">=" else value <= target
        out.append({"measure": measure, "value": value, "target": None if target is None else f"{sense} {target:g}",
                    "met": met})
    return out


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
