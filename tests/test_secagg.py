"""SecAgg+ correctness: the securely aggregated mean equals plain aggregation of the same clipped updates.

Runs Flower's simulation engine twice over the project's real device mods (privacy boundary, SecAgg+,
fixed clipping) and server pieces (UserLevelDP with no noise, the SecAgg+ workflow as configured), with
devices whose "training" adds a fixed, known update, some larger than the clipping norm (the harness is
shared with the SecAgg+ benchmark).
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


def run_federation(secure: bool) -> list[np.ndarray]:
    from experiments.bench.federation import fixed_update_federation

    return fixed_update_federation(GLOBAL, device_update, NUM_DEVICES, "secagg_plus" if secure else "plain", rounds=1,
                                   clipping_norm=CLIP)[-1][1]


@pytest.mark.slow
def test_secagg_plus_equals_plain_aggregation_of_clipped_updates():
    updates = [clipped(device_update(p)) for p in range(NUM_DEVICES)]
    expected = [g + np.mean([u[i] for u in updates], axis=0) for i, g in enumerate(GLOBAL)]
    plain = run_federation(secure=False)
    secure = run_federation(secure=True)
    for e, p, s in zip(expected, plain, secure, strict=True):
        np.testing.assert_allclose(p, e, atol=1e-6)
        # quantisation: 2 * clipping_range / 2^22 per value, summed over devices then averaged
        np.testing.assert_allclose(s, e, atol=2 * 8.0 / 2**22 * NUM_DEVICES)
    assert not np.allclose(secure[0], GLOBAL[0])  # the round really moved the model
