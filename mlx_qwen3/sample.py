"""Samplers (which also give the distribution they draw from), speculative sampling's `verify`, and logits
processors, as small composable functions (processors take logits (1, vocab))."""

import logging
from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx

log = logging.getLogger(__name__)

# Below this a temperature samples greedily: logits divided by it overflow float32 (1e-38 and less) long
# before it could pick anything but the most likely token.
GREEDY_BELOW = 1e-5


def make_sampler(temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: Optional[int] = None) -> "Sampler":
    """logits (N, V) -> tokens (N,). Temperature 0 is greedy; otherwise temperature, then top-k,
    top-p and min-p filters (as transformers and vLLM order them), then a categorical draw.
    A temperature under GREEDY_BELOW is taken as 0. The Sampler also gives the distribution it draws
    from (`probs`), which speculative decoding's `verify` needs."""
    return Sampler(temperature, top_p, top_k, min_p, seed)


class Sampler:
    """One request's sampling: its parameters and, when seeded, its own key stream. Every draw (a token,
    uniforms, a categorical) splits the key once, so a seeded run, speculative or not, is reproducible."""

    def __init__(self, temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: Optional[int] = None):
        if 0 < temperature < GREEDY_BELOW:
            _warn_once(f"temperature {temperature:g} is below {GREEDY_BELOW:g}: sampling greedily (as temperature 0)")
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, top_k, min_p
        self.greedy = temperature < GREEDY_BELOW
        self._key = mx.random.key(seed) if seed is not None else None

    def __call__(self, logits: mx.array) -> mx.array:
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        logits, ids = self._filter(logits)
        choice = mx.random.categorical(logits, key=self._next_key())
        return choice if ids is None else mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]

    def probs(self, logits: mx.array) -> mx.array:
        """The distribution `self(logits)` draws from, (N, V) float32 (greedy: one-hot at the argmax)."""
        if self.greedy:
            best = mx.argmax(logits, axis=-1, keepdims=True)
            return (mx.arange(logits.shape[-1]) == best).astype(mx.float32)
        filtered, ids = self._filter(logits)
        probs = mx.softmax(filtered, axis=-1)
        if ids is None:
            return probs
        return mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.float32), ids, probs, axis=-1)

    def uniform(self, shape: tuple) -> mx.array:
        """Uniforms in [0, 1) from this sampler's key stream."""
        return mx.random.uniform(shape=shape, key=self._next_key())

    def categorical(self, probs: mx.array) -> mx.array:
        """An index drawn from `probs` (last axis; need not be normalized) from this sampler's key stream."""
        return mx.random.categorical(mx.log(probs), key=self._next_key())

    def _next_key(self) -> Optional[mx.array]:
        if self._key is None:  # unseeded: MLX's global key stream
            return None
        self._key, key = mx.random.split(self._key)
        return key

    def _filter(self, logits: mx.array) -> tuple:
        """(logits, ids): tempered logits with the filtered-out tokens at -inf; with top-k, only the k
        best are kept and `ids` (N, k) says which tokens they are (else ids is None)."""
        logits = logits.astype(mx.float32) / self.temperature
        ids = None
        if 0 < self.top_k < logits.shape[-1]:  # then filter and draw among the k best only: no full sort
            ids = mx.argpartition(-logits, kth=self.top_k - 1, axis=-1)[..., :self.top_k]
            logits = mx.take_along_axis(logits, ids, axis=-1)
        if self.top_p < 1.0:
            order = mx.argsort(-logits, axis=-1)
            probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
            # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
            drop = (mx.cumsum(probs, axis=-1) - probs) >= self.top_p
            drop = mx.take_along_axis(drop, mx.argsort(order, axis=-1), axis=-1)
            logits = mx.where(drop, -mx.inf, logits)
        if self.min_p > 0.0:
            probs = mx.softmax(logits, axis=-1)
            logits = mx.where(probs < self.min_p * probs.max(axis=-1, keepdims=True), -mx.inf, logits)
        return logits, ids


def verify(sampler: Sampler, logits: mx.array, drafts: list, draft_probs: Optional[mx.array] = None) -> tuple:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): the target model's verdict on drafts.

    Args:
        sampler: the request's Sampler (greedy: accept while a draft is the argmax, then the argmax,
            exactly what plain greedy decoding produces).
        logits: (k + 1, V), the target's logits (processors already applied) at the last fed token and
            at each draft.
        drafts: the k token ids proposed after the last fed token (k may be 0).
        draft_probs: (k, V), the distribution each draft was drawn from; None when the drafts were
            proposed deterministically (prompt lookup, a greedy draft model): a point mass.

    Returns:
        (accepted, token): how many drafts the target accepts, and the token that follows them.
    """
    k = len(drafts)
    if logits.ndim != 2 or logits.shape[0] != k + 1:
        raise ValueError(f"verify needs logits of shape (k + 1, V) = ({k + 1}, V) for {k} drafts, "
                         f"not {tuple(logits.shape)}")
    if draft_probs is not None and tuple(draft_probs.shape) != (k, logits.shape[1]):
        raise ValueError(f"verify needs draft_probs of shape ({k}, {logits.shape[1]}), not {tuple(draft_probs.shape)}")
    if sampler.greedy:
        best = mx.argmax(logits, axis=-1).tolist()
        accepted = next((j for j, d in enumerate(drafts) if d != best[j]), k)
        return accepted, best[accepted]
    p = sampler.probs(logits)
    if k == 0:
        return 0, sampler.categorical(p[0]).item()
    V = p.shape[-1]
    d = mx.array(drafts, dtype=mx.int32)
    p_d = mx.take_along_axis(p[:k], d[:, None], axis=-1)[:, 0]
    q_d = 1.0 if draft_probs is None else mx.take_along_axis(draft_probs.astype(mx.float32), d[:, None], axis=-1)[:, 0]
    # draft j stays with probability min(1, p/q), written u * q < p: no division (a draft with q = 0 was not drawn)
    accept = sampler.uniform((k,)) * q_d < p_d
    accepted = mx.argmin(mx.concatenate([accept, mx.array([False])]).astype(mx.int32))  # the first rejection, or k
    p_n = mx.take(p, accepted, axis=0)
    # after a rejection the token comes from normalize(max(0, p - q)) at that position; after all k, from p_k
    row = mx.minimum(accepted, k - 1)
    if draft_probs is None:
        q_n = (mx.arange(V) == mx.take(d, row)).astype(mx.float32)
    else:
        q_n = mx.take(draft_probs, row, axis=0).astype(mx.float32)
    residual = mx.where(accepted < k, mx.maximum(p_n - q_n, 0.0), p_n)
    # rounding can leave no mass where p == q (a rejection there has probability 0): fall back to p
    residual = mx.where(residual.sum() > 0, residual, p_n)
    token = sampler.categorical(residual)
    accepted, token = mx.stack([accepted.astype(mx.uint32), token.astype(mx.uint32)]).tolist()
    return accepted, token


@lru_cache(maxsize=None)
def _warn_once(message: str):
    log.warning(message)


def presence_penalty(penalty: float) -> Callable:
    """Subtract `penalty` once from every token already generated (OpenAI's presence_penalty)."""

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        return logits - penalty * _seen(tokens, logits)

    return apply


def repetition_penalty(penalty: float) -> Callable:
    """Divide positive logits of generated tokens by `penalty`, multiply negative ones (CTRL, HF)."""

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        seen = _seen(tokens, logits) > 0
        scaled = mx.where(logits > 0, logits / penalty, logits * penalty)
        return mx.where(seen, scaled, logits)

    return apply


def _seen(tokens: mx.array, logits: mx.array) -> mx.array:
    """1.0 where a token id occurs in `tokens`, else 0.0; shaped like logits."""
    mask = mx.zeros(logits.shape[-1], dtype=logits.dtype)
    return mx.expand_dims(mask.at[tokens].maximum(1), 0)


def frequency_penalty(penalty: float) -> Callable:
    """Subtract `penalty` times the number of times each token was generated (OpenAI's)."""

    def apply(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        counts = mx.zeros(logits.shape[-1], dtype=logits.dtype).at[tokens].add(1)
        return logits - penalty * counts[None]

    return apply


def make_processors(presence: float = 0.0, repetition: float = 1.0, frequency: float = 0.0) -> list:
    processors = []
    if presence:
        processors.append(presence_penalty(presence))
    if frequency:
        processors.append(frequency_penalty(frequency))
    if repetition != 1.0:
        processors.append(repetition_penalty(repetition))
    return processors
