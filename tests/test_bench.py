"""The benchmark code runs (a smoke test: no timing is asserted, benchmarks are not tests)."""

import pytest

from experiments.bench import federation, local
from tests.conftest import make_config


def test_on_device_benchmarks_run(tmp_path):
    cfg = make_config(tmp_path, "data.num_speakers=4", "partition.num_test_speakers=1",
                      "data.utterances_per_emotion=2")
    dp = local.dp_sgd_overhead(cfg)
    assert dp["dp_sgd_overhead"] > 0 and dp["epoch_examples"] == 14
    assert set(local.feature_rtf(seconds=0.5)) == {"logmel", "mfcc", "functionals"}
    latency = local.release_latency(cfg)
    assert latency["float"]["mb"] > 0 and latency["int8"]["ms_3s"] > 0
    int8 = local.int8_accuracy(make_config(tmp_path, "data.num_speakers=4", "partition.num_test_speakers=1",
                                           "data.utterances_per_emotion=2", "rounds=2"))
    assert 0 <= int8["uar_int8"] <= 1 and int8["uar_change"] == int8["uar_int8"] - int8["uar_float"]


@pytest.mark.slow
def test_secagg_round_cost_runs():
    shapes = [(4, 3), (3,)]
    secure = federation.round_cost(3, secure=True, shapes=shapes)
    assert secure["round_s"] > 0 and secure["secagg_s_per_device_round"] > 0
