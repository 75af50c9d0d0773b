"""Pieces every Qwen model shares: attention (rotary embeddings in rope.py), MLP."""

from functools import partial
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from .cache import Rows
from .rope import RoPE


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
        self.rope = RoPE(head_dim, args)

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache=None):
        B, L, D = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        if isinstance(cache, Rows):  # several rows: each attends over its own cache, its real tokens only
            out = mx.concatenate([self.attend(q[i : i + 1, :, :n], k[i : i + 1, :, :n], v[i : i + 1, :, :n],
                                              "causal" if n > 1 else None, c, pad=L - n)
                                  for i, (c, n) in enumerate(zip(cache.caches, cache.lengths))])
        else:
            out = self.attend(q, k, v, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def attend(self, q, k, v, mask, cache, pad: int = 0) -> mx.array:
        """Rotate q and k at the cache's positions, add k and v to it, attend; `pad` zero positions after."""
        L = q.shape[2]
        # a cache fixed its rope factor when it was made; a call without one covers its own L tokens
        offset, factor = (cache.offset, cache.rope_factor) if cache is not None else (0, self.rope.factor_for(L))
        q, k = self.rope(q, offset, factor), self.rope(k, offset, factor)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)

        if isinstance(k, tuple):  # a quantized cache: (packed, scales, biases); the mask is causal or none
            out = quantized_attention(q, k, v, self.scale, cache.group_size, cache.bits)
        else:
            # "causal" aligns the queries with the last keys, which is what a cache offset needs.
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return mx.pad(out, [(0, 0), (0, 0), (0, pad), (0, 0)]) if pad else out


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
