"""Samplers and logits processors as small composable functions (logits are (1, vocab))."""

import logging
from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx

log = logging.getLogger(__name__)

# Below this a temperature samples greedily: logits divided by it overflow float32 (1e-38 and less) long
# before it could pick anything but the most likely token.
GREEDY_BELOW = 1e-5


def make_sampler(temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: Optional[int] = None) -> Callable:
    """logits -> token (shape (1,)). Temperature 0 is greedy; otherwise temperature, then top-k,
    top-p and min-p filters (as transformers and vLLM order them), then a categorical draw.
    A temperature under GREEDY_BELOW is taken as 0."""
    if temperature < GREEDY_BELOW:
        if temperature > 0:
            _warn_once(f"temperature {temperature:g} is below {GREEDY_BELOW:g}: sampling greedily (as temperature 0)")
        return lambda logits: mx.argmax(logits, axis=-1)
    key = [mx.random.key(seed) if seed is not None else None]

    def sample(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32) / temperature
        ids = None
        if 0 < top_k < logits.shape[-1]:  # then filter and draw among the k best only: no full sort
            ids = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k]
            logits = mx.take_along_axis(logits, ids, axis=-1)
        if top_p < 1.0:
            order = mx.argsort(-logits, axis=-1)
            probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
            # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
            drop = (mx.cumsum(probs, axis=-1) - probs) >= top_p
            drop = mx.take_along_axis(drop, mx.argsort(order, axis=-1), axis=-1)
            logits = mx.where(drop, -mx.inf, logits)
        if min_p > 0.0:
            probs = mx.softmax(logits, axis=-1)
            logits = mx.where(probs < min_p * probs.max(axis=-1, keepdims=True), -mx.inf, logits)
        if key[0] is None:
            choice = mx.random.categorical(logits)
        else:
            key[0], k = mx.random.split(key[0])
            choice = mx.random.categorical(logits, key=k)
        return choice if ids is None else mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]

    return sample


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
