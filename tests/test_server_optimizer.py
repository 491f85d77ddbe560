"""The coordinator's server optimiser: what it does with a block's aggregated mean update
(post-processing of what secure aggregation releases, no privacy cost)."""

from __future__ import annotations

import numpy as np
import pytest

from blossom_secure.coordinator.rounds import ServerOptimizer


def test_fedavg_is_the_plain_sum_bit_for_bit():
    rng = np.random.default_rng(3)  # test data, not secret
    value, delta = rng.normal(size=50).astype(np.float32), rng.normal(size=50).astype(np.float32) * 1e-3
    out = ServerOptimizer().step("fusion", value, delta)
    assert out.dtype == np.float32 and np.array_equal(out, (value + delta).astype(np.float32))


def test_momentum_by_hand():
    """v1 = 0.1; v2 = 0.9 * 0.1 + 0.2 = 0.29; x = 1 + 0.5 * 0.1 + 0.5 * 0.29 = 1.195."""
    opt = ServerOptimizer("momentum", lr=0.5, beta1=0.9)
    x = opt.step("b", np.array([1.0], np.float32), np.array([0.1], np.float32))
    x = opt.step("b", x, np.array([0.2], np.float32))
    assert x == pytest.approx([1.195], abs=1e-6)
    other = opt.step("c", np.array([0.0], np.float32), np.array([0.2], np.float32))  # per-block state
    assert other == pytest.approx([0.1], abs=1e-7)


def test_adam_by_hand():
    """m = 0.1 * 0.2 = 0.02; s = 0.01 * 0.04 = 0.0004; x = 0 + 0.1 * 0.02 / (0.02 + 0.001)."""
    opt = ServerOptimizer("adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = opt.step("b", np.array([0.0], np.float32), np.array([0.2], np.float32))
    assert x == pytest.approx([0.1 * 0.02 / (0.02 + 0.001)], rel=1e-6)


@pytest.mark.parametrize("kwargs", [dict(kind="nesterov"), dict(lr=0.0), dict(kind="momentum", beta1=1.0),
                                    dict(kind="adam", tau=0.0), dict(kind="adam", beta2=-0.1)])
def test_bad_terms_refused(kwargs):
    with pytest.raises(ValueError):
        ServerOptimizer(**kwargs)
