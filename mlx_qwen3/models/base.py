"""Pieces every Qwen model shares: config parsing, RoPE (plain and YaRN), attention, MLP."""

import math
from dataclasses import MISSING, dataclass, fields
from functools import partial
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..errors import show


MAX_DIM = 2**31 - 1  # MLX shapes are 32-bit

# Ranges of the fields whose type alone does not make them valid: (check, what the value must be).
_POSITIVE = (lambda v: 1 <= v <= MAX_DIM, f"an integer from 1 to {MAX_DIM}")
RANGES = {
    "hidden_size": _POSITIVE,
    "intermediate_size": _POSITIVE,
    "num_hidden_layers": _POSITIVE,
    "num_attention_heads": _POSITIVE,
    "num_key_value_heads": _POSITIVE,
    "vocab_size": _POSITIVE,
    "max_position_embeddings": _POSITIVE,
    "head_dim": _POSITIVE,
    "moe_intermediate_size": _POSITIVE,
    "num_experts_per_tok": _POSITIVE,
    "decoder_sparse_step": _POSITIVE,
    "num_experts": (lambda v: 0 <= v <= MAX_DIM, f"an integer from 0 to {MAX_DIM}"),
    "rms_norm_eps": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "rope_theta": (lambda v: v > 0, "a positive number"),
    "mlp_only_layers": (
        lambda v: all(type(i) is int and 0 <= i <= MAX_DIM for i in v), "a list of layer indices (integers >= 0)"
    ),
}

# Quantization modes MLX has, with the group sizes and bits each takes.
QUANT_MODES = {
    "affine": ((32, 64, 128), (2, 3, 4, 5, 6, 8)),
    "mxfp4": ((32,), (4,)),
    "nvfp4": ((16,), (4,)),
    "mxfp8": ((32,), (8,)),
}


@dataclass(frozen=True, kw_only=True)
class BaseModelArgs:
    """A model's config.json, checked once: each field's annotated type, its range, and how fields agree.

    Field names are the Hugging Face keys. An integer field takes a float only when it is a whole number
    (2.0 becomes 2; 2.5 is refused); a float field takes an integer; booleans must be JSON booleans
    (the string "false" is refused, not read as true). Every problem raises ValueError with one line.
    """

    quantization: Optional[dict] = None  # mlx-lm's: group_size, bits, mode, and per-layer entries
    quantization_config: Optional[dict] = None  # Hugging Face's (quant_method); only its type is checked here

    @classmethod
    def from_dict(cls, config: dict) -> "BaseModelArgs":
        """Build from a config.json dict: Hub spelling or transformers 5 spelling, unknown keys ignored."""
        if not isinstance(config, dict):
            raise ValueError(f"the config must be a JSON object, not {show(config)}")
        config = dict(config)
        # transformers 5 nests rope_theta and the scaling under rope_parameters.
        rope = config.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be an object, not {show(rope)}")
        rope = rope or {}
        if config.get("rope_theta") is None and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        if config.get("rope_scaling") is None and _rope_type(rope) != "default":
            config["rope_scaling"] = rope
        # transformers 5 names the MoE expert count num_local_experts.
        if config.get("num_experts") is None and "num_local_experts" in config:
            config["num_experts"] = config["num_local_experts"]

        names = [f.name for f in fields(cls)]
        missing = [
            f.name
            for f in fields(cls)
            if f.default is MISSING and f.default_factory is MISSING and config.get(f.name) is None
        ]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        return cls(**{k: config[k] for k in names if config.get(k) is not None})

    def __post_init__(self):
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = _typed(f.name, getattr(self, f.name), hints[f.name])
            if value is not None and f.name in RANGES:
                ok, what = RANGES[f.name]
                if not ok(value):
                    raise ValueError(f"{f.name} must be {what}, not {show(value)}")
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self):
        """How the fields agree with each other; subclasses add theirs."""
        check_quantization(self.quantization)
        if self.quantization_config is not None:
            method = self.quantization_config.get("quant_method")
            if method is not None and not isinstance(method, str):
                raise ValueError(f"quantization_config.quant_method must be a string, not {show(method)}")


_KIND = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string",
         dict: "an object", list: "a list"}


def _typed(name: str, value, annotation):
    """`value` checked against `annotation` (bool, int, float, str, dict, list, or Optional of one)."""
    if get_origin(annotation) is Union:
        if value is None:
            return None
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    kind = _KIND[annotation]
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:
                ok = False
            ok = ok and math.isfinite(value)
            kind = "a finite number"
    else:
        ok = isinstance(value, annotation)
    if not ok:
        raise ValueError(f"{name} must be {kind}, not {show(value)}")
    return value


def _number(where: str, value, ok, what: str, integer: bool = False):
    """A value inside rope_scaling or quantization: a number (an integer if `integer`) for which ok() holds."""
    good = isinstance(value, (int, float)) and not isinstance(value, bool)
    if good and integer:
        good = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if good:
        try:
            good = math.isfinite(float(value)) and ok(value)
        except OverflowError:
            good = False
    if not good:
        raise ValueError(f"{where} must be {what}, not {show(value)}")
    return int(value) if integer else value


def check_rope_scaling(scaling: Optional[dict]):
    """rope_scaling (or transformers 5's rope_parameters): a type we run, with sound parameters."""
    if scaling is None:
        return
    for key in ("rope_type", "type"):
        if scaling.get(key) is not None and not isinstance(scaling[key], str):
            raise ValueError(f"rope_scaling.{key} must be a string, not {show(scaling[key])}")
    kind = _rope_type(scaling)
    if kind not in ("default", "yarn"):
        raise ValueError(f"rope type {kind!r} is not supported (supported: default, yarn)")
    if kind != "yarn":
        return
    if scaling.get("factor") is None:
        raise ValueError("rope_scaling of type yarn lacks its factor")
    positive = lambda v: v > 0
    _number("rope_scaling.factor", scaling["factor"], positive, "a positive number")
    for key in ("beta_fast", "beta_slow", "attention_factor"):
        if scaling.get(key) is not None:
            _number(f"rope_scaling.{key}", scaling[key], positive, "a positive number")
    for key in ("mscale", "mscale_all_dim"):
        if scaling.get(key) is not None:
            _number(f"rope_scaling.{key}", scaling[key], lambda v: v >= 0, "a number >= 0")
    if scaling.get("original_max_position_embeddings") is not None:
        _number("rope_scaling.original_max_position_embeddings", scaling["original_max_position_embeddings"],
                lambda v: 1 <= v <= MAX_DIM, "a positive integer", integer=True)
    if scaling.get("truncate") is not None and not isinstance(scaling["truncate"], bool):
        raise ValueError(f"rope_scaling.truncate must be a boolean, not {show(scaling['truncate'])}")


def check_quantization(q: Optional[dict]):
    """mlx-lm's "quantization": group_size, bits and mode that MLX supports, per-layer entries alike."""
    if q is None:
        return
    _check_quant_params("quantization", q)
    for key, value in q.items():
        if key in ("group_size", "bits", "mode"):
            continue
        if isinstance(value, dict):  # one layer's own parameters
            unknown = sorted(set(value) - {"group_size", "bits", "mode"})
            if unknown:
                raise ValueError(f"quantization[{key!r}] has {unknown[0]!r}, which is not supported")
            _check_quant_params(f"quantization[{key!r}]", value)
        elif not isinstance(value, bool):  # true / false: quantize this layer with the defaults, or not
            raise ValueError(
                f"quantization[{show(key)}] must be an object (group_size, bits) or a boolean, not {show(value)}"
            )


def _check_quant_params(where: str, p: dict):
    mode = p.get("mode", "affine")
    if not isinstance(mode, str) or mode not in QUANT_MODES:
        raise ValueError(f"{where}.mode must be one of {', '.join(QUANT_MODES)}, not {show(mode)}")
    group_sizes, bits = QUANT_MODES[mode]
    for key, allowed in (("group_size", group_sizes), ("bits", bits)):
        if key not in p:
            raise ValueError(f"{where} lacks {key}")
        value = p[key]
        if type(value) is not int or value not in allowed:
            raise ValueError(
                f"{where}.{key} must be one of {', '.join(map(str, allowed))} for {mode} quantization, "
                f"not {show(value)}"
            )


def _rope_type(scaling: Optional[dict]) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type") or scaling.get("type") or "default"


class RoPE(nn.Module):
    """Rotary embedding, plain or YaRN-scaled, over the whole head (Qwen rotates every dimension)."""

    def __init__(self, dims: int, base: float, scaling: Optional[dict], max_position_embeddings: int):
        super().__init__()
        self.dims = dims
        self.base = base
        self.scale = 1.0  # YaRN's attention factor, applied to q and k alike as HF applies it to cos/sin
        self._freqs = None
        kind = _rope_type(scaling)
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

        # "causal" aligns the queries with the last keys, which is what a cache offset needs.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


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
