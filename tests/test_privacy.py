"""Accounting: Opacus's own numbers, composition across rounds, budgets and impossible settings."""

import numpy as np
import pytest
import torch

from fl_ser.privacy.accountant import PrivacyBudgetError, PrivacyLedger, check_delta, user_level_epsilon
from fl_ser.training import DPSGDConfig, LocalTrainConfig, planned_epsilon, train_local


def test_rdp_reproduces_opacus_reference():
    # q=0.04, z=1.5, 2250 steps, delta=1e-5 -> 7.329 with Opacus's RDP accountant
    assert PrivacyLedger("rdp").epsilon_after(1.5, 0.04, 2250, 1e-5) == pytest.approx(7.329, abs=1e-3)
    assert user_level_epsilon(1.5, 0.04, 2250, 1e-5) == pytest.approx(7.329, abs=1e-3)


def test_prv_accountant_is_close_to_rdp_and_tighter():
    rdp = PrivacyLedger("rdp").epsilon_after(1.5, 0.04, 2250, 1e-5)
    prv = PrivacyLedger("prv").epsilon_after(1.5, 0.04, 2250, 1e-5)
    assert 0.5 * rdp < prv <= rdp


def test_ledger_composes_across_rounds_like_one_long_run():
    one_shot = PrivacyLedger().epsilon_after(2.0, 0.1, 300, 1e-5)
    ledger = PrivacyLedger()
    for _ in range(3):  # three rounds of 100 steps, serialised in between as in context.state
        ledger = PrivacyLedger.from_json(ledger.to_json())
        acc = ledger.make_accountant()
        for _ in range(100):
            acc.step(noise_multiplier=2.0, sample_rate=0.1)
        ledger.adopt(acc)
    assert ledger.steps == 300
    assert ledger.epsilon(1e-5) == pytest.approx(one_shot, rel=1e-9)


def test_training_updates_the_ledger_and_epsilon_grows():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    model = torch.nn.Linear(5, 3)
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, epsilon_budget=100)
    cfg = LocalTrainConfig(epochs=2, batch_size=10, lr=0.1)
    ledger = PrivacyLedger()
    planned = planned_epsilon(ledger, 40, cfg, dp)
    train_local(model, x, y, cfg, dp=dp, ledger=ledger)
    first = ledger.epsilon(1e-5)
    assert first == pytest.approx(planned, rel=1e-6)  # the plan a device checks its budget with is exact
    assert ledger.steps == 8
    model2 = torch.nn.Linear(5, 3)  # a fresh module each round: Opacus cannot wrap one twice
    train_local(model2, x, y, cfg, dp=dp, ledger=ledger)
    assert ledger.epsilon(1e-5) > first


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
        train_local(model, x, y, LocalTrainConfig(epochs=1, batch_size=None), dp=dp, ledger=PrivacyLedger())
        results.append(get_arrays(model))
    assert any(not np.array_equal(p, q) for p, q in zip(*results, strict=True))
