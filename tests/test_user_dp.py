"""User-level DP on the server: uniform mean, calibrated Gaussian noise (server or distributed), before optimisers."""

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam, FedAvg

from server.user_dp import UserLevelDP

DIM = 200_000


def results(values, weights=None):
    weights = weights or [1] * len(values)
    return [(SimpleNamespace(cid=str(i)),
             FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(DIM, v, dtype=np.float64)]), w, {}))
            for i, (v, w) in enumerate(zip(values, weights, strict=True))]


def aggregate(strategy, values, sampled, weights=None):
    """Aggregate updates from devices 0..len(values)-1 of ``sampled`` devices 0..sampled-1."""
    strategy.sampled = {str(i) for i in range(sampled)}
    params, _ = strategy.aggregate_fit(1, results(values, weights), [])
    return parameters_to_ndarrays(params)[0]


def test_dropped_devices_are_named():
    dp = UserLevelDP(FedAvg(), 1.0, 0.0, "server")
    aggregate(dp, [0.0] * 3, 5)
    assert dp.last_round["dropped"] == ["3", "4"]
    assert dp.last_round["participants"] == 3
    aggregate(dp, [0.0] * 5, 5)
    assert dp.last_round["dropped"] == []


def test_uniform_mean_without_noise_ignores_example_counts():
    out = aggregate(UserLevelDP(FedAvg(), 1.0, 0.0, "server"), [0.0, 1.0, 2.0], 3, weights=[1, 1, 100])
    np.testing.assert_allclose(out, 1.0)


@pytest.mark.parametrize("z,clip,n", [(1.0, 1.0, 10), (0.5, 2.0, 4)])
def test_server_noise_is_calibrated_to_the_mean_of_n_updates(z, clip, n):
    out = aggregate(UserLevelDP(FedAvg(), clip, z, "server"), [0.0] * n, n)
    assert out.std() == pytest.approx(z * clip / n, rel=0.02)
    assert abs(out.mean()) < 5 * z * clip / n / np.sqrt(DIM)


def test_distributed_noise_is_topped_up_only_for_dropouts():
    z, clip, m = 1.0, 1.0, 10
    dp = UserLevelDP(FedAvg(), clip, z, "distributed")
    assert aggregate(dp, [0.0] * m, m).std() == 0.0  # all shares arrived: devices already added it all
    n = 6
    out = aggregate(dp, [0.0] * n, m)  # 4 dropped: top up to std z*C/n
    already = z * clip * np.sqrt(n / m) / n
    assert out.std() == pytest.approx(np.sqrt((z * clip / n) ** 2 - already**2), rel=0.02)


def test_server_optimiser_sees_the_noised_mean():
    init = ndarrays_to_parameters([np.zeros(DIM)])
    dp = UserLevelDP(FedAdam(initial_parameters=init, eta=0.1, tau=1e-9), 1.0, 0.0, "server")
    out = aggregate(dp, [0.5, 1.5], 2)
    # FedAdam's first step moves every coordinate alike, towards the mean update (+1), by at most eta
    np.testing.assert_allclose(out, out[0])
    assert 0 < out[0] <= 0.1 + 1e-6


def test_devices_get_the_clipping_norm_and_their_noise_share():
    from flwr.server.client_manager import SimpleClientManager

    class Inner(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            from flwr.common import FitIns

            return [(SimpleNamespace(cid=str(i)), FitIns(parameters, {})) for i in range(4)]

    dp = UserLevelDP(Inner(), 2.0, 1.0, "distributed")
    ins = dp.configure_fit(1, ndarrays_to_parameters([np.zeros(2)]), SimpleClientManager())
    assert all(fit.config["clipping_norm"] == 2.0 for _, fit in ins)
    assert all(fit.config["fl-ser.device_noise_std"] == pytest.approx(1.0 * 2.0 / 2) for _, fit in ins)
