"""Accounting: Opacus's own numbers, composition across rounds, budgets and impossible settings."""

import numpy as np
import pytest
import torch

from fl_ser.privacy.accountant import PrivacyBudgetError, check_delta, epsilon, merged, user_level_epsilon
from fl_ser.training import DPSGDConfig, LocalTrainConfig, planned_entries, train_local


def test_rdp_reproduces_opacus_reference():
    # q=0.04, z=1.5, 2250 steps, delta=1e-5 -> 7.329 with Opacus's RDP accountant
    assert epsilon([(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.329, abs=1e-3)
    assert user_level_epsilon(1.5, 0.04, 2250, 1e-5) == pytest.approx(7.329, abs=1e-3)


def test_prv_accountant_is_close_to_rdp_and_tighter():
    rdp = epsilon([(1.5, 0.04, 2250)], 1e-5, "rdp")
    prv = epsilon([(1.5, 0.04, 2250)], 1e-5, "prv")
    assert 0.5 * rdp < prv <= rdp


def test_rounds_compose_like_one_long_run_and_repeated_entries_merge():
    one_shot = epsilon([(2.0, 0.1, 300)], 1e-5)
    assert merged([(2.0, 0.1, 100)] * 3) == [(2.0, 0.1, 300)]
    assert epsilon([(2.0, 0.1, 100)] * 3, 1e-5) == pytest.approx(one_shot, rel=1e-12)
    # a normaliser release (the Gaussian mechanism: q = 1, one step) composes with DP-SGD's entries
    assert epsilon([(2.0, 0.1, 300), (3.0, 1.0, 1)], 1e-5) > one_shot
    assert epsilon([], 1e-5) == 0.0


def test_training_reports_exactly_the_planned_spend():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, epsilon_budget=100)
    cfg = LocalTrainConfig(epochs=2, batch_size=10, lr=0.1)
    planned = planned_entries(40, cfg, dp.noise_multiplier)
    result = train_local(torch.nn.Linear(5, 3), x, y, cfg, dp=dp)
    assert result["steps"] == 8 and merged(result["spent"]) == merged(planned)  # the budget check is exact
    again = train_local(torch.nn.Linear(5, 3), x, y, cfg, dp=dp)  # a fresh module each round (Opacus wraps once)
    assert epsilon([*result["spent"], *again["spent"]], 1e-5) > epsilon(result["spent"], 1e-5)


def test_impossible_settings_are_refused_with_the_fix():
    with pytest.raises(PrivacyBudgetError, match="delta"):
        check_delta(0.05, 100, "device 03")
    with pytest.raises(PrivacyBudgetError, match="noise_multiplier"):
        DPSGDConfig(noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-5, epsilon_budget=10)
    with pytest.raises(PrivacyBudgetError, match="epsilon_budget"):
        DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, epsilon_budget=0)
    assert user_level_epsilon(0.0, 0.1, 10, 1e-5) is None


def test_dp_noise_is_fresh_and_initialisation_leaves_the_global_rng_alone(tmp_path):
    """Regression: a configured seed must never fix the DP noise (it could then be subtracted)."""
    from fl_ser.task import get_arrays, new_classifier, set_arrays
    from tests.conftest import make_config

    cfg = make_config(tmp_path, "data.num_speakers=4", "partition.num_test_speakers=1")
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    new_classifier(cfg, 7)
    assert torch.equal(torch.rand(1), a)  # building the model did not reseed the global generator
    x, y = torch.randn(30, 74), torch.randint(0, 7, (30,))
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, epsilon_budget=100)
    results = []
    for _ in range(2):
        torch.manual_seed(0)  # even a caller that seeds torch gets fresh noise
        model = new_classifier(cfg, 7)
        set_arrays(model, get_arrays(new_classifier(cfg, 7)))
        train_local(model, x, y, LocalTrainConfig(epochs=1, batch_size=None), dp=dp)
        results.append(get_arrays(model))
    assert any(not np.array_equal(p, q) for p, q in zip(*results, strict=True))
