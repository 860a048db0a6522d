"""aggregation=ckks: CKKS primitives, the device's mod and boundary, and whole federations against plain aggregation."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fl_ser.privacy import ckks
from fl_ser.privacy.boundary import PrivacyBoundaryError, check_reply
from fl_ser.protocol import CKKS_CIPHERTEXTS, CKKS_KEY_ID, CKKS_RECORD, CKKS_SUM

PARAMS = ckks.CKKSParams()
GRID = 2.0 ** -20


@pytest.fixture(scope="module")
def key():
    return ckks.new_context(PARAMS)


def test_the_sum_of_encrypted_updates_is_exactly_the_sum_of_the_rounded_plaintexts(key):
    server = ckks.keyless_context(PARAMS)  # what the server holds: parameters, no key
    assert not server.has_secret_key()
    rng = np.random.default_rng(0)
    length = PARAMS.slots + 1000  # two ciphertexts
    updates = [ckks.quantise(rng.normal(0, 3, length), GRID) for _ in range(5)]
    blobs = [ckks.encrypt(key, u, PARAMS) for u in updates]
    assert all(len(b) == 2 for b in blobs)
    total = ckks.add_all([ckks.load_ciphertexts(server, b, PARAMS, length) for b in blobs])
    with pytest.raises(ValueError):
        total[0].decrypt()  # the server's context decrypts nothing
    summed = ckks.decrypt(key, ckks.load_ciphertexts(key, [v.serialize() for v in total], PARAMS, length), GRID,
                          length)
    assert np.array_equal(summed, np.sum(updates, axis=0))


def test_values_off_the_grid_are_withheld_not_released_with_their_ckks_error(key):
    vec = ckks.load_ciphertexts(key, ckks.encrypt(key, np.full(10, 0.3), PARAMS), PARAMS, 10)
    with pytest.raises(ckks.CKKSPrecisionError, match="withheld"):
        ckks.decrypt(key, vec, 2.0 ** -30, 10)
    with pytest.raises(ckks.CKKSError, match="power of two"):
        ckks.quantise(np.ones(3), 0.001)


def test_insecure_or_unusable_parameters_are_refused_with_the_fix():
    with pytest.raises(ckks.CKKSError, match="128-bit security"):
        ckks.CKKSParams(8192, (60, 60, 60, 60)).check()
    with pytest.raises(ckks.CKKSError, match="poly_modulus_degree"):
        ckks.CKKSParams(5000).check()
    with pytest.raises(ckks.CKKSError, match="exceed"):
        ckks.encrypt(ckks.new_context(PARAMS), np.array([2.0 ** 20]), PARAMS)


def test_malformed_or_foreign_ciphertexts_do_not_load(key):
    server = ckks.keyless_context(PARAMS)
    good = ckks.encrypt(key, np.zeros(10), PARAMS)
    with pytest.raises(ckks.CKKSError, match="ciphertexts, a vector"):
        ckks.load_ciphertexts(server, good * 2, PARAMS, 10)
    with pytest.raises(ckks.CKKSError, match="does not load"):
        ckks.load_ciphertexts(server, [good[0][: len(good[0]) // 2]], PARAMS, 10)
    with pytest.raises(ckks.CKKSError, match="holds 10 values"):
        ckks.load_ciphertexts(server, good, PARAMS, 11)
    other = ckks.CKKSParams(16384, (60, 40, 40, 40, 60))
    with pytest.raises(ckks.CKKSError, match="does not load"):
        ckks.load_ciphertexts(ckks.keyless_context(other), good, other, 10)


def test_key_files_are_private_never_replaced_and_checked(tmp_path, key):
    path = ckks.write_secret_context(tmp_path / "k" / "secret.key", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    ckks.write_secret_context(path, ckks.new_context(PARAMS))  # a second writer: the first key stays
    assert ckks.key_id(ckks.read_secret_context(path, PARAMS)) == ckks.key_id(key)
    with pytest.raises(ckks.CKKSError, match="other parameters"):
        ckks.read_secret_context(path, ckks.CKKSParams(16384, (60, 40, 40, 60)))
    path.chmod(0o644)
    with pytest.raises(ckks.CKKSError, match="chmod 600"):
        ckks.read_secret_context(path, PARAMS)
    with pytest.raises(ckks.CKKSError, match=r"experiments\.lab prepare"):
        ckks.read_secret_context(tmp_path / "missing.key", PARAMS)


def encrypted_reply(blobs, key_name="0123456789abcdef", arrays=()):
    content = compat.fitres_to_recorddict(FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(list(arrays)),
                                                 1, {"epsilon": 1.0, "declined": 0}), keep_input=True)
    content.config_records[CKKS_RECORD] = ConfigRecord({CKKS_CIPHERTEXTS: blobs, CKKS_KEY_ID: key_name})
    return content


def test_the_boundary_lets_only_ciphertexts_and_a_rounded_sum_leave():
    check_reply(encrypted_reply([b"ct"]), "train", "ckks_fit", True, uniform_weight=True)
    with pytest.raises(PrivacyBoundaryError, match="un-masked arrays"):
        check_reply(encrypted_reply([b"ct"], arrays=[np.ones(3, np.float32)]), "train", "ckks_fit", True)
    with pytest.raises(PrivacyBoundaryError, match="key id"):
        check_reply(encrypted_reply([b"ct"], key_name="my name is Anna!"), "train", "ckks_fit", True)
    with pytest.raises(PrivacyBoundaryError, match="list of ciphertexts"):
        check_reply(encrypted_reply([]), "train", "ckks_fit", True)
    from flwr.app import RecordDict

    def decrypted(record):
        return RecordDict({CKKS_RECORD: ConfigRecord(record)})

    check_reply(decrypted({CKKS_SUM: np.ones(4).tobytes()}), "train", "ckks_decrypt", True)
    with pytest.raises(PrivacyBoundaryError, match="finite"):
        check_reply(decrypted({CKKS_SUM: np.array([np.nan]).tobytes()}), "train", "ckks_decrypt", True)
    with pytest.raises(PrivacyBoundaryError, match="allows only"):
        check_reply(decrypted({CKKS_SUM: np.ones(4).tobytes(), "labels": "angry"}), "train", "ckks_decrypt", True)


def test_the_configured_parameters_are_the_library_defaults(tmp_path):
    from tests.conftest import make_config

    assert ckks.CKKSParams.from_config(make_config(tmp_path, "aggregation=ckks").aggregation.ckks) == PARAMS


def test_a_device_that_sends_only_encrypted_updates_accepts_ckks_and_refuses_plain(tmp_path):
    from fl_ser.privacy.policy import DevicePolicy
    from tests.conftest import make_config

    strict = DevicePolicy(secure_aggregation=True)
    assert not strict.violations(make_config(tmp_path, "aggregation=ckks", "privacy=none"))
    assert "only under SecAgg+ or CKKS" in " ".join(strict.violations(make_config(tmp_path, "aggregation=plain",
                                                                                  "privacy=none")))
    assert DevicePolicy.from_experiment(make_config(tmp_path, "aggregation=ckks"), 4).secure_aggregation


def test_the_device_refuses_to_decrypt_a_sum_of_fewer_updates_than_its_minimum(tmp_path):
    from clients.ckks_mod import required_contributors
    from tests.conftest import make_config

    assert required_contributors(make_config(tmp_path, "aggregation=ckks"), 4) == 2
    assert required_contributors(make_config(tmp_path, "aggregation=ckks", "aggregation.min_contributors=3"), 4) == 3
    # Distributed DP: the k its noise share was calibrated to (auto: all but 10 % of the cohort).
    assert required_contributors(make_config(tmp_path, "aggregation=ckks", "privacy=distributed"), 20) == 18


def ckks_round(devices: dict, init: list[np.ndarray], **workflow):
    """One CKKS round over in-process devices (node id -> mod chain) with FedAvg: new global arrays, the report."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD

    from experiments.bench.federation import InProcessGrid
    from server.ckks_aggregation import CKKSAggregation

    grid, n = InProcessGrid(devices), len(devices)
    legacy = LegacyContext(context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                           config=ServerConfig(num_rounds=1),
                           strategy=FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n,
                                           fraction_evaluate=0.0))
    for nid in devices:
        legacy.client_manager.register(GridClientProxy(nid, grid, 1))
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": 1})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ndarrays_to_parameters(init),
                                                                                      True)
    aggregation = CKKSAggregation(PARAMS, **workflow)
    aggregation(grid, legacy)
    params = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    return parameters_to_ndarrays(params), aggregation.round_report


def ckks_device(key, update: list[np.ndarray], weight: int, decrypts: bool = True):
    """A device behind fl-ser's CKKS mod that adds ``update`` to the global model and weighs ``weight``."""
    from flwr.app import Message
    from flwr.client.mod.utils import make_ffn
    from flwr.common import parameters_to_ndarrays
    from omegaconf import OmegaConf

    from clients.ckks_mod import make_ckks_mod

    cfg = OmegaConf.create({"aggregation": {"ckks": PARAMS.as_dict(), "precision_bits": 20, "min_contributors": 2},
                            "privacy": {"dp_sgd": {"enabled": False}}})

    def fit(msg, ctxt):
        params = parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, keep_input=True).parameters)
        new = ndarrays_to_parameters([p + u for p, u in zip(params, update, strict=True)])
        return Message(compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""), new, weight, {}), keep_input=False),
                       reply_to=msg)

    def failing_decrypt(msg, ctxt, call_next):  # outside the CKKS mod: this device's decryption fails
        if msg.content.config_records.get(CKKS_RECORD, {}).get("stage") == "decrypt":
            from fl_ser.privacy.boundary import public_error
            from fl_ser.protocol import PublicError

            return public_error(msg, PublicError.DEVICE_FAILED)
        return call_next(msg, ctxt)

    return make_ffn(fit, [*([] if decrypts else [failing_decrypt]), make_ckks_mod(lambda c: key, lambda c: (cfg, 4))])


def test_the_server_sums_well_formed_updates_under_the_rounds_key_and_asks_the_next_decryptor_on_failure(
        key, task_identity, monkeypatch):
    import server.ckks_aggregation as workflow

    class Drawn:  # the CSPRNG's draw, fixed for the test: the highest node ids are asked first
        def shuffle(self, items):
            items.sort(reverse=True)

    monkeypatch.setattr(workflow.secrets, "SystemRandom", Drawn)
    rng = np.random.default_rng(1)
    init = [np.zeros((3, 4), np.float32), np.zeros(4, np.float32)]
    updates = {nid: [rng.normal(size=a.shape).astype(np.float32) for a in init] for nid in (11, 12, 13, 14, 15)}
    weights = {11: 1, 12: 2, 13: 3, 14: 4, 15: 5}
    foreign = ckks.new_context(PARAMS)  # device 14 holds another federation's key
    devices = {nid: ckks_device(foreign if nid == 14 else key, updates[nid], weights[nid], decrypts=nid == 11)
               for nid in updates}

    def broken(msg, ctxt):  # device 15's ciphertexts arrive damaged
        reply = devices_15(msg, ctxt)
        if CKKS_RECORD in reply.content.config_records and CKKS_CIPHERTEXTS in reply.content.config_records[
                CKKS_RECORD]:
            record = reply.content.config_records[CKKS_RECORD]
            record[CKKS_CIPHERTEXTS] = [b[:100] for b in record[CKKS_CIPHERTEXTS]]
        return reply

    devices_15, devices[15] = devices[15], broken
    new, report = ckks_round(devices, init, decrypt_attempts=3)
    kept = (11, 12, 13)
    want = [sum(weights[n] * updates[n][i].astype(np.float64) for n in kept) / sum(weights[n] for n in kept)
            for i in range(len(init))]
    assert all(np.abs(a - w).max() < 1e-5 for a, w in zip(new, want, strict=True))
    assert report["participants"] == list(kept) and sorted(report["malformed"]) == [14, 15]
    assert "another federation's key" in report["malformed"][14]
    assert report["dropped"]["decrypt"] == [12, 13]  # asked 13, then 12, both failed; 11 decrypted


def test_a_round_with_too_few_updates_is_not_decrypted(key, task_identity):
    init = [np.zeros(4, np.float32)]
    new, report = ckks_round({1: ckks_device(key, [np.ones(4, np.float32)], 1),
                              2: ckks_device(key, [np.ones(4, np.float32)], 1)}, init, min_contributors=3)
    assert report["halted_at"] == "fit" and np.array_equal(new[0], init[0])


def run_federation(tmp_path, name: str, *overrides: str) -> tuple[dict, list[dict], np.ndarray]:
    from experiments.train import run
    from tests.conftest import make_config

    cfg = make_config(tmp_path / name, "data.num_speakers=6", "data.utterances_per_emotion=3",
                      "partition.num_test_speakers=2", "rounds=2", "release.deploy=false", *overrides)
    summary = run(cfg)
    run_dir = tmp_path / name / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = np.load(sorted((run_dir / "checkpoints").glob("round_*.npz"))[-1])
    return summary, rows, np.concatenate([final[f"arr_{i}"].ravel() for i in range(len(final.files))])


@pytest.mark.slow
def test_ckks_aggregates_what_plain_aggregation_does_and_a_device_lost_after_encrypting_is_not_in_the_sum(tmp_path):
    # The same 4 devices, no DP noise, full-batch training of the linear model (no dropout: nothing random on the
    # devices): the two federations see the same updates. Device 0's reply
    # is lost in round 2 after it trained and encrypted; both sums then hold the other three.
    lost = ("faults.drop_rate=1.0", "faults.stages=[fit]", "faults.devices=[0]", "faults.rounds=[2]", "faults.seed=0")
    same = ("privacy=none", "model=linear", *lost)
    plain, plain_rows, plain_final = run_federation(tmp_path, "plain", *same, "aggregation=plain")
    enc, rows, final = run_federation(tmp_path, "ckks", *same, "aggregation=ckks")
    assert enc["status"] == "completed" and enc["aggregation"] == "ckks"
    assert [r["participants"] for r in rows[1:]] == [4, 3] == [r["participants"] for r in plain_rows[1:]]
    assert len(rows[2]["dropped"]["fit"]) == 1
    assert np.abs(final - plain_final).max() < 1e-5  # the weighted mean, through CKKS, rounded to 2^-20
    assert enc["uar"] == pytest.approx(plain["uar"], abs=0.01) and enc["uar"] > 2 / len(enc["labels"])


@pytest.mark.slow
def test_distributed_dp_under_ckks_meets_its_target(tmp_path):
    summary, rows, _ = run_federation(tmp_path, "dist", "privacy=distributed", "model=linear", "aggregation=ckks",
                                      "privacy.dp_sgd.target_epsilon=6")
    assert summary["status"] == "completed" and [r["participants"] for r in rows[1:]] == [4, 4]
    assert 6 * 0.95 <= summary["epsilon_sample"]["this_run"] <= 6
    assert summary["distributed_dp"]["min_contributors"] == 4
