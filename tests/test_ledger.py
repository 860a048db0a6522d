"""The lifetime ledger: spent privacy survives restarts and new runs, is written before the update leaves, is never
read as "nothing spent" when damaged or missing, and cannot be spent twice by concurrent runs."""

import itertools
import json
import multiprocessing
import threading

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fl_ser.privacy.accountant import epsilon
from fl_ser.privacy.ledger import LifetimeLedger
from fl_ser.privacy.refusals import LedgerUnavailable

ROUND = [(4.5, 1.0, 3)]
IDS = [f"u{i:02d}" for i in range(10)]


def spend(ledger, ids=IDS, run="run-1", rounds=1):
    with ledger.open() as book:
        for r in range(rounds):
            book.record("training", ROUND, ids, run, r + 1)


def lifetime(ledger, ids=IDS, **kw):
    with ledger.open() as book:
        return book.epsilon(ids, 1e-5, **kw)


def test_spend_survives_a_restart_and_a_new_run(tmp_path):
    spend(LifetimeLedger(tmp_path), rounds=2)
    again = LifetimeLedger(tmp_path)  # a new process, a restarted SuperNode: only the disk remembers
    spend(again, run="run-2")
    assert lifetime(again) == pytest.approx(epsilon(ROUND * 3, 1e-5))
    assert lifetime(again, run="run-2") == pytest.approx(epsilon(ROUND, 1e-5))  # this run's share, reported too


def test_new_recordings_start_at_zero_and_old_ones_keep_their_spend(tmp_path):
    ledger = LifetimeLedger(tmp_path)
    spend(ledger, rounds=3)
    grown = [*IDS, "new01"]
    spend(ledger, ids=grown, run="run-2")
    with ledger.open() as book:
        assert book.epsilon(["new01"], 1e-5) == pytest.approx(epsilon(ROUND, 1e-5))
        assert book.epsilon(grown, 1e-5) == pytest.approx(epsilon(ROUND * 4, 1e-5))  # the worst utterance counts
        assert book.epsilon(grown, 1e-5, planned=ROUND) == pytest.approx(epsilon(ROUND * 5, 1e-5))


def test_records_are_durable_and_atomic(tmp_path):
    spend(LifetimeLedger(tmp_path))
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert len(data["events"]) == 1 and data["events"][0]["mechanisms"] == [list(ROUND[0])]
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place


@pytest.mark.parametrize("damage", ["truncate", "edit", "garbage"])
def test_a_corrupt_ledger_is_never_read_as_nothing_spent(tmp_path, damage):
    ledger = LifetimeLedger(tmp_path)
    spend(ledger)
    path = tmp_path / "ledger.json"
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "edit":  # a hand edit that "refunds" the spend: the checksum no longer matches
        data = json.loads(text)
        data["events"] = []
        path.write_text(json.dumps(data))
    else:
        path.write_bytes(b"\x00\xff" * 10)
    with pytest.raises(LedgerUnavailable, match=r"ledger.json is corrupt"):
        lifetime(ledger)


def test_a_ledger_that_went_missing_is_refused_where_the_index_remembers_it(tmp_path):
    ledger = LifetimeLedger(tmp_path, "spk03")
    spend(ledger)
    (tmp_path / "spk03.json").unlink()
    with pytest.raises(LedgerUnavailable, match=r"spk03.json is missing.*index.json records"):
        lifetime(ledger)
    other = LifetimeLedger(tmp_path, "spk04")  # a device that never trained starts a ledger as usual
    assert lifetime(other) == 0.0


def test_a_replaced_ledger_is_refused(tmp_path):
    ledger = LifetimeLedger(tmp_path)
    spend(ledger)
    fresh = LifetimeLedger(tmp_path / "elsewhere")
    lifetime(fresh)
    (tmp_path / "ledger.json").write_text((tmp_path / "elsewhere" / "ledger.json").read_text())
    with pytest.raises(LedgerUnavailable, match="replaced"):
        lifetime(ledger)


def _hold(folder, started, release):
    with LifetimeLedger(folder).open():
        started.set()
        release.wait(30)


def test_two_runs_cannot_spend_the_same_budget_at_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, started, release))
    holder.start()
    try:
        assert started.wait(30)
        with pytest.raises(LedgerUnavailable, match="in use by another run"):
            spend(LifetimeLedger(tmp_path, lock_wait_s=0.3))
    finally:
        release.set()
        holder.join(30)
    spend(LifetimeLedger(tmp_path))  # free again once the other run let go


def test_concurrent_spending_in_one_process_is_serialised(tmp_path):
    ledger = LifetimeLedger(tmp_path)
    threads = [threading.Thread(target=spend, args=(LifetimeLedger(tmp_path),), kwargs={"run": f"r{i}"})
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lifetime(ledger) == pytest.approx(epsilon(ROUND * 4, 1e-5))


# -- the device: a lifetime budget across runs, spent before the update leaves -----------------------------------------


def device_context(pid: int, run_id: int) -> Context:
    return Context(run_id=run_id, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": 5},
                   state=RecordDict(), run_config={})


def fit(cfg, ctx, params):
    from flwr.common import FitIns, ndarrays_to_parameters

    from clients.client_app import make_client

    return make_client(cfg, ctx).fit(FitIns(ndarrays_to_parameters(params), {"server_round": 1}))


def test_a_new_run_on_the_same_recordings_continues_from_the_stored_total(tmp_path):
    """Regression: the ledger lived in Flower's in-memory node state, so a restart or a second run on the same
    recordings started again at epsilon 0 and could spend the budget again."""
    from fl_ser.task import get_arrays, new_classifier
    from tests.conftest import make_config

    cfg = make_config(tmp_path, "data.num_speakers=7", "data.utterances_per_emotion=6",
                      "partition.num_test_speakers=2", "privacy.dp_sgd.epsilon_budget=2.0", "train.epochs=1",
                      f"privacy.ledger_dir={tmp_path / 'ledgers'}")
    params = get_arrays(new_classifier(cfg, len(cfg.labels)))
    spent = []
    for run_id in range(1, 20):  # every run a fresh process state (new Context), the same device disk
        cfg.run_uid = f"run-{run_id}"  # a new fl-ser run (a resumed run keeps its run_uid)
        res = fit(cfg, device_context(0, run_id), params)
        if res.metrics["declined"]:
            break
        spent.append(res.metrics)
    assert len(spent) >= 2 and res.metrics["declined"] == 1
    assert [m["epsilon_run"] for m in spent] == pytest.approx([spent[0]["epsilon_run"]] * len(spent))
    assert all(a["epsilon"] < b["epsilon"] for a, b in itertools.pairwise(spent))  # lifetime grows
    assert spent[-1]["epsilon"] <= 2.0 and res.metrics["epsilon"] == spent[-1]["epsilon"]
    assert res.metrics["epsilon_run"] == 0.0  # the declining run spent nothing


def test_a_crash_after_training_counts_as_spent(tmp_path, monkeypatch):
    """Write-ahead: the spend is on disk before the update could leave, so a crash right after training (here:
    as the device reads its trained weights) still counts."""
    import fl_ser.task
    from fl_ser.task import get_arrays, new_classifier
    from tests.conftest import make_config

    cfg = make_config(tmp_path, "data.num_speakers=7", "data.utterances_per_emotion=6",
                      "partition.num_test_speakers=2", "train.epochs=1")

    def crash(*args, **kwargs):
        raise RuntimeError("the device died after training")

    params = get_arrays(new_classifier(cfg, len(cfg.labels)))
    monkeypatch.setattr(fl_ser.task, "get_arrays", crash)
    with pytest.raises(RuntimeError, match="died"):
        fit(cfg, device_context(1, 1), params)
    (ledger_file,) = (tmp_path / "run" / "devices").glob("spk*.json")
    events = json.loads(ledger_file.read_text())["events"]
    assert [e["kind"] for e in events] == ["training"] and events[0]["mechanisms"][0][0] == 4.5
    assert np.isfinite(events[0]["mechanisms"][0][1])
