"""The privacy boundary: only the listed records, keys and kinds of value may leave a device; errors leave as fixed
public codes only, with the details in the device's local log."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitIns, FitRes, Status, ndarray_to_bytes, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fl_ser.privacy.boundary import PrivacyBoundaryError, check_reply, guard, local_log
from fl_ser.privacy.refusals import BudgetSpent, PolicyRefused
from fl_ser.protocol import PUBLIC_REASONS, PublicError

SHAPES = [(3, 4), (5,)]


def fit_reply(metrics, arrays=None, num_examples=1, status="Success"):
    res = FitRes(Status(Code.OK, status), ndarrays_to_parameters(arrays or []), num_examples, metrics)
    return compat.fitres_to_recorddict(res, keep_input=True)


def masked(shapes=SHAPES, dtype=np.int64):
    return [ndarray_to_bytes(np.array([1], dtype=np.int64))] + [ndarray_to_bytes(np.zeros(s, dtype=dtype))
                                                                  for s in shapes]


def secagg_reply(params, **fit):
    content = fit_reply({"epsilon": 3.2, "declined": 0}, **fit)
    content.config_records["secaggplus_configs"] = ConfigRecord({"masked_params": params})
    return content


def test_masked_vector_reply_passes():
    check_reply(secagg_reply(masked()), "train", "collect_masked_vectors", True, SHAPES, uniform_weight=True)


@pytest.mark.parametrize("stage,keys", [("setup", {"pk1": b"a", "pk2": b"b"}),
                                        ("share_keys", {"dsts": [1], "ctxts": [b"c"]}),
                                        ("unmask", {"nids": [1], "shares": [b"s"]})])
def test_secagg_protocol_replies_pass(stage, keys):
    check_reply(RecordDict({"secaggplus_configs": ConfigRecord(keys)}), "train", stage, True)


def test_unmasked_update_is_refused_under_secagg():
    content = fit_reply({"epsilon": 3.2}, [np.ones(3, dtype=np.float32)])
    content.config_records["secaggplus_configs"] = ConfigRecord({"masked_params": masked()})
    with pytest.raises(PrivacyBoundaryError, match="un-masked"):
        check_reply(content, "train", "collect_masked_vectors", True)


@pytest.mark.parametrize("reply,problem", [
    (secagg_reply(masked(dtype=np.float64)), "not integer"),
    (secagg_reply(masked(shapes=[(3, 4), (6,)])), "model's size"),
    (secagg_reply(masked(), num_examples=57), "num_examples"),  # a count of utterances would leave
    (secagg_reply(masked(), status="spk03: 12 files unreadable"), "free-text"),
])
def test_values_are_checked_as_well_as_names(reply, problem):
    with pytest.raises(PrivacyBoundaryError, match=problem):
        check_reply(reply, "train", "collect_masked_vectors", True, SHAPES, uniform_weight=True)


def test_metrics_must_be_finite_numbers():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(PrivacyBoundaryError, match="finite"):
            check_reply(fit_reply({"epsilon": bad}, [np.ones(3, dtype=np.float32)]), "train", None, False)
    with pytest.raises(PrivacyBoundaryError, match="declined"):
        check_reply(fit_reply({"declined": 7}, [np.ones(3, dtype=np.float32)]), "train", None, False)


def test_plain_aggregation_allows_the_update_but_not_extra_metrics_or_other_shapes():
    check_reply(fit_reply({"epsilon": 1.0}, [np.ones(s, dtype=np.float32) for s in SHAPES]), "train", None, False,
                SHAPES)
    with pytest.raises(PrivacyBoundaryError, match="train_loss"):
        check_reply(fit_reply({"train_loss": 0.3}), "train", None, False)
    with pytest.raises(PrivacyBoundaryError, match="shapes"):
        check_reply(fit_reply({}, [np.ones((74,), dtype=np.float32)]), "train", None, False, SHAPES)


def test_unlisted_records_and_message_types_are_refused():
    leaky = RecordDict({"secaggplus_configs": ConfigRecord({"pk1": b"a", "pk2": b"b"}),
                        "features": ArrayRecord([np.zeros((2, 74), dtype=np.float32)])})
    with pytest.raises(PrivacyBoundaryError, match="features"):
        check_reply(leaky, "train", "setup", True)
    with pytest.raises(PrivacyBoundaryError, match="query"):
        check_reply(RecordDict(), "query", None, True)
    with pytest.raises(PrivacyBoundaryError, match="outside the secure aggregation protocols"):
        check_reply(fit_reply({}), "train", None, True)
    ev = RecordDict({"evaluateres.metrics": ConfigRecord({"uar": 0.5, "mean_f0": 180.0}),
                     "evaluateres.loss": MetricRecord({"loss": 1.0})})
    with pytest.raises(PrivacyBoundaryError, match="mean_f0"):
        check_reply(ev, "evaluate", None, True)


# -- errors cross the boundary as fixed public codes ------------------------------------------------------------------

SECRET = "secret_take_A7.wav (utterance 03a01Fa, label 'anger', peak 0.123456)"


def train_message():
    ins = FitIns(ndarrays_to_parameters([np.zeros(s, dtype=np.float32) for s in SHAPES]), {})
    return Message(compat.fitins_to_recorddict(ins, keep_input=True), dst_node_id=1, message_type=MessageType.TRAIN)


def run_guard(handle, tmp_path):
    msg = train_message()
    return guard_message(msg, handle, tmp_path)


def guard_message(msg, handle, tmp_path):
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with local_log(tmp_path / "device.log"):
        return guard(msg, ctx, handle, secure_aggregation=lambda: False, uniform_weight=lambda: True,
                     audit_dir=lambda: None)


@pytest.mark.parametrize("raised,code", [(ValueError(SECRET), PublicError.DEVICE_FAILED),
                                         (OSError(SECRET), PublicError.DEVICE_FAILED),
                                         (BudgetSpent(SECRET), PublicError.BUDGET_SPENT),
                                         (PolicyRefused(SECRET), PublicError.POLICY_REFUSED)])
def test_an_exception_leaves_only_as_its_public_code(tmp_path, raised, code, caplog, task_identity):
    def handle():
        raise raised

    with caplog.at_level(logging.DEBUG):
        reply = run_guard(handle, tmp_path)
    assert reply.has_error() and reply.error.code == int(code) and reply.error.reason == PUBLIC_REASONS[code]
    assert SECRET in (tmp_path / "device.log").read_text()  # the details stay on the device, in its own log
    assert SECRET not in caplog.text  # and nowhere else: the device's log records do not propagate upwards


def test_an_error_reply_from_inside_and_an_out_of_boundary_reply_are_replaced(tmp_path, task_identity):
    from flwr.app import Error

    msg = train_message()
    inner_error = Message(Error(code=2, reason=SECRET), reply_to=msg)
    reply = guard_message(msg, lambda: inner_error, tmp_path)
    assert reply.error.code == int(PublicError.DEVICE_FAILED) and SECRET not in reply.error.reason
    leaky = Message(RecordDict({"features": ArrayRecord([np.zeros((2, 74), dtype=np.float32)])}), reply_to=msg)
    reply = guard_message(msg, lambda: leaky, tmp_path)
    assert reply.error.code == int(PublicError.BOUNDARY_REFUSED)
    assert SECRET in (tmp_path / "device.log").read_text()


# -- a federation in which devices fail on their own data ------------------------------------------------------------


def manifest_corpus(folder, speakers: int = 7, takes: int = 2):
    """A small corpus on disk whose file names are secrets (a leak of any of them would be visible)."""
    import soundfile as sf

    from fl_ser.data.synthetic import SyntheticCorpus

    synth = SyntheticCorpus(num_speakers=speakers, utterances_per_emotion=takes, seed=11)
    rows = ["path,speaker,emotion,sex"]
    for spk in synth.speakers:
        utts, waves, _ = synth.load_speaker(spk)
        for i, (utt, wave) in enumerate(zip(utts, waves, strict=True)):
            name = f"secret_take_{spk}_{i:02d}.wav"
            sf.write(folder / name, wave, 16000)
            rows.append(f"{name},{spk},{utt.emotion},{utt.sex}")
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    return folder / "list.csv"


@pytest.mark.slow
def test_devices_failing_on_their_own_data_leak_nothing_to_the_server(tmp_path, capfd, monkeypatch):
    """One device's recordings are all unreadable, another's feature cache is corrupt (it rebuilds it and
    trains). The run goes on, and nothing either device logged (file names, utterance ids, paths, exception
    texts) appears in anything the server saw: the replies it received, its console, its log, its run dir."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from experiments.train import run
    from fl_ser.data.corpus import corpus_from_config
    from fl_ser.data.partition import split_from_config
    from fl_ser.task import speaker_data
    from tests.conftest import make_config

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    cfg = make_config(tmp_path, "data=manifest", f"data.manifest={manifest_corpus(corpus_dir)}",
                      "partition.num_test_speakers=2", "rounds=2", "train.epochs=1")
    train = split_from_config(cfg, corpus_from_config(cfg)).train
    unreadable, corrupt = train[0], train[1]
    for path in corpus_dir.glob(f"secret_take_{unreadable}_*.wav"):
        path.write_bytes(b"RIFF" + b"\x13" * 64)
    speaker_data(cfg, corrupt)
    (cache_file,) = (tmp_path / "cache" / "features").glob("*.pt")
    cache_file.write_bytes(b"\x80not a torch file")

    received = []
    pull = InMemoryGrid.pull_messages

    def recording_pull(self, message_ids):
        replies = list(pull(self, message_ids))
        received.extend(replies)
        return replies

    monkeypatch.setattr(InMemoryGrid, "pull_messages", recording_pull)
    summary = run(cfg)
    out = capfd.readouterr()
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rounds[1:]] == [len(train) - 1] * 2  # the others trained
    assert summary["epsilon_sample_max"] > 0

    device_logs = {p.name: p.read_text() for p in Path(cfg.privacy.ledger_dir).glob("*.log")}
    failing = [text for name, text in device_logs.items() if name.startswith((unreadable, corrupt))]
    assert len(failing) == 2 and sum("failed on the device" in text for text in failing) == 1
    assert any(cache_file.name in text for text in failing)  # the rebuild is logged on the device, by name
    secrets = {"secret_take_", cache_file.name, cache_file.stem, "no usable audio"}
    for text in failing:  # every exception message the failing devices wrote down, word for word
        secrets |= {line.split("Error: ", 1)[1].strip() for line in text.splitlines() if "Error: " in line}
    secrets = {s for s in secrets if len(s) >= 8}

    errors = [m.error for m in received if m.has_error()]
    assert errors and {e.code for e in errors} <= {int(c) for c in PublicError}
    assert {e.reason for e in errors} <= set(PUBLIC_REASONS.values())
    seen = [f"{e.code} {e.reason}" for e in errors] + [repr(dict(r)) for m in received if not m.has_error()
                                                        for r in m.content.config_records.values()]
    server_files = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and "devices" not in p.parts]
    view = "\n".join([*seen, out.out, out.err, *(p.read_bytes().decode(errors="replace") for p in server_files)])
    leaked = sorted(s for s in secrets if s in view)
    assert not leaked, leaked
