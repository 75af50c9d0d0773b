"""config.json understood once: its spellings normalised, each field typed and range-checked, rope
scaling and quantization checked, as the model's ModelArgs (a frozen dataclass named after the HF keys)."""

import math
from dataclasses import MISSING, dataclass, fields
from typing import Optional, Union, get_args, get_origin, get_type_hints

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
        """Build from a config.json dict in either spelling (see normalize_config); unknown keys ignored."""
        config = normalize_config(config)
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


def normalize_config(config: dict) -> dict:
    """A copy of config.json with the Hub's spellings filled in from transformers 5's, which it keeps:
    rope_parameters -> rope_theta and rope_scaling, num_local_experts -> num_experts.

    Loading reads this, and the converter writes it, so that mlx-lm (which reads only the Hub's
    spellings) and we read the same model from a converted folder.
    """
    if not isinstance(config, dict):
        raise ValueError(f"the config must be a JSON object, not {show(config)}")
    config = dict(config)
    rope = config.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise ValueError(f"rope_parameters must be an object, not {show(rope)}")
    rope = rope or {}
    if config.get("rope_theta") is None and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if config.get("rope_scaling") is None and rope_type(rope) != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if config.get("num_experts") is None and "num_local_experts" in config:
        config["num_experts"] = config["num_local_experts"]
    return config


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
    kind = rope_type(scaling)
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


def rope_type(scaling: Optional[dict]) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type") or scaling.get("type") or "default"
