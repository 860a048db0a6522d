"""The device: cumulative epsilon in its node state, declining past its budget, and config errors for people."""

import itertools

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from clients.client_app import make_client
from experiments.train import ConfigError
from fl_ser.task import get_arrays, new_classifier
from tests.conftest import make_config


def device(cfg, pid=0):
    ctx = Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": 5},
                  state=RecordDict(), run_config={})
    return ctx, lambda: make_client(cfg, ctx)  # Flower builds a fresh client per message; the context persists


def test_device_epsilon_composes_across_rounds_then_it_declines(tmp_path):
    cfg = make_config(tmp_path, "data.num_speakers=7", "data.utterances_per_emotion=6", "partition.num_test_speakers=2",
                      "privacy.dp_sgd.epsilon_budget=2.0", "train.epochs=1")
    _, client = device(cfg)
    params = get_arrays(new_classifier(cfg, len(cfg.labels)))
    ins = {"server_round": 1}
    eps = []
    for _ in range(10):
        res = client().fit(_fit_ins(params, ins))
        eps.append(res.metrics.get("epsilon"))
        if res.metrics["declined"]:
            break
    assert res.metrics["declined"] == 1 and len(eps) >= 3
    assert all(a < b for a, b in itertools.pairwise(eps[:-1]))  # cumulative, strictly growing
    assert eps[-1] == eps[-2] <= 2.0  # declining spends nothing
    from flwr.common import parameters_to_ndarrays

    for a, b in zip(parameters_to_ndarrays(res.parameters), params, strict=True):
        np.testing.assert_array_equal(a, b)  # a declined round returns the global model unchanged


def _fit_ins(params, config):
    from flwr.common import FitIns, ndarrays_to_parameters

    return FitIns(ndarrays_to_parameters(params), config)


def test_config_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.root"):
        make_config(tmp_path, "data=emodb")
    with pytest.raises(ConfigError, match="does not exist"):
        make_config(tmp_path, "data=emodb", f"data.root={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="model=cnn"):
        make_config(tmp_path, "features=logmel")
    with pytest.raises(ConfigError, match=r"impossible privacy budget"):
        make_config(tmp_path, "privacy.dp_sgd.epsilon_budget=0.5")
    with pytest.raises(ConfigError, match="delta"):
        make_config(tmp_path, "privacy.dp_sgd.delta=0.1")
    with pytest.raises(ConfigError, match="update_clipping"):
        make_config(tmp_path, "privacy=dp_sgd", "privacy.user_level.noise_multiplier=1.0")
