"""Rotary embeddings, and the YaRN factor a context needs.

Qwen advises YaRN only where a context needs it: static scaling (every framework's) lowers the quality
of short prompts. So by default ("auto") a sequence is rotated with plain RoPE while its context fits
the model's original window, and otherwise with YaRN at the smallest power-of-two factor whose window
covers it, up to a ceiling. The window and the ceiling come from config.json's rope_scaling when it has
YaRN; Qwen3, Qwen3-MoE and QwQ configs without it get Qwen's documented values (32,768 tokens, up to 4x).
A cache fixes the factor it was made with (CacheSetting.rope_factor): every position of a sequence is
rotated alike. "config" rotates as config.json says, at every length; "plain" never scales.
"""

import math
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import rope_type

MODES = ("auto", "config", "plain")
QWEN_WINDOW = 32768  # Qwen's documented original window and YaRN ceiling, for configs without rope_scaling
QWEN_MAX_FACTOR = 4.0


def check_mode(mode: str):
    if mode not in MODES:
        raise ValueError(f"rope must be one of {', '.join(MODES)}, not {mode!r}")


def yarn_range(args) -> tuple:
    """(the original window, the largest YaRN factor) of a model's config."""
    scaling = args.rope_scaling
    if rope_type(scaling) == "yarn":
        return scaling.get("original_max_position_embeddings") or args.max_position_embeddings, scaling["factor"]
    if args.max_position_embeddings >= QWEN_WINDOW:  # every Qwen3 / QwQ / Qwen2.5 long-context config
        return QWEN_WINDOW, QWEN_MAX_FACTOR
    return args.max_position_embeddings, 1.0


def window(args) -> int:
    """The most tokens (prompt and reply) a sequence may hold under `args.rope_mode`."""
    original, ceiling = yarn_range(args)
    configured = rope_type(args.rope_scaling) == "yarn"
    if args.rope_mode == "plain":
        return original if configured else args.max_position_embeddings
    if args.rope_mode == "config" and not configured:
        return args.max_position_embeddings
    return max(args.max_position_embeddings, int(original * ceiling))


def factor_for(args, context: int) -> float:
    """The YaRN factor (1.0: plain RoPE) a sequence of `context` tokens is rotated with."""
    original, ceiling = yarn_range(args)
    if args.rope_mode == "plain":
        return 1.0
    if args.rope_mode == "config":
        return float(ceiling) if rope_type(args.rope_scaling) == "yarn" else 1.0
    factor = 1.0
    while factor * original < context and factor < ceiling:
        factor = min(factor * 2, ceiling)
    return float(factor)


def scaling_for(args, factor: float) -> Optional[dict]:
    """The rope_scaling that rotates as `factor` does: None for plain RoPE, else config.json's YaRN (or
    Qwen's documented one) at `factor`. What transformers takes to compute the same logits."""
    if factor == 1.0:
        return None
    original, _ = yarn_range(args)
    scaling = dict(args.rope_scaling) if rope_type(args.rope_scaling) == "yarn" else {"rope_type": "yarn"}
    return {**scaling, "factor": factor, "original_max_position_embeddings": original}


class RoPE(nn.Module):
    """Rotary embedding over the whole head (Qwen rotates every dimension), plain or YaRN at the factor
    each call names."""

    def __init__(self, dims: int, args):
        super().__init__()
        self.dims, self.base = dims, args.rope_theta
        self.args = args

    def factor_for(self, context: int) -> float:
        return factor_for(self.args, context)

    def __call__(self, x: mx.array, offset: int = 0, factor: float = 1.0) -> mx.array:
        freqs, scale = _tables(self.dims, self.base, _key(scaling_for(self.args, factor)))
        if scale != 1.0:  # YaRN's attention factor, applied to q and k alike as HF applies it to cos/sin
            x = x * scale
        base = None if freqs is not None else self.base
        return mx.fast.rope(x, self.dims, traditional=False, base=base, scale=1.0, offset=offset, freqs=freqs)


def _key(scaling: Optional[dict]):
    return None if scaling is None else tuple(sorted(scaling.items()))


@lru_cache(maxsize=None)
def _tables(dims: int, base: float, scaling: Optional[tuple]):
    """(YaRN's periods or None, its attention factor): one per (head size, base, scaling), shared by layers."""
    if scaling is None:
        return None, 1.0
    freqs, scale = _yarn(dims, base, dict(scaling))
    mx.eval(freqs)
    return freqs, scale


def _yarn(dims: int, base: float, cfg: dict):
    """YaRN periods and attention factor, as transformers' `_compute_yarn_parameters` computes them."""
    factor = cfg["factor"]
    original = cfg["original_max_position_embeddings"]
    beta_fast = cfg.get("beta_fast") or 32
    beta_slow = cfg.get("beta_slow") or 1

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = cfg.get("attention_factor")
    if attention_factor is None:
        if cfg.get("mscale") and cfg.get("mscale_all_dim"):
            attention_factor = mscale(factor, cfg["mscale"]) / mscale(factor, cfg["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if cfg.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # weight of the original frequency; the rest is interpolated by `factor`
    inv_freq = 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return 1.0 / inv_freq, float(attention_factor)
