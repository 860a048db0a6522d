"""fl-ser's own DP noise (fl_ser.privacy.noise): OpenDP's Gaussian, its grid, its refusals, Opacus's noise through it.

Statistical checks use tolerances of 6 standard errors (a false failure about once in 10^8 runs).
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fl_ser.privacy.noise import GRID_BITS, add_gaussian, gaussian, grid_step, with_vetted_noise

SE = 6.0  # standard errors allowed


def on_grid(values: np.ndarray, step: float) -> bool:
    scaled = np.asarray(values, dtype=np.float64) / step  # exact: step is a power of two
    return bool(np.all(scaled == np.round(scaled)))


def test_std_mean_and_shape_of_the_distribution():
    n, std = 40_000, 2.5
    x = gaussian(std, n)
    assert abs(x.mean()) < SE * std / math.sqrt(n)
    assert abs(x.std() / std - 1) < SE / math.sqrt(2 * n)
    for k, mass in ((1, 0.682689), (2, 0.954500)):  # a Gaussian's, not just any distribution with this std
        share = np.mean(np.abs(x) < k * std)
        assert abs(share - mass) < SE * math.sqrt(mass * (1 - mass) / n)


def test_add_gaussian_noise_has_the_std_on_top_of_the_values():
    n, std = 20_000, 0.03
    values = np.linspace(-1, 1, n)
    noise = add_gaussian([values], std)[0] - values
    assert abs(noise.mean()) < SE * std / math.sqrt(n)
    assert abs(noise.std() / std - 1) < SE / math.sqrt(2 * n)


def test_draws_are_independent_between_calls_and_processes():
    a, b = gaussian(1.0, 5_000), gaussian(1.0, 5_000)
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(a, b)[0, 1]) < SE / math.sqrt(len(a))
    draw = "from fl_ser.privacy.noise import gaussian; print(gaussian(1.0, 4).tolist())"
    runs = {subprocess.run([sys.executable, "-c", draw], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(runs) == 2  # no seed anywhere: two fresh processes draw different noise


def test_std_zero_gives_zeros_and_unchanged_copies():
    assert np.array_equal(gaussian(0.0, (3, 4)), np.zeros((3, 4)))
    values = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    out = add_gaussian(values, 0)
    assert np.array_equal(out[0], values[0]) and out[0] is not values[0] and out[0].dtype == np.float32


@pytest.mark.parametrize("std", [-1.0, math.nan, math.inf, -math.inf])
def test_invalid_std_is_refused(std):
    with pytest.raises(ValueError, match="finite number >= 0"):
        gaussian(std, 3)
    with pytest.raises(ValueError, match="finite number >= 0"):
        add_gaussian([np.zeros(3)], std)


def test_values_and_dtypes_that_cannot_be_released_are_refused():
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            add_gaussian([np.array([0.0, bad])], 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        add_gaussian([np.arange(3)], 1.0)
    with pytest.raises(ValueError, match="too small"):
        gaussian(1e-320, 3)


def test_shapes_and_dtypes_are_preserved():
    assert gaussian(1.0, 7).shape == (7,) and gaussian(1.0, (2, 0, 3)).shape == (2, 0, 3)
    assert gaussian(1.0, (2, 3)).dtype == np.float64
    arrays = [np.ones((4, 3), np.float32), np.zeros(5, np.float64), np.full((), 2.0, np.float16), np.zeros((0, 2))]
    out = add_gaussian(arrays, 0.5)
    assert [(a.shape, a.dtype) for a in out] == [(a.shape, a.dtype) for a in arrays]
    assert all(not np.array_equal(a, b) for a, b in zip(out[:3], arrays[:3], strict=True))
    assert add_gaussian([], 1.0) == []


@pytest.mark.parametrize("std", [1.0, 4.5, 0.02, 3e-7, 1e6])
def test_noise_and_releases_lie_on_the_documented_grid(std):
    step = grid_step(std)
    assert math.frexp(step)[0] == 0.5  # a power of two
    assert std / 2 ** (GRID_BITS + 1) < step <= std / 2**GRID_BITS
    assert on_grid(gaussian(std, 1_000), step)
    # off-grid inputs (1/3, 0.1 ...) come back on the grid: OpenDP rounds the value before adding noise, so the
    # output carries none of the input's low bits
    values = np.array([1 / 3, 0.1, -2.7182818284590452, 1e-9, 123.456]) * std
    assert not on_grid(values, step)
    assert on_grid(add_gaussian([values], std)[0], step)


def _private(model, vetted, loss_reduction="mean", max_grad_norm=1.0, **kwargs):
    from opacus import PrivacyEngine

    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant="rdp")
        module, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x, y), batch_size=16),
            noise_multiplier=4.5, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction, **kwargs)
    if vetted:
        optimizer = with_vetted_noise(optimizer)
    return engine, module, optimizer, loader


def _step(module, optimizer, loader, scale=1.0):
    for xb, yb in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = scale * torch.nn.functional.cross_entropy(module(xb), yb, reduction="sum")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
            loss.backward()
        optimizer.step()


def _grads(model) -> np.ndarray:
    return np.concatenate([p.grad.detach().numpy().ravel() for p in model.parameters()])


def test_opacus_noise_comes_from_the_vetted_sampler():
    from opacus.optimizers import DPOptimizer

    step = grid_step(4.5 * 1.0)
    for vetted in (True, False):
        model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3)).double()
        engine, module, optimizer, loader = _private(model, vetted, loss_reduction="sum")
        _step(module, optimizer, loader)
        assert isinstance(optimizer, DPOptimizer)
        assert type(optimizer).__name__ == ("VettedNoiseDPOptimizer" if vetted else "DPOptimizer")
        # summed clipped gradients + noise, in float64: on OpenDP's grid only when OpenDP drew the noise
        assert on_grid(_grads(model), step) is vetted
        assert engine.accountant.history == [(4.5, 1.0, 1)]  # the accountant's hook came along
        module._close()


def test_opacus_vetted_noise_has_the_calibrated_std():
    model = torch.nn.Sequential(torch.nn.Linear(6, 200), torch.nn.Tanh(), torch.nn.Linear(200, 3)).double()
    _, module, optimizer, loader = _private(model, vetted=True, loss_reduction="sum")
    _step(module, optimizer, loader, scale=0.0)  # zero gradients: p.grad is the noise alone
    noise = _grads(model)
    assert abs(noise.std() / 4.5 - 1) < SE / math.sqrt(2 * noise.size)
    module._close()


def test_other_opacus_optimizers_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(6, 3)).double()
    with pytest.raises(TypeError, match="DPPerLayerOptimizer"):
        _private(model, vetted=True, clipping="per_layer", max_grad_norm=[1.0, 1.0])


@pytest.mark.slow
def test_noise_bench_runs():
    from experiments.bench.noise import noise_costs

    costs = noise_costs(quick=True)
    assert set(costs["noise_sampler_ms"]) == {150, 1351}
    assert set(costs["noise_dp_round"]) == {"mlp", "cnn"}
    assert costs["noise_dp_round"]["mlp"]["parameters"] == 1351
    assert costs["noise_dp_round"]["cnn"]["parameters"] == 19543
