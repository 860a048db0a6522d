"""Faults during a round: devices that crash or lose their reply at each stage, malformed replies, a flaky link.

Faults come from the fault-injection mod (:mod:`clients.faults`) outside each device's privacy boundary. The
per-stage and malformed-reply tests share two Flower simulations (Ray) of the SecAgg+ benchmark's federation:
five devices whose "training" adds a fixed, known update behind the project's real device mods, and the
project's server pieces (ReplyCheck around UserLevelDP, the SecAgg+ workflow as configured); each round a
different fault plan strikes, so each round's new global model can be checked against the plain mean of the
clipped updates that should be in it, and its report against who was lost where. The last round of each strikes
no device: tests/test_secagg.py checks it (conftest runs each federation once for both modules). The flaky-link
test runs the real experiment (``experiments.train``) with lossy links for 12 rounds.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from clients.faults import FaultConfigError, FaultPlan, corrupted, make_fault_mod, node_names, stage_of
from fl_ser.round_report import MALFORMED, SECAGG_STAGES, failure_cause
from tests.conftest import make_config
from tests.test_secagg import CLIP, GLOBAL, NUM_DEVICES, clipped, device_update

QUANTISATION = 2 * 8.0 / 2**22  # one quantisation step at clipping_range 8 and Flower's 2^22 levels
LOST = "4 flower: reply message unavailable"  # when=after: the device did the work, its reply was lost
CRASHED = "5 flower: node unavailable"  # when=before: the device crashed on receipt


def fault(server_round: int, stage: str, pids, when: str = "after", corrupt: str | None = None):
    """A fault-injection mod that strikes devices ``pids`` at ``stage`` of round ``server_round``, always."""
    plan = FaultPlan(drop_rate=1.0, stages=(stage,), when=when, devices=frozenset(map(str, pids)),
                     rounds=frozenset({server_round}), corrupt=corrupt)
    return make_fault_mod(lambda context: plan)


def who_is_who(folder: str):
    """A mod that writes each device's node id under its partition id (reports name node ids)."""

    def mod(msg, ctxt, call_next):
        (Path(folder) / str(ctxt.node_config["partition-id"])).write_text(str(ctxt.node_id))
        return call_next(msg, ctxt)

    return mod


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def federation(folder: Path, secure: bool, script: list) -> SimpleNamespace:
    """Run the fixed-update federation with one round per entry of ``script`` (the fault mods of that round)."""
    from experiments.bench.federation import fixed_update_federation

    records, reports = Records(), []
    loggers = [logging.getLogger(n) for n in ("flwr", "fl_ser")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        seen = fixed_update_federation(GLOBAL, device_update, NUM_DEVICES, "secagg_plus" if secure else "plain",
                                       rounds=len(script),
                                       clipping_norm=CLIP, network=[who_is_who(str(folder)), *script],
                                       reports=reports)
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    nid = {int(p.name): int(p.read_text()) for p in folder.iterdir()}
    return SimpleNamespace(models=[GLOBAL, *(arrays for _, arrays in seen)], reports=reports, nid=nid,
                           logs="\n".join(records.messages))


def check_round(run, server_round: int, survivors, atol: float) -> None:
    """The round's new global model is the last one plus the plain mean of the survivors' clipped updates."""
    before, after = run.models[server_round - 1], run.models[server_round]
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        want = np.mean([clipped(device_update(p))[i] for p in survivors], axis=0)
        np.testing.assert_allclose(a - b, want, atol=atol)


def no_fault(msg, ctxt, call_next):
    """A round in which no device is struck (the last of each script)."""
    return call_next(msg, ctxt)


# --- SecAgg+: a device lost at each stage, too many lost, malformed masked vectors -------------------------------

SECAGG_SCRIPT = [
    fault(1, "setup", [1], when="before"),
    fault(2, "share_keys", [2]),
    fault(3, "collect_masked_vectors", [3]),
    fault(4, "unmask", [4], when="before"),
    fault(5, "collect_masked_vectors", [0, 1, 2]),  # 2 of 5 left, below the threshold of 3
    fault(6, "collect_masked_vectors", [0], corrupt="wrong_length"),
    fault(7, "collect_masked_vectors", [1], corrupt="wrong_dtype"),
    fault(8, "collect_masked_vectors", [2], corrupt="nan"),
    no_fault,  # round 9: tests/test_secagg.py
]


def check_secagg_round(run, server_round: int, stage: str, lost, cause: str, survivors=None) -> dict:
    """The round aggregated the survivors (default: all but ``lost``) and reports ``lost`` at ``stage``."""
    survivors = [p for p in range(NUM_DEVICES) if p not in lost] if survivors is None else survivors
    check_round(run, server_round, survivors, atol=NUM_DEVICES * QUANTISATION)
    report = run.reports[server_round - 1]["secagg"]
    nids = [run.nid[p] for p in range(NUM_DEVICES)]
    assert report["sampled"] == sorted(nids) and report["halted_at"] is None
    assert report["dropped"] == {stage: sorted(run.nid[p] for p in lost)}
    assert report["participants"] == sorted(run.nid[p] for p in survivors)
    assert report["failure_causes"] == {cause: len(lost)}
    assert run.reports[server_round - 1]["fit"]["participants"] == report["participants"]  # ReplyCheck kept them
    return report


@pytest.mark.slow
def test_a_device_that_crashes_at_setup_is_left_out(secagg_run):
    check_secagg_round(secagg_run, 1, "setup", [1], CRASHED)


@pytest.mark.slow
def test_a_device_lost_while_sharing_keys_is_left_out(secagg_run):
    """Flower 1.42 would ask the others for key shares they never got from it (KeyError on every device):
    fl-ser's SecAggPlus prunes it after the stage, as it does for setup."""
    check_secagg_round(secagg_run, 2, "share_keys", [2], LOST)


@pytest.mark.slow
def test_a_device_whose_masked_vector_is_lost_has_its_masks_recovered(secagg_run):
    check_secagg_round(secagg_run, 3, "collect_masked_vectors", [3], LOST)


@pytest.mark.slow
def test_a_device_lost_at_unmasking_is_still_in_the_aggregate(secagg_run):
    """Its masked vector was summed; the others' shares of its private mask remove the mask."""
    check_secagg_round(secagg_run, 4, "unmask", [4], CRASHED, survivors=range(NUM_DEVICES))


@pytest.mark.slow
def test_too_many_dropouts_halt_the_round_cleanly_and_the_next_round_runs(secagg_run):
    report = secagg_run.reports[4]["secagg"]
    assert report["halted_at"] == "collect_masked_vectors" and report["participants"] == []
    assert report["dropped"] == {"collect_masked_vectors": sorted(secagg_run.nid[p] for p in (0, 1, 2))}
    for before, after in zip(secagg_run.models[4], secagg_run.models[5], strict=True):
        np.testing.assert_array_equal(after, before)  # nothing aggregated
    check_round(secagg_run, 6, [1, 2, 3, 4], atol=NUM_DEVICES * QUANTISATION)  # round 6 ran (device 0 malformed)


@pytest.mark.slow
@pytest.mark.parametrize("server_round, pid, reason", [(6, 0, "has shapes"), (7, 1, "is not integer data (float64)"),
                                                       (8, 2, "is not integer data (float64)")],
                         ids=["wrong_length", "wrong_dtype", "nan"])
def test_a_malformed_masked_vector_is_never_summed(secagg_run, server_round, pid, reason):
    report = check_secagg_round(secagg_run, server_round, "collect_masked_vectors", [pid], MALFORMED)
    nid = secagg_run.nid[pid]
    assert list(report["malformed"]) == [nid] and reason in report["malformed"][nid]
    assert all(np.isfinite(a).all() for a in secagg_run.models[server_round])
    assert f"device {nid}'s masked vector {reason}" in secagg_run.logs and "left out of this round" in secagg_run.logs


# --- plain aggregation: a lost reply and malformed updates --------------------------------------------------------

PLAIN_SCRIPT = [
    fault(1, "fit", [1], when="before"),
    fault(2, "fit", [2], corrupt="wrong_length"),
    fault(3, "fit", [3], corrupt="wrong_dtype"),
    fault(4, "fit", [4], corrupt="nan"),
    no_fault,  # round 5: tests/test_secagg.py
]


@pytest.mark.slow
@pytest.mark.parametrize("server_round, pid, reason", [
    (1, 1, None), (2, 2, "array 1 has shape (4,), the model's is (5,)"),
    (3, 3, "arrays in float16, not float32 or float64"), (4, 4, "non-finite values (NaN or infinity)")],
    ids=["lost", "wrong_length", "wrong_dtype", "nan"])
def test_plain_aggregation_drops_lost_and_malformed_updates(plain_run, server_round, pid, reason):
    check_round(plain_run, server_round, [p for p in range(NUM_DEVICES) if p != pid], atol=1e-6)
    report, nid = plain_run.reports[server_round - 1]["fit"], plain_run.nid[pid]
    assert report["sampled"] == sorted(plain_run.nid.values()) and report["dropped"] == {"fit": [nid]}
    assert report["malformed"] == ({} if reason is None else {nid: reason})
    assert report["failure_causes"] == {CRASHED if reason is None else MALFORMED: 1}
    assert sorted(report["participants"] + report["dropped"]["fit"]) == report["sampled"]
    assert all(np.isfinite(a).all() for a in plain_run.models[server_round])
    if reason is not None:
        assert f"device {nid}'s update is dropped, it does not match the global model: {reason}" in plain_run.logs


# --- the fault-injection mod itself ---------------------------------------------------------------------------------


def message(stage: str | None, server_round: int = 2) -> Message:
    """A SecAgg+ message at ``stage`` (None: a plain fit message) of ``server_round``."""
    content = RecordDict() if stage is None else RecordDict({"secaggplus_configs": ConfigRecord({"stage": stage})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN, group_id=str(server_round))


def node(pid: int) -> Context:
    return Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid}, state=RecordDict(), run_config={})


@pytest.mark.parametrize("settings, problem", [
    ({"drop_rate": 1.5}, "probability"), ({"stages": ("fit", "masked")}, "unknown stages ['masked']"),
    ({"when": "during"}, "one of ['before', 'after']"), ({"corrupt": "flip"}, "wrong_length"),
    ({"corrupt": "nan", "stages": ("setup",)}, "add collect_masked_vectors or fit")])
def test_a_fault_plan_names_what_is_wrong(settings, problem):
    with pytest.raises(FaultConfigError, match=re.escape(problem)):
        FaultPlan(**settings)


def test_faults_are_off_by_default_and_read_from_the_config(tmp_path, task_identity):
    from clients.faults import fault_mods

    assert fault_mods(make_config(tmp_path), resolve=None) == []
    cfg = make_config(tmp_path, "faults.drop_rate=1.0", "faults.stages=[unmask]", "faults.devices=[3,spk1]",
                      "faults.rounds=[2]", "faults.when=before", "faults.seed=7")
    assert FaultPlan.from_config(cfg.faults) == FaultPlan(1.0, ("unmask",), "before", frozenset({"3", "spk1"}),
                                                          frozenset({2}), None, 7)
    assert len(fault_mods(cfg, resolve=None)) == 1
    # On a SuperNode the app has no config of its own: the mod reads each run's, and finds the device by speaker.
    device_log = tmp_path / "device.log"
    (mod,) = fault_mods(None, resolve=lambda ctxt: (cfg, SimpleNamespace(speaker="spk1", log_path=str(device_log))))
    untouched = Message(RecordDict(), reply_to=message("unmask"))
    assert mod(message("unmask"), node(0), lambda msg, ctxt: untouched).error.code == 5
    assert mod(message("unmask", server_round=3), node(0), lambda msg, ctxt: untouched) is untouched
    assert "device 0/spk1 crashed on receipt of its unmask message (round 2)" in device_log.read_text()


def test_seeded_faults_repeat_exactly_and_come_at_the_drop_rate():
    plan = FaultPlan(drop_rate=0.3, seed=11)
    draws = [plan.strikes({str(d)}, r, "fit") for d in range(20) for r in range(100)]
    assert draws == [plan.strikes({str(d)}, r, "fit") for d in range(20) for r in range(100)]
    assert 0.26 < np.mean(draws) < 0.34
    unseeded = FaultPlan(drop_rate=0.3)
    assert 0.26 < np.mean([unseeded.strikes({"0"}, 1, "fit") for _ in range(2000)]) < 0.34
    assert not FaultPlan(drop_rate=1.0, stages=("unmask",)).strikes({"0"}, 1, "setup")
    assert not FaultPlan(drop_rate=1.0, devices=frozenset({"2"})).strikes({"0", "spk0"}, 1, "fit")
    assert not FaultPlan(drop_rate=1.0, rounds=frozenset({3})).strikes({"0"}, 1, "fit")


@pytest.mark.parametrize("when, code, trained", [("before", 5, False), ("after", 4, True)])
def test_a_struck_device_crashes_on_receipt_or_loses_its_reply_and_logs_it(task_identity, tmp_path, when, code,
                                                                           trained):
    device_log = tmp_path / "device.log"
    plan = FaultPlan(drop_rate=1.0, stages=("share_keys",), when=when, devices=frozenset({"1"}))
    mod = make_fault_mod(lambda ctxt: plan, lambda ctxt: (node_names(ctxt), device_log))
    handled = []

    def device(msg, ctxt):
        handled.append(ctxt.node_id)
        return Message(RecordDict(), reply_to=msg)

    reply = mod(message("share_keys"), node(1), device)
    assert reply.has_error() and reply.error.code == code and "injected fault" in reply.error.reason
    assert handled == ([101] if trained else [])
    assert f"fault injected (faults.when={when}): device 1" in device_log.read_text()
    assert not mod(message("setup"), node(1), device).has_error()  # another stage
    assert not mod(message("share_keys"), node(2), device).has_error()  # another device


def test_corrupted_updates_are_malformed_as_named():
    update = [np.ones((3, 4), dtype=np.float32), np.arange(5, dtype=np.int64)]
    assert [a.shape for a in corrupted(update, "wrong_length")] == [(3, 4), (4,)]
    assert [a.dtype for a in corrupted(update, "wrong_dtype")] == [np.float16, np.float64]
    nan = corrupted(update, "nan")
    assert np.isnan(nan[1][0]) and np.isfinite(nan[0]).all() and np.isfinite(update[1]).all()  # a copy


def test_messages_are_named_by_stage(task_identity):
    from flwr.common import EvaluateIns
    from flwr.compat.common import recorddict_compat as compat

    from fl_ser.protocol import RELEASE_ARTIFACT

    def evaluate(config):
        content = compat.evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters([]), config), keep_input=True)
        return Message(content=content, dst_node_id=7, message_type=MessageType.EVALUATE)

    assert [stage_of(message(s)) for s in SECAGG_STAGES] == list(SECAGG_STAGES)
    assert stage_of(message(None)) == "fit"
    assert stage_of(evaluate({RELEASE_ARTIFACT: b"model"})) == "release" and stage_of(evaluate({})) is None


def test_reply_check_reports_public_causes_and_unanswered_devices():
    from flwr.app import Error
    from flwr.server.strategy import FedAvg

    from fl_ser.protocol import PublicError
    from server.replies import ReplyCheck

    def proxy(nid):
        return SimpleNamespace(node_id=nid)

    def result(nid, arrays, code=Code.OK):
        return proxy(nid), FitRes(Status(code, ""), ndarrays_to_parameters(arrays), 1, {})

    class Sampling(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            return [(proxy(n), None) for n in range(1, 7)]

    check = ReplyCheck(Sampling())
    check.configure_fit(1, ndarrays_to_parameters(GLOBAL), None)
    good = [np.zeros_like(a) for a in GLOBAL]
    failures = [Exception(Error(code=int(PublicError.BUDGET_SPENT), reason=PublicError.BUDGET_SPENT.reason)),
                result(3, good, Code.FIT_NOT_IMPLEMENTED)]
    params, _ = check.aggregate_fit(1, [result(1, good), result(2, [good[0]])], failures)
    report = check.last_round
    assert report["participants"] == [1] and report["dropped"] == {"fit": [2, 3, 4, 5, 6]}
    assert report["malformed"] == {2: "1 arrays, the model has 2"}
    assert report["failure_causes"] == {"101 device declined: its privacy budget is spent": 1,
                                        "status fit_not_implemented": 1, MALFORMED: 1, "no reply": 2}  # 4-6: one error
    assert failure_cause(RuntimeError("free text, never reported")) == "RuntimeError"
    assert params is not None


def test_a_device_that_loses_the_release_reply_only_misses_its_report(tmp_path, task_identity):
    """The release is the evaluate message after the last round; a device whose reply is lost (after it stored
    the model) is missing from the reports, the others are not."""
    from experiments.bench.federation import InProcessGrid
    from fl_ser.privacy.normalization import from_config
    from fl_ser.task import get_arrays, new_classifier
    from server.release import deploy_and_collect, release_model

    cfg = make_config(tmp_path, "data.num_speakers=5", "partition.num_test_speakers=2",
                      "data.utterances_per_emotion=2", "faults.drop_rate=1.0", "faults.stages=[release]",
                      "faults.devices=[1]")
    from clients.client_app import build_client_app

    app = build_client_app(cfg)
    grid = InProcessGrid({200 + p: app for p in range(3)})
    for pid, ctxt in enumerate(grid.contexts.values()):
        ctxt.node_config.update({"num-partitions": 3, "device-dir": str(tmp_path / f"device-{pid}")})
    arrays = get_arrays(new_classifier(cfg, len(cfg.labels)))
    (tmp_path / "release").mkdir()
    release = release_model(cfg, arrays, from_config(cfg).published(), tmp_path / "release")
    reports = deploy_and_collect(grid, cfg, arrays, Path(release["dir"]), rounds=int(cfg.rounds))
    assert sorted(r["node"] for r in reports) == [200, 202]
    assert "fault injected (faults.when=after)" in (tmp_path / "device-1" / "device.log").read_text()
    stored = [json.loads((tmp_path / f"device-{p}" / "report.json").read_text())["released_version"]
              for p in range(3)]
    assert stored == [1, 1, 1]  # the lost device did store the release before its reply was lost
    meta = json.loads((tmp_path / "device-1" / "model_store" / "v0001" / "meta.json").read_text())
    sent = {p.name for p in (tmp_path / "release").iterdir() if p.name != "labels.json"}  # labels: from its own config
    assert set(meta["files"]) == sent and len(sent) >= 2  # every model format the release has, and its config.yaml


# --- a flaky link over many rounds: the real experiment -----------------------------------------------------------


@pytest.mark.slow
def test_a_flaky_link_loses_replies_but_the_federation_learns_and_accounts_for_every_device(tmp_path, monkeypatch):
    """12 SecAgg+ rounds in which every setup reply, masked vector and release reply is lost with probability
    0.2 (seeded): rounds with too few survivors halt cleanly, the others aggregate, the model learns, every
    sampled device is accounted for in every round, and each loss the devices logged is reported."""
    from experiments.train import run
    from fl_ser.flower_compat import SecAggPlus

    reports = []
    protocol = SecAggPlus.__call__

    def reporting(self, grid, context):
        protocol(self, grid, context)
        reports.append(self.round_report)

    monkeypatch.setattr(SecAggPlus, "__call__", reporting)
    cfg = make_config(tmp_path, "data.num_speakers=7", "partition.num_test_speakers=2",
                      "data.utterances_per_emotion=8", "privacy=none", "rounds=12", "faults.drop_rate=0.2",
                      "faults.stages=[setup,collect_masked_vectors,release]", "faults.seed=1")
    summary = run(cfg)
    assert summary["rounds"] == 12 and len(reports) == 12
    assert summary["uar"] > 0.35  # chance is 1/7; this federation reached ~0.69 under these faults

    logged = Counter()
    for device_log in (tmp_path / "run" / "devices").glob("*.log"):
        logged.update(re.findall(r"fault injected .* its (\w+) message", device_log.read_text()))
    before_unmask = ("setup", "share_keys", "collect_masked_vectors")
    for report in reports:
        lost = [n for s in before_unmask for n in report["dropped"].get(s, [])]
        assert len(lost) == len(set(lost)) and set(lost) <= set(report["sampled"])
        if report["halted_at"] is None:
            assert sorted(report["participants"] + lost) == report["sampled"]
            assert set(report["dropped"].get("unmask", [])) <= set(report["participants"])
        else:
            assert report["participants"] == []
        assert sum(report["failure_causes"].values()) == sum(map(len, report["dropped"].values()))
        assert set(report["failure_causes"]) <= {LOST}
    for stage in ("setup", "collect_masked_vectors"):
        assert logged[stage] == sum(len(r["dropped"].get(stage, [])) for r in reports)
    assert sum(logged.values()) > 0 and any(r["halted_at"] is None for r in reports)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    for row, report in zip(rows, reports, strict=True):  # the run's own records say the same, round by round
        assert (row["sampled"], row["participants"]) == (len(report["sampled"]), len(report["participants"]))
        assert row["dropped"] == {s: sorted(map(str, ids)) for s, ids in report["dropped"].items() if ids}
        assert row["empty"] == (report["participants"] == [])
    assert summary["empty_rounds"] == [r["round"] for r in rows if r["empty"]]
    assert summary["updates"] == sum(len(r["participants"]) for r in reports)
    assert summary["dropouts"] == {str(r["round"]): r["dropped"] for r in rows if r["dropped"]}
    assert len(summary["device_reports"]) == summary["num_devices"] - logged["release"]
