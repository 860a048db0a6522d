"""What vetted DP noise costs (:mod:`fl_ser.privacy.noise`, OpenDP on its CSPRNG), on one core.

Figures, each pair timed interleaved (:func:`interleaved_ratio`):

* the sampler's time per call against what fl-ser used before (numpy's PCG64
  seeded from ``secrets``), for the normaliser release, the MLP and the CNN;
* OpenDP's float Gaussian: building the mechanism against calling it, and a call
  by noise granularity ``2^k`` against the ``k`` fl-ser uses
  (:func:`~fl_ser.privacy.noise.grid_step` of std 1), OpenDP's default included;
* one DP-SGD local round (the default config's full-batch DP-GD, 3 steps, 140
  examples) with Opacus's noise against the same round with the noise drawn
  through :func:`~fl_ser.privacy.noise.with_vetted_noise`, for the MLP and the
  CNN; and the noise of that round alone (3 draws for every parameter, OpenDP
  against ``torch.normal`` on a seeded generator, as Opacus draws it).

The round is the device's own trainer, :func:`fl_ser.training.train_local`,
with ``vetted_noise`` on and off. Inputs are random tensors of the configured
features' shape: a round's cost does not depend on the values.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from experiments.bench.timing import interleaved_ratio
from fl_ser.privacy.noise import add_gaussian, gaussian, grid_step
from fl_ser.training import DPSGDConfig, LocalTrainConfig, train_local

CONF = Path(__file__).resolve().parents[2] / "conf"
SIZES = (150, 1351, 19543)  # the normaliser release, the MLP, the CNN
MODELS = {"mlp": ("functionals", 7), "cnn": ("logmel", 3)}  # model -> its configured features, rounds timed
NUM_CLASSES = 7
EXAMPLES = 140  # one synthetic device: 7 emotions x 20 utterances


def _numpy_noise(n: int) -> np.ndarray:
    return np.random.default_rng(secrets.randbits(128)).normal(0.0, 1.0, n)


def sampler_costs(sizes=SIZES, repeats: int = 21) -> dict:
    """ms per call of :func:`gaussian` against numpy, per size (a seventh of the repeats above 20,000 values)."""
    out = {}
    for n in sizes:
        vetted, numpy_ms, ratio = interleaved_ratio(partial(gaussian, 1.0, n), partial(_numpy_noise, n),
                                                    repeats=repeats if n <= 20_000 else max(1, repeats // 7))
        out[n] = {"vetted_ms": 1e3 * vetted, "numpy_ms": 1e3 * numpy_ms, "ratio": ratio,
                  "us_per_value": 1e6 * vetted / n}
    return out


def opendp_costs(size: int = 1351, ks=(-10, -60, None), repeats: int = 9) -> dict:
    """OpenDP's float Gaussian on ``size`` values: building the mechanism against calling it (what the cache in
    :mod:`fl_ser.privacy.noise` saves), and a call by granularity 2^k (None: OpenDP's default) against the k fl-ser
    uses for std 1."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    zeros = np.zeros(size)

    def mechanism(k):
        return dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=float, nan=False), size=size),
                                  dp.l2_distance(T=float), scale=1.0, k=k)

    ours = int(math.log2(grid_step(1.0)))
    reference = mechanism(ours)
    build, call, ratio = interleaved_ratio(partial(mechanism, ours), partial(reference, zeros), repeats=repeats)
    out = {"size": size, "k_used": ours, "build_ms": 1e3 * build, "call_ms": 1e3 * call, "build_per_call": ratio}
    for k in ks:
        t, t_ours, ratio = interleaved_ratio(partial(mechanism(k), zeros), partial(reference, zeros), repeats=repeats)
        out[f"k={'default' if k is None else k}"] = {"ms": 1e3 * t, "ms_k_used": 1e3 * t_ours, "ratio": ratio}
    return out


def _model(model: str) -> tuple[tuple[int, ...], partial]:
    """The configured features' shape, and a factory of fresh classifiers for them (as each round builds one)."""
    from hydra.utils import instantiate

    from fl_ser.models.classifiers import build_classifier

    ext = instantiate(OmegaConf.load(CONF / "features" / f"{MODELS[model][0]}.yaml"))
    return tuple(ext.output_shape), partial(build_classifier, OmegaConf.load(CONF / "model" / f"{model}.yaml"),
                                            ext.output_shape, ext.kind, NUM_CLASSES)


def _dp_round(new_classifier, x: torch.Tensor, y: torch.Tensor, train: LocalTrainConfig, dp: DPSGDConfig,
              vetted: bool) -> None:
    """One DP-GD local round of the trainer, with the vetted noise or Opacus's own."""
    train_local(new_classifier(), x, y, train, dp=replace(dp, vetted_noise=vetted))


def _round_noise(shapes, vetted: bool, steps: int, std: float) -> None:
    """A round's noise alone: ``steps`` draws for every parameter, as one DP optimiser step draws them."""
    if vetted:
        arrays = [np.zeros(shape, np.float32) for shape in shapes]
        for _ in range(steps):
            add_gaussian(arrays, std)
        return
    rng = torch.Generator().manual_seed(secrets.randbits(63))
    for _ in range(steps):
        for shape in shapes:
            torch.normal(0.0, std, shape, generator=rng)


def round_costs(models=tuple(MODELS), examples: int = EXAMPLES, repeats: int | None = None) -> dict:
    """ms of one DP-SGD local round with vetted against default noise, and of its noise alone, per model
    (``repeats``: each model's own count when None)."""
    train_cfg = OmegaConf.load(CONF / "config.yaml").train
    dp_sgd = OmegaConf.load(CONF / "privacy" / "full.yaml").dp_sgd
    train = LocalTrainConfig(epochs=int(train_cfg.epochs), batch_size=None, lr=float(train_cfg.lr),
                             momentum=float(train_cfg.momentum))
    dp = DPSGDConfig(noise_multiplier=float(dp_sgd.noise_multiplier), max_grad_norm=float(dp_sgd.max_grad_norm),
                     delta=float(dp_sgd.delta), epsilon_budget=1e9, accountant=str(dp_sgd.accountant))
    out = {}
    for model in models:
        times = repeats or MODELS[model][1]
        shape, new_classifier = _model(model)
        gen = torch.Generator().manual_seed(0)  # placeholder inputs, not DP noise
        x = torch.randn(examples, *shape, generator=gen)
        y = torch.randint(0, NUM_CLASSES, (examples,), generator=gen)
        round_ = partial(_dp_round, new_classifier, x, y, train, dp)
        vetted, default, ratio = interleaved_ratio(partial(round_, vetted=True), partial(round_, vetted=False),
                                                   repeats=times)
        shapes = [tuple(p.shape) for p in new_classifier().parameters()]
        std = dp.noise_multiplier * dp.max_grad_norm
        noise_vetted, noise_default, _ = interleaved_ratio(partial(_round_noise, shapes, True, train.epochs, std),
                                                           partial(_round_noise, shapes, False, train.epochs, std),
                                                           repeats=repeats or 7)
        out[model] = {"parameters": sum(math.prod(s) for s in shapes), "examples": examples, "steps": train.epochs,
                      "round_ms_vetted": 1e3 * vetted, "round_ms_default": 1e3 * default, "ratio": ratio,
                      "noise_ms_vetted": 1e3 * noise_vetted, "noise_ms_default": 1e3 * noise_default}
    return out


def noise_costs(quick: bool = False) -> dict:
    """All the figures, printed one line each; ``quick``: tiny sizes that check the code runs (figures meaningless).

    On one torch thread, as a device runs (restored afterwards).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sampler = sampler_costs(sizes=(150, 1351) if quick else SIZES, repeats=1 if quick else 21)
        opendp = opendp_costs(size=150 if quick else 1351, repeats=1 if quick else 9)
        rounds = round_costs(examples=4 if quick else EXAMPLES, repeats=1 if quick else None)
    finally:
        torch.set_num_threads(threads)
    for n, f in sampler.items():
        print(f"  noise, {n:,} values: OpenDP {f['vetted_ms']:.2f} ms ({f['us_per_value']:.1f} us/value) vs numpy "
              f"{f['numpy_ms']:.3f} ms: {f['ratio']:.0f}x", flush=True)
    print(f"  OpenDP float Gaussian, {opendp['size']:,} values, k={opendp['k_used']}: building it "
          f"{opendp['build_ms']:.2f} ms vs a call {opendp['call_ms']:.2f} ms", flush=True)
    for k in (k for k in opendp if k.startswith("k=")):
        f = opendp[k]
        print(f"  OpenDP float Gaussian, {opendp['size']:,} values, {k}: {f['ms']:.2f} ms vs "
              f"{f['ms_k_used']:.2f} ms at k={opendp['k_used']}: {f['ratio']:.2f}x", flush=True)
    for model, f in rounds.items():
        print(f"  DP-SGD round, {model} ({f['parameters']:,} parameters, {f['examples']} examples, "
              f"{f['steps']} steps): "
              f"vetted noise {f['round_ms_vetted']:.0f} ms vs Opacus's {f['round_ms_default']:.0f} ms: "
              f"{f['ratio']:.2f}x; the noise alone {f['noise_ms_vetted']:.0f} ms vs {f['noise_ms_default']:.2f} ms",
              flush=True)
    return {"noise_sampler_ms": sampler, "noise_opendp": opendp, "noise_dp_round": rounds}
