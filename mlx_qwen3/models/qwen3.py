"""Qwen3 dense models, and the Qwen2 architecture (QwQ-32B, Qwen2.5) through two flags."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .base import MLP, Attention, Linear
from . import rope
from .config import BaseModelArgs, check_rope_scaling


@dataclass(frozen=True, kw_only=True)
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    head_dim: Optional[int] = None  # Qwen2 configs leave it out: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    use_sliding_window: bool = False
    rope_mode: str = "auto"  # not a config.json key: how to rotate (rope.MODES), as load(rope=...) asks

    def check(self):
        super().check()
        rope.check_mode(self.rope_mode)
        if self.use_sliding_window:
            raise ValueError("use_sliding_window=true is not supported (no official Qwen3 or QwQ model uses it)")
        check_rope_scaling(self.rope_scaling)
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if self.head_dim is None and self.hidden_size % heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {heads} "
                "(and head_dim is not given)"
            )
        if self.dims_per_head % 2:
            raise ValueError(f"the head dimension {self.dims_per_head} is odd; rotary embeddings need it even")
        if heads % kv:
            raise ValueError(f"num_key_value_heads {kv} does not divide num_attention_heads {heads}")

    @property
    def context_window(self) -> int:
        """The most tokens (prompt and reply) a sequence may hold: YaRN's scaled length where it may be used."""
        return rope.window(self)

    def rope_factor(self, context: int) -> float:
        """The YaRN factor (1.0: plain RoPE) for a sequence of `context` tokens."""
        return rope.factor_for(self, context)

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def parameter_count(self) -> int:
        """The parameters this config implies (what build_model would allocate), by formula: no model built."""
        D, hd, L = self.hidden_size, self.dims_per_head, self.num_hidden_layers
        H, KV = self.num_attention_heads, self.num_key_value_heads
        attention = D * hd * (2 * H + 2 * KV) + 2 * D  # q, k, v, o and the two layer norms
        attention += hd * (H + 2 * KV) if self.qkv_bias else 0
        attention += D if self.attention_bias else 0
        attention += 2 * hd if self.qk_norm else 0
        sparse = self.sparse_layers()
        mlps = (L - sparse) * 3 * D * self.intermediate_size + sparse * self.sparse_mlp_parameters()
        heads_and_embedding = self.vocab_size * D * (1 if self.tie_word_embeddings else 2) + D
        return L * attention + mlps + heads_and_embedding

    def sparse_layers(self) -> int:
        return 0

    def sparse_mlp_parameters(self) -> int:
        return 0

    @property
    def qk_norm(self) -> bool:
        return self.model_type != "qwen2"

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, mlp: nn.Module):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = mlp
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, args: ModelArgs, layers: list):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = layers
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, ids: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(ids)
        cache = cache or [None] * len(self.layers)
        mask = "causal" if h.shape[1] > 1 else None
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        layers = [DecoderLayer(args, self.make_mlp(args, i)) for i in range(args.num_hidden_layers)]
        self.model = Qwen3Model(args, layers)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def make_mlp(self, args: ModelArgs, layer_idx: int) -> nn.Module:
        return MLP(args.hidden_size, args.intermediate_size)

    def __call__(self, ids: mx.array, cache=None) -> mx.array:
        """ids (B, L) -> logits (B, L, vocab_size)."""
        h = self.model(ids, cache)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights: dict) -> dict:
        """The one place where Hugging Face names or layouts become ours."""
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        # Rotary tables some exporters save; RoPE is computed, not loaded.
        return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}

    @property
    def layers(self):
        return self.model.layers
