"""The poisoning audit (experiments/audit/poisoning.py) on a tiny synthetic federation: attacks bite, robust
aggregation resists, unmet assumptions are reported, the figure is written."""

from __future__ import annotations

import json

import pytest

from experiments.audit.poisoning import plot_poisoning, poisoning_audit
from tests.conftest import make_config

# the audited models are tiny: one intra-op thread is ~10x faster than two that contend (conftest)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ("model=linear", "data.num_speakers=8", "partition.num_test_speakers=2", "data.utterances_per_emotion=6")


@pytest.fixture(scope="module")
def result(tmp_path_factory, feature_cache):
    tmp = tmp_path_factory.mktemp("poisoning")
    clean = make_config(tmp, "privacy=none", *SMALL, f"cache_dir={feature_cache}")
    private = make_config(tmp, "privacy=full", *SMALL, f"cache_dir={feature_cache}")
    return poisoning_audit(clean, private, ks=(0, 1), rounds=4, defences=("none", "median", "bulyan"),
                           progress=lambda _: None)


def cell(result, attack, k, defence):
    (row,) = [r for r in result["rows"] if (r["attack"], r["k"], r["defence"]) == (attack, k, defence)]
    return row


def test_scaled_update_breaks_fedavg(result):
    assert cell(result, "scaled", 1, "none")["uar"] < cell(result, "scaled", 0, "none")["uar"] - 0.3


def test_median_resists_scaled_update(result):
    baseline = cell(result, "scaled", 1, "none")["uar"]
    assert cell(result, "scaled", 1, "median")["uar"] > baseline + 0.3


def test_bulyan_with_too_few_devices_is_not_applicable(result):
    row = cell(result, "scaled", 1, "bulyan")
    assert not row["applicable"] and row["uar"] is None and "4k + 3" in row["reason"]
    assert cell(result, "scaled", 0, "bulyan")["applicable"]


def test_backdoor_succeeds_without_defence(result):
    assert cell(result, "backdoor", 1, "none")["backdoor_success"] > cell(result, "backdoor", 0, "none")[
        "backdoor_success"] + 0.3
    assert cell(result, "label_flip", 1, "none")["backdoor_success"] is None


def test_result_is_json_and_plots(result, tmp_path):
    json.dumps(result)
    assert "SecAgg+" in result["secagg_note"]
    plot_poisoning(result, tmp_path / "poisoning.png")
    assert (tmp_path / "poisoning.png").stat().st_size > 0
