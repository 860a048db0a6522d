"""The benchmark code runs (a smoke test: no timing is asserted, benchmarks are not tests)."""

import pytest

from experiments.bench import aggregation, local, release_profile
from tests.conftest import make_config


def test_on_device_benchmarks_run(tmp_path):
    cfg = make_config(tmp_path, "data.num_speakers=4", "partition.num_test_speakers=1",
                      "data.utterances_per_emotion=2")
    dp = local.dp_sgd_overhead(cfg)
    assert dp["dp_sgd_overhead"] > 0 and dp["epoch_examples"] == 14
    assert set(local.feature_rtf(seconds=0.5, repeats=1)) == {"logmel", "mfcc", "functionals"}
    latency = local.release_latency(cfg, repeats=1)
    assert set(latency["mb"]) == {"onnx", "pt2", "torchscript"} and min(latency["mb"].values()) > 0
    assert latency["eager"]["rtf"] > 0 and latency["onnxruntime"]["rtf"] > 0 and latency["int8"]["ms_3s"] > 0
    assert latency["onnx_vs_torch"] == latency["onnxruntime"]["ms_3s"] / latency["eager"]["ms_3s"]
    rows = local.speed_rows({"feature_rtf": {"functionals": {"eager": 900.0}}, "release": latency,
                             "release_logmel_cnn": latency})
    assert rows[0] == {"measure": "feature real-time factor, functionals, eager (1 core)", "value": 900.0,
                       "target": ">= 1000", "met": False}
    assert all(r["met"] is None or isinstance(r["met"], bool) for r in rows)
    int8 = local.int8_accuracy(make_config(tmp_path, "data.num_speakers=4", "partition.num_test_speakers=1",
                                           "data.utterances_per_emotion=2", "rounds=2"))
    assert 0 <= int8["uar_int8"] <= 1 and int8["uar_change"] == int8["uar_int8"] - int8["uar_float"]


def test_the_onnx_profile_counts_every_node_and_its_shares_add_up(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # wave (1, L) -> frames of 160 -> x W (160, 8) -> relu -> mean over frames -> softmax: 5 nodes, none foldable
    weights = helper.make_tensor("w", TensorProto.FLOAT, (160, 8), [0.01] * 1280)
    nodes = [helper.make_node("Reshape", ["wave", "shape"], ["frames"]),
             helper.make_node("MatMul", ["frames", "w"], ["proj"]),
             helper.make_node("Relu", ["proj"], ["act"]),
             helper.make_node("ReduceMean", ["act", "axes"], ["mean"], keepdims=0),
             helper.make_node("Softmax", ["mean"], ["probabilities"], axis=-1)]
    shape = helper.make_tensor("shape", TensorProto.INT64, (3,), [1, -1, 160])
    axes = helper.make_tensor("axes", TensorProto.INT64, (1,), [1])
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("wave", TensorProto.FLOAT, (1, None))],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, None)],
                              initializer=[weights, shape, axes])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    profile = release_profile.profile_onnx(path, seconds=0.5, calls=3)
    assert profile["nodes_exported"] == 5 and profile["nodes_run_per_call"] == 5
    assert {row["op"] for row in profile["op_types"]} == {"Reshape", "MatMul", "Relu", "ReduceMean", "Softmax"}
    assert abs(sum(row["share"] for row in profile["op_types"]) - 1) < 1e-9
    assert profile["ms_per_call"] > 0 and profile["real_time_factor"] == 0.5 / (profile["ms_per_call"] / 1e3)


@pytest.mark.slow
def test_plain_secagg_and_ckks_run_side_by_side():
    """3 devices, 2 rounds each: the costs come out, the protocols exchange as they should, and CKKS's aggregate
    equals plain aggregation's of the same clipped updates (to its 2^-20 grid)."""
    results = aggregation.aggregation_costs({"tiny": [(4, 3), (3,)]}, counts=(3,), rounds=2)["aggregation_costs"]
    costs = results["tiny"]["devices"]["3"]
    assert {k: c["exchanges_per_round"] for k, c in costs.items()} == {"plain": 1, "secagg_plus": 4, "ckks": 2}
    assert costs["ckks"]["messages_per_round"] == 3 + 1 and set(costs["ckks"]["stages"]) == {"ckks_fit",
                                                                                             "ckks_decrypt"}
    assert costs["ckks"]["max_abs_error_vs_plain"] <= 1e-5 and costs["plain"]["max_abs_error_vs_plain"] == 0
    assert costs["ckks"]["up_bytes_per_device_round"] > costs["secagg_plus"]["up_bytes_per_device_round"]
    for cost in costs.values():
        assert cost["round_s"] > 0 and cost["device_cpu_s_per_round"] > 0
    assert costs["secagg_plus"]["mod_s_per_device_round"] > 0 and costs["ckks"]["server_sum_cpu_s"] > 0
    assert len(aggregation.table_rows(results)) == 7
    beats, loses = aggregation.notes(results)[0].split("; it loses on ")
    assert "message exchanges per round (2 vs 4" in beats and "upload per device per round" in loses
