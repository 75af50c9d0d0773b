"""Pieces every Qwen model shares: RoPE (plain and YaRN), attention, MLP."""

import math
from functools import partial
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from .config import rope_type


class RoPE(nn.Module):
    """Rotary embedding, plain or YaRN-scaled, over the whole head (Qwen rotates every dimension)."""

    def __init__(self, dims: int, base: float, scaling: Optional[dict], max_position_embeddings: int):
        super().__init__()
        self.dims = dims
        self.base = base
        self.scale = 1.0  # YaRN's attention factor, applied to q and k alike as HF applies it to cos/sin
        self._freqs = None
        kind = rope_type(scaling)
        if kind == "yarn":
            self._freqs, self.scale = _yarn(dims, base, scaling, max_position_embeddings)
        elif kind != "default":
            raise ValueError(f"rope type {kind!r} is not supported (supported: default, yarn)")

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.scale != 1.0:
            x = x * self.scale
        base = None if self._freqs is not None else self.base
        return mx.fast.rope(
            x, self.dims, traditional=False, base=base, scale=1.0, offset=offset, freqs=self._freqs
        )


def _yarn(dims: int, base: float, cfg: dict, max_position_embeddings: int):
    """YaRN periods and attention factor, as transformers' `_compute_yarn_parameters` computes them."""
    factor = cfg["factor"]
    original = cfg.get("original_max_position_embeddings") or max_position_embeddings
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


class Attention(nn.Module):
    """GQA attention; Qwen3 normalises each head's q and k before RoPE, Qwen2 adds a QKV bias instead."""

    def __init__(self, args):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        head_dim = args.head_dim or dim // self.n_heads
        self.scale = head_dim**-0.5

        self.q_proj = Linear(dim, self.n_heads * head_dim, bias=args.qkv_bias)
        self.k_proj = Linear(dim, self.n_kv_heads * head_dim, bias=args.qkv_bias)
        self.v_proj = Linear(dim, self.n_kv_heads * head_dim, bias=args.qkv_bias)
        self.o_proj = Linear(self.n_heads * head_dim, dim, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache=None):
        B, L, D = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)

        if isinstance(k, tuple):  # a quantized cache: (packed, scales, biases); the mask is causal or none
            out = quantized_attention(q, k, v, self.scale, cache.group_size, cache.bits)
        else:
            # "causal" aligns the queries with the last keys, which is what a cache offset needs.
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def quantized_attention(q: mx.array, k: tuple, v: tuple, scale: float, group_size: int, bits: int) -> mx.array:
    """Causal attention of q (B, n_heads, L, D) over quantized keys and values, each (packed, scales,
    biases) of (B, n_kv_heads, S, ...): two quantized matmuls, the cache is never dequantized whole."""
    B, n_heads, L, D = q.shape
    n_kv, S = k[0].shape[1], k[0].shape[2]
    # GQA: each kv head's query heads fold into its rows (repeats * L); a broadcast kv axis would make
    # MLX's CPU quantized matmul copy the cache per step (twice as slow at 8 bits)
    q = (q * scale).reshape(B, n_kv, n_heads // n_kv * L, D)
    scores = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)
    scores = scores.astype(mx.float32)
    if L > 1:  # the queries are the last L positions, each kv head's rows are (repeats, L)
        causal = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        scores = mx.where(causal, scores.reshape(B, n_kv, -1, L, S), -mx.inf).reshape(B, n_kv, -1, S)
    probs = mx.softmax(scores, axis=-1).astype(q.dtype)
    out = mx.quantized_matmul(probs, *v, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, n_heads, L, D)


class Linear(nn.Linear):
    """nn.Linear whose quantized form runs through the kernel dispatcher."""

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        return kernels.quantized_linear(self, x)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden_dim, bias=False)
        self.up_proj = Linear(dim, hidden_dim, bias=False)
        self.down_proj = Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x in one fused kernel (no rounded intermediate in half precision)."""
    return nn.silu(gate) * x
