"""The privacy boundary: only the listed records and keys may leave a device; anything else is refused."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fl_ser.privacy.boundary import PrivacyBoundaryError, check_reply


def fit_reply(metrics, arrays=None):
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays or []), 1, metrics)
    return compat.fitres_to_recorddict(res, keep_input=True)


def test_masked_vector_reply_passes():
    content = fit_reply({"epsilon": 3.2, "declined": 0})
    content.config_records["secaggplus_configs"] = ConfigRecord({"masked_params": [b"\x00\x01"]})
    check_reply(content, "train", "collect_masked_vectors", secure_aggregation=True)


@pytest.mark.parametrize("stage,keys", [("setup", {"pk1": b"a", "pk2": b"b"}),
                                        ("share_keys", {"dsts": [1], "ctxts": [b"c"]}),
                                        ("unmask", {"nids": [1], "shares": [b"s"]})])
def test_secagg_protocol_replies_pass(stage, keys):
    check_reply(RecordDict({"secaggplus_configs": ConfigRecord(keys)}), "train", stage, True)


def test_unmasked_update_is_refused_under_secagg():
    content = fit_reply({"epsilon": 3.2}, [np.ones(3, dtype=np.float32)])
    content.config_records["secaggplus_configs"] = ConfigRecord({"masked_params": [b"\x00"]})
    with pytest.raises(PrivacyBoundaryError, match="un-masked"):
        check_reply(content, "train", "collect_masked_vectors", True)


def test_plain_aggregation_allows_the_update_but_not_extra_metrics():
    check_reply(fit_reply({"epsilon": 1.0}, [np.ones(3, dtype=np.float32)]), "train", None, False)
    with pytest.raises(PrivacyBoundaryError, match="train_loss"):
        check_reply(fit_reply({"train_loss": 0.3}), "train", None, False)


def test_unlisted_records_and_message_types_are_refused():
    leaky = RecordDict({"secaggplus_configs": ConfigRecord({"pk1": b"a", "pk2": b"b"}),
                        "features": ArrayRecord([np.zeros((2, 74), dtype=np.float32)])})
    with pytest.raises(PrivacyBoundaryError, match="features"):
        check_reply(leaky, "train", "setup", True)
    with pytest.raises(PrivacyBoundaryError, match="query"):
        check_reply(RecordDict(), "query", None, True)
    with pytest.raises(PrivacyBoundaryError, match="outside the SecAgg"):
        check_reply(fit_reply({}), "train", None, True)
    ev = RecordDict({"evaluateres.metrics": ConfigRecord({"uar": 0.5, "mean_f0": 180.0}),
                     "evaluateres.loss": MetricRecord({"loss": 1.0})})
    with pytest.raises(PrivacyBoundaryError, match="mean_f0"):
        check_reply(ev, "evaluate", None, True)
