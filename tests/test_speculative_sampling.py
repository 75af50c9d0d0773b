"""Speculative sampling on a tiny vocabulary: what verify emits follows the target's distribution."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qwen3.sample import make_sampler, verify

V = 8
# the target's logits at three positions; with temperature 0.8, top-k 6 and top-p 0.95 each keeps 4-5 tokens
TARGET = mx.array([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0],
                   [0.0, -1.0, 2.0, 1.0, 1.5, -2.0, 0.5, 0.2],
                   [1.0, 1.0, -1.0, 2.0, 0.0, 0.3, -0.5, 0.8]])
# a draft far from the target at position 0 (total variation 0.74), mass on tokens the target filters out
FAR = np.array([-1.0, 0.0, 0.5, 1.5, 2.0, 0.0, 0.5, 1.0])
# 0.999 quantiles of chi-square by degrees of freedom: the test fails by chance once in a thousand seeds
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def target_sampler(seed: int):
    return make_sampler(0.8, top_p=0.95, top_k=6, seed=seed)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def assert_follows(tokens: list, p: np.ndarray):
    """The draws `tokens` come from p: none outside its support, and a chi-square test on it."""
    counts = np.bincount(np.array(tokens, dtype=np.int64), minlength=len(p))
    support = p > 0
    assert counts[~support].sum() == 0, f"drew tokens the target gives no mass: {counts}"
    expected = p[support] * len(tokens)
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_999[int(support.sum()) - 1], f"counts {counts} vs expected {np.round(p * len(tokens))}"


def test_probs_is_the_distribution_the_sampler_draws_from():
    logits = TARGET[:1]
    for kwargs in [dict(), dict(top_k=3), dict(top_p=0.7), dict(min_p=0.2), dict(top_k=6, top_p=0.95)]:
        sampler = make_sampler(0.8, seed=1, **kwargs)
        p = np.array(sampler.probs(logits))[0]
        assert p.dtype == np.float32 and p.shape == (V,) and abs(p.sum() - 1) < 1e-5
        draws = sampler(mx.broadcast_to(logits, (4000, V))).tolist()  # 4000 independent rows in one call
        assert_follows(draws, p)
    assert (np.array(make_sampler(0.8, top_k=3).probs(logits))[0] > 0).sum() == 3


def test_greedy_probs_is_one_hot_at_the_argmax():
    sampler = make_sampler(0.0)
    assert sampler.greedy and not make_sampler(0.5).greedy
    p = np.array(sampler.probs(TARGET))
    assert (p.sum(axis=-1) == 1).all() and (p.max(axis=-1) == 1).all()
    assert p.argmax(axis=-1).tolist() == [0, 2, 3] == sampler(TARGET).tolist()


def test_seeded_sampler_draws_the_same_tokens_as_before_it_was_a_class():
    # drawn by the closure make_sampler returned before Sampler: a seeded request keeps its text
    logits = mx.sin(mx.arange(24).reshape(2, 12) * 1.7) * 3
    before = {(1.0, 1.0, 0, 0.0): [[5, 8], [8, 0], [8, 4], [1, 0], [5, 7], [5, 4], [1, 0], [1, 7]],
              (0.7, 1.0, 5, 0.0): [[1, 7], [8, 11], [1, 0], [1, 11], [1, 11], [1, 11], [8, 0], [1, 11]],
              (1.3, 0.8, 0, 0.0): [[4, 7], [8, 7], [8, 4], [1, 0], [5, 7], [5, 4], [1, 11], [1, 7]],
              (0.9, 0.9, 6, 0.05): [[8, 11], [1, 0], [1, 11], [8, 4], [5, 0], [1, 11], [1, 4], [1, 0]]}
    for (temperature, top_p, top_k, min_p), tokens in before.items():
        sampler = make_sampler(temperature, top_p, top_k, min_p, seed=11)
        assert [sampler(logits).tolist() for _ in tokens] == tokens


def speculate(n: int, k: int, q: np.ndarray, seed: int = 0) -> list:
    """n verify runs on TARGET[:k + 1], each with k drafts drawn from q (k, V): what each emits."""
    sampler, rng = target_sampler(seed), np.random.default_rng(seed)
    drafts = np.stack([rng.choice(V, size=n, p=q[j]) for j in range(k)], axis=1).tolist()
    logits, q = TARGET[:k + 1], mx.array(q, dtype=mx.float32)
    runs = []
    for row in drafts:
        accepted, token = verify(sampler, logits, row, q)
        runs.append(row[:accepted] + [token])
    return runs


def test_first_token_follows_the_target_when_the_draft_is_far_from_it():
    # accepting every draft would give q (chi-square ~10^4); resampling from p instead of max(0, p - q) gives
    # a distribution 0.13 away in total variation (chi-square ~10^2): both fail here
    q = softmax(FAR)[None]
    runs = speculate(3000, 1, q)
    assert_follows([run[0] for run in runs], np.array(target_sampler(0).probs(TARGET))[0])
    accepted = sum(len(run) == 2 for run in runs) / len(runs)
    expected = np.minimum(np.array(target_sampler(0).probs(TARGET))[0], q[0]).sum()  # 0.26
    assert abs(accepted - expected) < 0.03


def test_later_tokens_follow_the_target_after_accepted_drafts():
    p = np.array(target_sampler(0).probs(TARGET))
    q = 0.5 * softmax(np.stack([FAR, FAR[::-1]])) + 0.5 * p[:2]  # a draft that agrees half of the time
    runs = speculate(3000, 2, q, seed=1)
    assert_follows([run[0] for run in runs], p[0])
    assert_follows([run[1] for run in runs if len(run) >= 2], p[1])  # the first draft accepted
    bonus = [run[2] for run in runs if len(run) == 3]  # both accepted: the token after them
    assert len(bonus) > 500
    assert_follows(bonus, p[2])


@pytest.mark.parametrize("draft", [0, 2, 6])  # the likeliest token (0.49), a mid one (0.14), one filtered out
def test_first_token_follows_the_target_with_a_point_mass_draft(draft):
    # resampling from p without removing the draft would put 0.74 on token 0 for draft 0 (p: 0.49)
    sampler, logits = target_sampler(draft), TARGET[:2]
    runs = []
    for _ in range(2000):
        accepted, token = verify(sampler, logits, [draft])
        runs.append(([draft] if accepted else []) + [token])
    p = np.array(sampler.probs(TARGET))
    assert_follows([run[0] for run in runs], p[0])
    if p[0, draft] > 0:
        assert_follows([run[1] for run in runs if len(run) == 2], p[1])
    else:  # a draft the target cannot draw is never accepted
        assert all(len(run) == 1 for run in runs)


def test_no_drafts_is_a_draw_from_the_target():
    sampler, logits = target_sampler(5), TARGET[:1]
    draws = []
    for _ in range(2000):
        accepted, token = verify(sampler, logits, [])
        assert accepted == 0
        draws.append(token)
    assert_follows(draws, np.array(sampler.probs(TARGET))[0])


def test_seeded_verify_is_reproducible():
    q = mx.array(softmax(np.stack([FAR, FAR])), dtype=mx.float32)
    a, b = target_sampler(3), target_sampler(3)
    runs = [[verify(s, TARGET, [3, 4], q) for _ in range(20)] for s in (a, b)]
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_greedy_accepts_the_longest_matching_prefix_then_the_argmax():
    greedy = make_sampler(0.0)
    best = [0, 2, 3]  # TARGET's argmax at each position
    assert verify(greedy, TARGET, [0, 2]) == (2, 3)  # both drafts match: then the argmax after them
    assert verify(greedy, TARGET, [0, 4]) == (1, 2)  # the second is wrong: the target's token instead
    assert verify(greedy, TARGET, [1, 2]) == (0, 0)  # a later match after a miss does not count
    assert verify(greedy, TARGET[:1], []) == (0, 0)
    # a draft distribution changes nothing: greedy output is plain greedy decoding's, token for token
    q = mx.array(softmax(np.stack([FAR, FAR])), dtype=mx.float32)
    assert verify(greedy, TARGET, [0, 2], q) == (2, best[2])
    assert verify(greedy, TARGET, [0, 4], q) == (1, best[1])


def test_verify_names_shapes_that_do_not_line_up():
    with pytest.raises(ValueError, match=r"logits of shape \(k \+ 1, V\) = \(3, V\) for 2 drafts"):
        verify(target_sampler(0), TARGET[:2], [1, 2])
    with pytest.raises(ValueError, match=r"draft_probs of shape \(1, 8\)"):
        verify(target_sampler(0), TARGET[:2], [1], mx.zeros((2, V)))
