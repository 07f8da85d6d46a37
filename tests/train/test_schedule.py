import math

import pytest

from greentune.train.schedule import lr_at


def test_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 1.0, 100, 10, "cosine", 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 1.0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_at(55, 1.0, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_at(55, 2.0, 100, 10, "constant", 0.0) == 2.0


def test_jagged_restarts_drop_to_zero_and_rewarm_onto_the_envelope():
    kw = dict(
        lr=1.0, total=100, warmup=5, schedule="cosine", min_lr_ratio=0.1, restart_every=20, restart_warmup=4
    )

    def env(s):
        return lr_at(s, 1.0, 100, 5, "cosine", 0.1)

    assert lr_at(19, **kw) == pytest.approx(env(19))
    assert lr_at(20, **kw) == 0.0
    assert lr_at(22, **kw) == pytest.approx(env(22) * 0.5)
    assert lr_at(24, **kw) == pytest.approx(env(24))
    assert lr_at(40, **kw) == 0.0
