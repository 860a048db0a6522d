"""SecAgg+ correctness: the securely aggregated mean equals plain aggregation of the same clipped updates.

Flower's simulation engine, run twice over the project's real device mods (privacy boundary, SecAgg+,
fixed clipping) and server pieces (UserLevelDP with no noise, the SecAgg+ workflow as configured), with
devices whose "training" adds a fixed, known update, some larger than the clipping norm (the harness is
shared with the SecAgg+ benchmark). The two runs are tests/test_faults.py's federations (conftest's
``secagg_run`` and ``plain_run``, one simulation each for both modules); their last round strikes no device.
"""

import numpy as np
import pytest

NUM_DEVICES = 5
CLIP = 1.0
GLOBAL = [np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), np.full(5, 0.5, dtype=np.float32)]


def device_update(pid: int) -> list[np.ndarray]:
    rng = np.random.default_rng(pid)
    scale = 3.0 if pid % 2 else 0.2  # odd devices exceed the clipping norm
    return [rng.normal(0, scale / 4, a.shape).astype(np.float32) for a in GLOBAL]


def clipped(update):
    norm = np.sqrt(sum(float((u**2).sum()) for u in update))
    return [u * min(1.0, CLIP / norm) for u in update]


def last_step(run) -> list[np.ndarray]:
    """What the federation's last round added to the global model."""
    return [after - before for before, after in zip(run.models[-2], run.models[-1], strict=True)]


@pytest.mark.slow
def test_secagg_plus_equals_plain_aggregation_of_clipped_updates(secagg_run, plain_run):
    updates = [clipped(device_update(p)) for p in range(NUM_DEVICES)]
    expected = [np.mean([u[i] for u in updates], axis=0) for i in range(len(GLOBAL))]
    assert [len(r["fit"]["participants"]) for r in (secagg_run.reports[-1], plain_run.reports[-1])] == [NUM_DEVICES] * 2
    plain = last_step(plain_run)
    secure = last_step(secagg_run)
    for e, p, s in zip(expected, plain, secure, strict=True):
        np.testing.assert_allclose(p, e, atol=1e-6)
        # quantisation: 2 * clipping_range / 2^22 per value, summed over devices then averaged
        np.testing.assert_allclose(s, e, atol=2 * 8.0 / 2**22 * NUM_DEVICES)
    assert not np.allclose(secagg_run.models[-1][0], secagg_run.models[-2][0])  # the round really moved the model
