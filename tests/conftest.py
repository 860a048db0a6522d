"""Shared test helpers: a resolved experiment config from Hydra overrides, and the EmoDB location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning; we use no GPU
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one compute thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
EMODB = REPO.parent / "shared" / "datasets" / "emodb"


#: The local-DP-SGD experiment most tests exercise (fl-ser's defaults before privacy=distributed became the default):
#: each applies unless a test chooses that key itself. The distributed default has its own tests.
#: release.formats: a run's release is TorchScript only unless a test asks for the other formats (their export and
#: checks take ~25 s; tests/test_release_formats.py and the main job's e2e test check them).
LOCAL_STACK = ("privacy=full", "model=mlp", "rounds=20", "release.formats=[torchscript]")
#: The override for a test that checks every release format.
ALL_FORMATS = "release.formats=[onnx,pt2,torchscript]"


def local_stack(overrides) -> list[str]:
    """:data:`LOCAL_STACK`'s settings that ``overrides`` do not choose themselves."""
    from experiments.train import override_key

    chosen = {override_key(o) for o in overrides}
    return [o for o in LOCAL_STACK if override_key(o) not in chosen]


def make_config(tmp_path: Path, *overrides: str) -> DictConfig:
    """Compose conf/config.yaml with overrides (over :data:`LOCAL_STACK`), resolved, with labels filled in (as
    experiments.train does)."""
    from experiments.train import prepare

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                                           *local_stack(overrides), *overrides])
    return prepare(OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)))


needs_emodb = pytest.mark.skipif(not EMODB.exists(), reason=f"EmoDB not found at {EMODB}")


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> str:
    """One feature cache for the audit's tests: they build many configs over the same small corpora, and
    features are keyed by everything they depend on, so sharing them changes nothing but the time."""
    return str(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="session")
def secagg_run(tmp_path_factory):
    """tests/test_faults.py's SecAgg+ federation (a fault plan per round, the last round none), run once for its
    tests and tests/test_secagg.py's: one Flower simulation (Ray) instead of two."""
    from tests.test_faults import SECAGG_SCRIPT, federation

    return federation(tmp_path_factory.mktemp("secagg"), True, SECAGG_SCRIPT)


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory):
    """The same with plain aggregation (tests/test_faults.py's PLAIN_SCRIPT)."""
    from tests.test_faults import PLAIN_SCRIPT, federation

    return federation(tmp_path_factory.mktemp("plain"), False, PLAIN_SCRIPT)


@pytest.fixture(scope="module")
def one_torch_thread():
    """On-device work is single-threaded; one utterance is too small to share, and threads contend on a busy box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def task_identity():
    """Flower's Message constructor reads the running task's identity (set by Flower's runtimes)."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before
