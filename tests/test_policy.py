"""The device enforces its own privacy policy: requests weaker than it are refused, nothing is sent, the reason is
logged on the device only."""

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fl_ser.privacy.policy import DevicePolicy, clip_update
from fl_ser.privacy.refusals import PolicyRefused
from fl_ser.protocol import KEY_CLIPPING_NORM, KEY_DEVICE_NOISE_STD, PublicError
from tests.conftest import make_config

SMALL = ["data.num_speakers=7", "data.utterances_per_emotion=6", "partition.num_test_speakers=2", "train.epochs=1"]
DISTRIBUTED = ["privacy.user_level.noise_multiplier=0.5", "privacy.user_level.placement=distributed"]


def test_the_policy_is_the_experiment_unless_the_device_says_more(tmp_path):
    cfg = make_config(tmp_path, *SMALL, *DISTRIBUTED)
    policy = DevicePolicy.from_experiment(cfg, cohort=5)
    assert policy.epsilon_budget == 10.0 and policy.min_noise_multiplier == 4.5 and policy.max_update_norm == 4.0
    assert policy.secure_aggregation and policy.min_cohort == 5 and policy.min_user_noise_multiplier == 0.5
    assert policy.violations(cfg) == []
    file = tmp_path / "privacy_policy.yaml"
    file.write_text("min_noise_multiplier: 6.0\nmax_update_norm: 1.0\nepsilon_budget: 3.0\n")
    strict = DevicePolicy.from_file(file, policy)
    assert strict.min_cohort == 5  # unset settings default to the experiment's
    problems = " | ".join(strict.violations(cfg))
    assert "noise_multiplier 4.5 < the device's minimum 6.0" in problems and "clipping norm 4.0 >" in problems
    file.write_text("min_noise: 6.0\n")
    with pytest.raises(PolicyRefused, match="unknown settings"):
        DevicePolicy.from_file(file, policy)


def test_round_requests_are_checked_against_the_policy():
    policy = DevicePolicy(max_update_norm=4.0, min_user_noise_multiplier=0.5, min_cohort=4)
    assert policy.clipping_norm(2.0) == 2.0  # a smaller norm is stronger: used as asked
    assert policy.clipping_norm(None) == 4.0  # none sent: the device clips to its own
    with pytest.raises(PolicyRefused, match="above the device's maximum"):
        policy.clipping_norm(400.0)
    assert policy.noise_std(0.5 * 4.0 / 2, 4.0) == pytest.approx(1.0)
    for weak in (0.0, None, 0.3):
        with pytest.raises(PolicyRefused, match="noise share"):
            policy.noise_std(weak, 4.0)
    with pytest.raises(PolicyRefused, match="cohort of 3"):
        policy.check_secagg_setup({"sample_num": 3, "share_num": 3, "threshold": 2})
    with pytest.raises(PolicyRefused, match="not above half"):
        policy.check_secagg_setup({"sample_num": 9, "share_num": 9, "threshold": 4})
    policy.check_secagg_setup({"sample_num": 9, "share_num": 9, "threshold": 5})


def test_clipping_bounds_the_whole_update():
    old = [np.zeros((3, 4), np.float32), np.zeros(5, np.float32)]
    new = [np.full((3, 4), 2.0, np.float32), np.full(5, -2.0, np.float32)]
    clipped = clip_update(new, old, 1.0)
    assert np.sqrt(sum(float((c**2).sum()) for c in clipped)) == pytest.approx(1.0, rel=1e-6)
    assert all(c.dtype == np.float32 for c in clipped)
    small = [o + 0.01 for o in old]
    assert all(np.array_equal(a, b) for a, b in zip(clip_update(small, old, 1.0), small, strict=True))


def plain_train(params, config):
    ins = FitIns(ndarrays_to_parameters(params), config)
    return Message(compat.fitins_to_recorddict(ins, keep_input=True), dst_node_id=1, message_type=MessageType.TRAIN)


def device(cfg, node_config):
    from clients.client_app import build_client_app

    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    return build_client_app(cfg), ctx


@pytest.mark.usefixtures("task_identity")
def test_a_server_asking_for_a_larger_norm_and_no_noise_gets_nothing(tmp_path):
    """Regression: Flower's fixedclipping_mod clipped to whatever norm the server sent, and the distributed noise
    mod added whatever std it sent, so a server sending a huge norm and std 0 got raw contributions."""
    from fl_ser.task import get_arrays, new_classifier

    cfg = make_config(tmp_path, *SMALL, *DISTRIBUTED, "aggregation=plain")
    app, ctx = device(cfg, {"partition-id": 0, "num-partitions": 5})
    params = get_arrays(new_classifier(cfg, len(cfg.labels)))
    honest = {"server_round": 1, KEY_CLIPPING_NORM: 4.0, KEY_DEVICE_NOISE_STD: 0.5 * 4.0 / np.sqrt(5)}
    reply = app(plain_train(params, honest), ctx)
    assert not reply.has_error()
    sent = compat.recorddict_to_fitres(reply.content, keep_input=True)
    from flwr.common import parameters_to_ndarrays

    update = [a - p for a, p in zip(parameters_to_ndarrays(sent.parameters), params, strict=True)]
    assert np.sqrt(sum(float((u**2).sum()) for u in update)) > 0  # trained, clipped, noised: something left
    for greedy in ({**honest, KEY_CLIPPING_NORM: 400.0}, {**honest, KEY_DEVICE_NOISE_STD: 0.0},
                   {**honest, KEY_CLIPPING_NORM: 400.0, KEY_DEVICE_NOISE_STD: 0.0}):
        reply = app(plain_train(params, greedy), ctx)
        assert reply.has_error() and reply.error.code == int(PublicError.POLICY_REFUSED)
    log = next(Path(cfg.privacy.ledger_dir).glob("*.log")).read_text()
    assert "above the device's maximum 4.0" in log and "noise share of std 0.0" in log
    (ledger,) = Path(cfg.privacy.ledger_dir).glob("spk*.json")
    assert len(json.loads(ledger.read_text())["events"]) == 1  # refused requests trained nothing, spent nothing


@pytest.mark.usefixtures("task_identity")
def test_a_device_policy_file_outranks_a_weaker_experiment(tmp_path):
    from fl_ser.task import get_arrays, new_classifier

    cfg = make_config(tmp_path, *SMALL, "aggregation=plain")
    device_dir = tmp_path / "device"
    device_dir.mkdir()
    (device_dir / "privacy_policy.yaml").write_text("min_noise_multiplier: 8.0\nsecure_aggregation: true\n")
    app, ctx = device(cfg, {"partition-id": 0, "num-partitions": 5, "device-dir": str(device_dir)})
    reply = app(plain_train(get_arrays(new_classifier(cfg, len(cfg.labels))), {"server_round": 1,
                                                                                KEY_CLIPPING_NORM: 4.0}), ctx)
    assert reply.error.code == int(PublicError.POLICY_REFUSED)
    log = (device_dir / "device.log").read_text()
    assert "noise_multiplier 4.5 < the device's minimum 8.0" in log and "only under SecAgg+" in log


@pytest.mark.usefixtures("task_identity")
def test_secagg_setup_with_a_small_cohort_or_low_threshold_is_refused(tmp_path):
    cfg = make_config(tmp_path, *SMALL)
    app, ctx = device(cfg, {"partition-id": 0, "num-partitions": 5})
    for sample, threshold in ((3, 2), (5, 2)):
        setup = {"stage": "setup", "sample_num": sample, "share_num": sample, "threshold": threshold,
                 "clipping_range": 8.0, "target_range": 1 << 22, "mod_range": 1 << 32, "max_weight": 1.0}
        msg = Message(RecordDict({"secaggplus_configs": ConfigRecord(setup)}), dst_node_id=1,
                      message_type=MessageType.TRAIN)
        reply = app(msg, ctx)
        assert reply.error.code == int(PublicError.POLICY_REFUSED), (sample, threshold)


@pytest.mark.slow
def test_a_tampering_server_in_a_federation_learns_nothing(tmp_path, monkeypatch):
    """The federation test of the same: a ServerApp that sends every device a norm 100x the experiment's and no
    noise share. Every device refuses; no update is aggregated; no device spends privacy."""
    from experiments.train import RunFailed, run
    from server.user_dp import UserLevelDP

    configure = UserLevelDP.configure_fit

    def greedy(self, server_round, parameters, client_manager):
        instructions = configure(self, server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config.update({KEY_CLIPPING_NORM: 100 * self.clipping_norm, KEY_DEVICE_NOISE_STD: 0.0})
        return instructions

    monkeypatch.setattr(UserLevelDP, "configure_fit", greedy)  # the server runs in this process
    cfg = make_config(tmp_path, *SMALL, *DISTRIBUTED, "rounds=2", "release.deploy=false")
    with pytest.raises(RunFailed, match="untrained after 2 of 2 rounds"):  # never a 'done' line for no model
        run(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rounds] == [0, 0, 0] and summary["empty_rounds"] == [1, 2]
    assert summary["epsilon_sample_max"] is None and "release" not in summary  # no device trained, nothing released
    logs = " ".join(p.read_text() for p in Path(cfg.privacy.ledger_dir).glob("*.log"))
    assert "above the device's maximum 4.0" in logs


@pytest.mark.parametrize("cohort", [2, 3, 4, 5, 6, 10, 33, 100])
def test_the_servers_secagg_threshold_is_one_devices_accept(tmp_path, cohort):
    """Flower rounds 0.6 x 4 shares down to 2 (half), which a device's policy refuses; the server asks for more."""
    from server.secure_aggregation import secagg_workflow

    cfg = make_config(tmp_path, *SMALL)
    workflow = secagg_workflow(cfg, cohort)
    shares = cohort if workflow.num_shares == 1.0 else workflow.num_shares
    threshold = workflow.reconstruction_threshold
    threshold = round(threshold * shares) if isinstance(threshold, float) else threshold
    DevicePolicy(min_cohort=2).check_secagg_setup({"sample_num": cohort, "share_num": shares, "threshold": threshold})
    assert threshold <= shares


def test_the_light_secagg_stages_import_no_torch(tmp_path):
    """Every Deployment-Engine message is a fresh ClientApp process: the boundary, the policy guard and SecAgg+'s
    setup stage must not import torch (about 8 s of CPU), only the training stage may."""
    import subprocess
    import sys

    from fl_ser.run_config import encode
    from tests.conftest import REPO

    cfg = make_config(tmp_path, *SMALL)
    (tmp_path / "cfg.json").write_text(encode(cfg))
    script = f"""
import sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity
from clients.client_app import build_client_app
from fl_ser.run_config import decode
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
cfg = decode(open({str(tmp_path / "cfg.json")!r}).read())
setup = dict(stage="setup", sample_num=5, share_num=5, threshold=3, clipping_range=8.0, target_range=1 << 22,
             mod_range=1 << 32, max_weight=1.0, **{{"fl-ser.mask_scheme": "hkdf-sha256+chacha20/v1"}})
msg = Message(RecordDict({{"secaggplus_configs": ConfigRecord(setup)}}), dst_node_id=1, message_type=MessageType.TRAIN)
ctx = Context(run_id=1, node_id=1, node_config={{"partition-id": 0, "num-partitions": 5}}, state=RecordDict(),
              run_config={{}})
reply = build_client_app(cfg)(msg, ctx)
assert not reply.has_error(), reply.error
print("torch" in sys.modules, "opacus" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
