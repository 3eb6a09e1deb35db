"""generate.sample on numpy logits (the runtime's): greedy at temperature 0, draws from
softmax(logits / T) cut to the top_p nucleus, reproducible for a seed."""

from __future__ import annotations

import numpy as np

from edgectl.runtime.generate import SamplingConfig, sample

LOGITS = np.array([[0.0, 3.0, 1.0, 2.9, -1.0]], dtype=np.float32)  # [1, vocab], as forward returns


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_temperature_zero_is_argmax():
    assert sample(LOGITS, SamplingConfig()) == 1
    assert sample(LOGITS[0], SamplingConfig(temperature=0.0, top_p=0.5, seed=3), np.random.default_rng(3)) == 1
    assert sample(-LOGITS, SamplingConfig()) == 4


def test_draws_follow_the_softmax_and_repeat_for_a_seed():
    cfg = SamplingConfig(temperature=0.7)
    draws = [sample(LOGITS, cfg, rng) for rng in [np.random.default_rng(5)] for _ in range(4000)]
    again = [sample(LOGITS, cfg, rng) for rng in [np.random.default_rng(5)] for _ in range(4000)]
    other = [sample(LOGITS, cfg, rng) for rng in [np.random.default_rng(6)] for _ in range(4000)]
    assert draws == again and draws != other
    freq = np.bincount(draws, minlength=LOGITS.shape[1]) / len(draws)
    np.testing.assert_allclose(freq, _softmax(LOGITS[0].astype(np.float64) / 0.7), atol=0.03)


def test_top_p_keeps_only_the_nucleus():
    # at T=0.7: p = 0.52 (token 1), 0.45 (3), 0.03 (2), ...: the first two reach 0.9
    p = _softmax(LOGITS[0].astype(np.float64) / 0.7)
    assert p[1] + p[3] >= 0.9 > p[1]
    rng = np.random.default_rng(0)
    draws = {sample(LOGITS, SamplingConfig(0.7, top_p=0.9), rng) for _ in range(2000)}
    assert draws == {1, 3}
    # a nucleus below the top token's probability is the top token alone
    assert {sample(LOGITS, SamplingConfig(0.7, top_p=0.01), rng) for _ in range(200)} == {1}
