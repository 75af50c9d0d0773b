"""config.json -> ModelArgs -> Model -> sanitize -> (quantize) -> load_weights, from a folder or the Hub
(checkpoint.py finds and reads the folder; this module builds the model and checks the weights fit it)."""

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import distributed, memory
from .checkpoint import json_kind, read_config, read_weights, resolve, stored_bytes
from .errors import UserError, show
from .models import MODELS
from .models.config import QUANT_MODES
from .models.rope import MODES
from .models.shard import check_parallel, shard


def model_args(config: dict, rope: str = "auto"):
    """config.json checked, once, by the model's ModelArgs, with the rope mode to run it in (rope.MODES):
    -> (its module, the args)."""
    if not isinstance(config, dict):
        raise UserError(f"config.json must hold a JSON object, not {json_kind(config)}")
    model_type = config.get("model_type")
    if model_type is None:
        raise UserError(f"config.json lacks model_type; supported: {', '.join(sorted(MODELS))}")
    if not isinstance(model_type, str) or model_type not in MODELS:
        raise UserError(f"model_type {show(model_type)} is not supported; supported: {', '.join(sorted(MODELS))}")
    module = MODELS[model_type]
    try:
        return module, module.ModelArgs.from_dict({**config, "rope_mode": rope})
    except (ValueError, TypeError) as e:
        raise UserError(f"config.json for {model_type}: {e}") from None


def build_model(config: dict, folder: Path, rope: str = "auto") -> nn.Module:
    """The model config.json describes, its parameters lazy, once the folder's weights are found able
    to hold it: a config claiming a million layers is refused in milliseconds instead of built."""
    module, args = model_args(config, rope)
    check_size(args, folder)
    try:
        return module.Model(args)
    except (ValueError, TypeError) as e:
        raise UserError(f"config.json for {args.model_type}: {e}") from None


def check_size(args, folder: Path):
    """Refuse a config whose parameters clearly cannot be in the folder's safetensors files.

    Conservative: each parameter is counted at the fewest bytes it could be stored in (1 byte
    unquantized, as fp8; the smallest bits in the quantization otherwise), and only a need of more
    than twice the bytes on disk is refused. Finer mismatches are caught by the shape check.
    """
    stored = stored_bytes(folder)
    params = args.parameter_count()
    q = args.quantization
    bits = 8
    if q is not None:
        bits = min([q["bits"]] + [v["bits"] for v in q.values() if isinstance(v, dict)])
    needed = params * bits // 8
    if needed > 2 * stored:
        raise UserError(
            f"config.json describes {params:,} parameters (at least {_size(needed)}), but the weights in "
            f"{folder} hold {_size(stored)}: the config does not belong to these weights"
        )


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def _quantize(model: nn.Module, config: dict, weights: dict):
    """Turn the layers that have quantized weights (mlx-lm layout) into quantized layers."""
    if config.get("quantization") is None:
        method = (config.get("quantization_config") or {}).get("quant_method")
        if method:
            raise UserError(
                f"weights quantized with {method!r} are not supported; use the bf16 original "
                "(python -m mlx_qwen3.convert makes 4- and 8-bit MLX weights from it)"
            )
        return
    q = config["quantization"]  # checked by ModelArgs: group_size, bits and mode MLX supports

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        params = q.get(path)
        if isinstance(params, dict) or params is False:
            return params
        # Not named per layer: infer bits and group size from the packed shapes.
        mode = q.get("mode", "affine")
        w, scales = weights[f"{path}.weight"], weights[f"{path}.scales"]
        in_dims = module.weight.shape[-1]
        group_size = in_dims // scales.shape[-1] if scales.ndim and scales.shape[-1] else 0
        bits = w.shape[-1] * 32 // in_dims if w.ndim else 0
        group_sizes, all_bits = QUANT_MODES[mode]
        if group_size not in group_sizes or bits not in all_bits:
            raise UserError(
                f"{path} has quantized weights of shapes {tuple(w.shape)} and {tuple(scales.shape)}, which fit no "
                f"supported bits and group size for {in_dims} inputs; the checkpoint does not match its config.json"
            )
        return {"group_size": group_size, "bits": bits, "mode": mode}

    try:
        nn.quantize(model, q["group_size"], q["bits"], mode=q.get("mode", "affine"), class_predicate=predicate)
    except (ValueError, TypeError) as e:
        raise UserError(f"the quantization in config.json does not fit the model: {str(e).splitlines()[0]}") from None


FLOATS = (mx.float16, mx.bfloat16, mx.float32)


def check_weights(model: nn.Module, weights: dict):
    """The sanitized weights are the model's parameters exactly: the same names, shapes and dtype kinds."""
    expected = dict(tree_flatten(model.parameters()))
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing:
        raise UserError(f"missing weights: {_few(missing)}; the checkpoint does not match its config.json")
    if unexpected:
        raise UserError(f"unexpected weights: {_few(unexpected)}; the checkpoint does not match its config.json")
    for k, v in expected.items():
        if v.shape != weights[k].shape:
            raise UserError(
                f"weight {k} has shape {tuple(weights[k].shape)}, the config says {tuple(v.shape)}; "
                "the checkpoint does not match its config.json"
            )
        # Float parameters take any float MLX computes in; packed quantized ones (uint32) exactly theirs.
        got = weights[k].dtype
        if (got not in FLOATS) if v.dtype in FLOATS else (got != v.dtype):
            want = "float16, bfloat16 or float32" if v.dtype in FLOATS else _dtype_name(v.dtype)
            raise UserError(
                f"weight {k} is {_dtype_name(got)}, where {want} belongs; the checkpoint is damaged or "
                "was not saved for inference"
            )


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _few(names: list, n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_memory(args, folder: Path, group):
    """Refuse, before reading any weights, a model that does not fit what this Mac keeps resident. On
    several ranks (`group`), each checks its part: about 1/N of the weights whichever the split (tensor
    parallel keeps the embedding whole on each rank; pipeline balances the layers by bytes), and every rank
    refuses if one does, rank 0 saying why."""
    ranks = 1 if group is None else group.size()
    try:
        memory.check_loadable(args, stored_bytes(folder) // ranks, memory.usable_memory(), ranks)
        problem = None
    except UserError as e:
        problem = str(e)
    if group is not None:
        every = distributed.gather(problem, group)
        problem = next((f"rank {r}: {p}" for r, p in enumerate(every) if p), None)
        if problem and group.rank() != 0:
            raise SystemExit(2)  # rank 0 says it
    if problem:
        raise UserError(problem)


def load_model(path_or_id, lazy: bool = False, kernels: Optional[str] = None, parallel: Optional[str] = None,
               rope: str = "auto"):
    """Load the model alone (this rank's share of it when launched on several). Returns (model, config dict)."""
    model, config, _ = _load(path_or_id, lazy, kernels, parallel, rope)
    return model, config


def _load(path_or_id, lazy: bool, kernels: Optional[str], parallel: Optional[str], rope: str = "auto",
          fits: bool = False):
    if kernels is not None:
        _check_kernels(kernels)  # before any loading: a bad value is one line at once
    if rope not in MODES:
        raise UserError(f"rope must be one of {', '.join(MODES)}, not {show(rope)}")
    group = distributed.group()
    parallel = parallel or ("tensor" if group is not None else "none")
    check_parallel(parallel)
    sharded = group is not None and parallel != "none"
    folder = distributed.check_same(path_or_id, group) if sharded else resolve(str(path_or_id))
    config = read_config(folder)
    model = build_model(config, folder, rope)
    if fits:
        check_memory(model.args, folder, group if sharded else None)
    try:
        weights = model.sanitize(read_weights(folder))
    except ValueError as e:  # experts missing or of mismatched shapes
        raise UserError(f"the weights do not fit config.json: {str(e).splitlines()[0]}") from None
    _quantize(model, config, weights)
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if sharded:
        shard(model, group, parallel)
    model.eval()
    if kernels is not None:
        from . import kernels as kernel_modes

        kernel_modes.set_mode(model, kernels)  # this model's layers only
    if not lazy:
        for _, p in tree_flatten(model.parameters()):  # one at a time: a shard's whole tensor is freed at once
            mx.eval(p)
    if sharded:
        model.resident = memory.agree_resident(model, group)  # every rank plans a prompt alike (memory.kv_setting)
        distributed.barrier(group)  # the ranks leave loading together: the waits the watchdog times start here
    return model, config, folder


def load(path_or_id, lazy: bool = False, kernels: Optional[str] = None, parallel: Optional[str] = None,
         rope: str = "auto"):
    """Load a Qwen3, Qwen3-MoE or Qwen2/QwQ model and its tokenizer.

    Args:
        path_or_id: a local folder (Hugging Face or MLX layout) or a Hugging Face Hub id.
        lazy: leave the weights on disk until first use.
        kernels: "auto" (custom Metal kernels after a self-check), "custom" or "builtin", for this
            process; default: MLX_QWEN3_KERNELS, else auto.
        parallel: launched on several processes (`mlx.launch`): "tensor" (the default there), "pipeline"
            or "none" (every rank holds the whole model); see distributed.py. Alone: ignored.
        rope: "auto" (plain RoPE while a context fits the original window, else YaRN at the smallest
            factor that covers it), "config" (as config.json says, at every length) or "plain"; see
            models/rope.py.

    A model whose weights (this rank's part of them) and a prompt's working memory do not fit what this
    Mac keeps resident (memory.usable_memory) is refused before its weights are read.

    Returns:
        (model, tokenizer)
    """
    from .tokenizer import Tokenizer

    model, _, folder = _load(path_or_id, lazy, kernels, parallel, rope, fits=True)
    tokenizer = Tokenizer.from_folder(folder)
    check_vocabulary(model, tokenizer)
    return model, tokenizer


def load_draft(path_or_id, model, tokenizer, rope: str = "auto"):
    """A draft model for speculative decoding (a smaller Qwen3: Qwen3-0.6B drafts for every Qwen3), whole
    on every rank when launched on several (it is small), refused unless its tokenizer's vocabulary is
    `tokenizer`'s: a draft's ids must mean the tokens the model checks."""
    draft, draft_tokenizer = load(path_or_id, parallel="none", rope=rope)
    if draft_tokenizer.vocabulary() != tokenizer.vocabulary():
        raise UserError(f"the draft model {path_or_id} has another vocabulary than the model's: give a smaller "
                        "model of the same family (Qwen3-0.6B or 1.7B for a Qwen3)")
    check_vocabulary(draft, tokenizer)
    return draft


def check_vocabulary(model, tokenizer):
    """Every id the tokenizer can produce must have a row in the embedding (MLX does not bound-check:
    a larger id reads whatever memory follows the table)."""
    rows, top = model.args.vocab_size, tokenizer.max_id
    if top >= rows:
        raise UserError(
            f"the tokenizer's ids reach {top}, but the model's embedding has {rows} rows (vocab_size in "
            "config.json): the tokenizer does not belong to this model"
        )


def _check_kernels(mode: str):
    from . import kernels

    try:
        kernels.check_mode(mode)
    except ValueError as e:
        raise UserError(str(e)) from None


if __name__ == "__main__":  # python -m mlx_qwen3.load is `mlx-qwen3 info`
    from .cli import main
    main("info")
