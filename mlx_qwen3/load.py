"""config.json -> ModelArgs -> Model -> sanitize -> (quantize) -> load_weights, from a folder or the Hub."""

import json
import re
import struct
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import UserError, show
from .models import MODELS
from .models.base import QUANT_MODES

# What a model needs from a Hub repo: configs, weights, tokenizer, chat template.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(path_or_id: str) -> Path:
    """A local folder as it is, or a Hub id downloaded (or found in the cache) through huggingface_hub."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file; give the model's folder (the one with config.json)")
        return path
    if not _REPO_ID.match(str(path_or_id)):
        raise UserError(f"{path_or_id} does not exist; give a model folder or a Hub id like Qwen/Qwen3-0.6B")
    return _download(str(path_or_id))


def _download(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        how = "downloads are off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise UserError(
            f"{repo_id} is not a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            f"and {how}: download it once while online, or give a local folder"
        ) from None
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its licence on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id} is not a model on the Hugging Face Hub (or it is private); check the id") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"could not download {repo_id}: {str(e).splitlines()[0]}") from None


MAX_JSON = 100_000_000  # bytes; a real config or index is a few kB, at most a few MB


def read_json(file: Path) -> dict:
    """A JSON file holding an object, or one line saying why it cannot be read (never a traceback)."""
    try:
        if not file.is_file():  # a FIFO or a device: reading it could block or never end
            raise UserError(f"{file} is not a regular file")
        if file.stat().st_size > MAX_JSON:
            raise UserError(f"{file} is {file.stat().st_size:,} bytes, too large to be a real {file.name}")
        data = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text; download it again") from None
    except OSError as e:
        raise UserError(f"{file} cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        value = json.loads(data)
    except RecursionError:
        raise UserError(f"{file} is nested too deeply to be a real {file.name}; download it again") from None
    except ValueError as e:  # JSONDecodeError, and integers too long to convert
        raise UserError(f"{file} is not valid JSON ({str(e).splitlines()[0]}); download it again") from None
    if not isinstance(value, dict):
        raise UserError(f"{file} must hold a JSON object, not {_kind(value)}; download it again")
    return value


def _kind(value) -> str:
    return {type(None): "null", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", dict: "an object"}.get(type(value), type(value).__name__)


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise UserError(f"{folder} has no config.json; is it a Hugging Face or MLX model folder?")
    return read_json(file)


# safetensors dtype -> bytes per element, for the dtypes MLX loads (F8_E4M3 arrives as uint8).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E8M0": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "C64": 8,
}
MAX_HEADER = 100_000_000  # the safetensors format's own limit


def safetensors_header(file: Path) -> dict:
    """Read and check a safetensors header: each tensor's dtype, shape and byte range agree, and lie
    inside the file. A truncated or corrupt file is refused before any load."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            if n is None or n > size - 8 or n > MAX_HEADER:
                raise UserError(f"{file} is truncated or not a safetensors file; download or convert it again")
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"{file} cannot be read ({e.strerror or e}); check its permissions") from None
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested absurdly deep
        raise UserError(f"{file} has a corrupt header; download or convert it again") from None
    if not isinstance(header, dict):
        raise UserError(f"{file} has a corrupt header (not a JSON object); download or convert it again")
    meta = header.get("__metadata__")  # MLX writes null
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise UserError(f"{file} has a corrupt header (__metadata__ must map names to strings); convert it again")
    end = 0
    for name, t in header.items():
        if name != "__metadata__":
            end = max(end, _check_entry(file, name, t))
    if 8 + n + end > size:
        raise UserError(
            f"{file} is truncated ({size} bytes, its header needs {8 + n + end}); download or convert it again"
        )
    return header


def _check_entry(file: Path, name: str, t) -> int:
    """One tensor's header entry checked; returns where its data ends."""
    bad = f"{file} has a corrupt header: tensor {name!r}"
    if not isinstance(t, dict):
        raise UserError(f"{bad} is not described by an object; download or convert it again")
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if dtype == "F64":
        raise UserError(f"tensor {name!r} in {file} is float64, which MLX does not load; "
                        "save the weights as float32, float16 or bfloat16")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise UserError(f"{bad} has dtype {show(dtype)}, which MLX does not load "
                        f"(known: {', '.join(DTYPE_SIZES)}); convert it again")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 8:
        raise UserError(f"{bad} has shape {show(shape)}, not a list of sizes; download or convert it again")
    if (
        not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise UserError(f"{bad} has data_offsets {show(offsets)}; download or convert it again")
    count = 1
    for d in shape:
        count *= d
    if count * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
        raise UserError(
            f"{bad} is {dtype} of shape {tuple(shape)} ({count * DTYPE_SIZES[dtype]} bytes) but spans "
            f"{offsets[1] - offsets[0]} bytes; download or convert it again"
        )
    return offsets[1]


def weight_files(folder: Path) -> list:
    """The shards named by model.safetensors.index.json, or every *.safetensors in the folder.

    An index cannot name a file outside the folder (/etc/x, ../x); symlinks the folder holds are followed.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map object (it has {_kind(weight_map)}); download it again")
        names = set()
        for key, name in weight_map.items():
            if not isinstance(name, str) or not name:
                raise UserError(f"{index} maps {show(key)} to {show(name)}, not a file name; download it again")
            names.add(name)
        files = [_inside(folder, name, index) for name in sorted(names)]
        missing = [n for n, f in zip(sorted(names), files) if not f.is_file()]
        if missing:
            raise UserError(f"{folder} lacks shards named in its index: {', '.join(missing[:3])}; download them again")
        return files
    files = [_inside(folder, f.name, None) for f in sorted(folder.glob("*.safetensors"))]
    odd = [f.name for f in files if not f.is_file()]  # a FIFO would block the first read forever
    if odd:
        raise UserError(f"{folder / odd[0]} is not a regular file; download or convert the weights again")
    if not files:
        raise UserError(f"{folder} has no *.safetensors weights (.bin and .gguf files are not supported)")
    return files


def _inside(folder: Path, name: str, index: Optional[Path]) -> Path:
    """folder/name, refused where the name leads out of the folder. A symlink the folder holds is
    followed: weights linked onto another disk, or into a Hugging Face cache, are the user's choice."""
    named = f"{index} names {show(name)}" if index else f"{folder / name}"
    if "\0" in name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"{named}, a path outside the model folder; refusing to read it")
    path = folder / name
    try:
        path.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop
        raise UserError(f"{named}, which cannot be resolved (a symlink loop?)") from None
    return path


def read_weights(folder: Path) -> dict:
    """All tensors of the folder, lazily: MLX reads each from its file when first evaluated."""
    weights = {}
    for file in weight_files(folder):
        safetensors_header(file)
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{file} cannot be loaded ({str(e).splitlines()[0]}); convert it again") from None
    return weights


def model_args(config: dict):
    """config.json checked, once, by the model's ModelArgs: -> (its module, the args)."""
    if not isinstance(config, dict):
        raise UserError(f"config.json must hold a JSON object, not {_kind(config)}")
    model_type = config.get("model_type")
    if model_type is None:
        raise UserError(f"config.json lacks model_type; supported: {', '.join(sorted(MODELS))}")
    if not isinstance(model_type, str) or model_type not in MODELS:
        raise UserError(f"model_type {show(model_type)} is not supported; supported: {', '.join(sorted(MODELS))}")
    module = MODELS[model_type]
    try:
        return module, module.ModelArgs.from_dict(config)
    except (ValueError, TypeError) as e:
        raise UserError(f"config.json for {model_type}: {e}") from None


def build_model(config: dict, folder: Path) -> nn.Module:
    """The model config.json describes, its parameters lazy, once the folder's weights are found able
    to hold it: a config claiming a million layers is refused in milliseconds instead of built."""
    module, args = model_args(config)
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
    stored = 0
    for file in weight_files(folder):
        header = safetensors_header(file)
        stored += sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
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


def _check_weights(model: nn.Module, weights: dict):
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


def load_model(path_or_id, lazy: bool = False, kernels: Optional[str] = None):
    """Load the model alone. Returns (model, config dict)."""
    if kernels is not None:
        _check_kernels(kernels)  # before any loading: a bad value is one line at once
    folder = resolve(str(path_or_id))
    config = read_config(folder)
    model = build_model(config, folder)
    try:
        weights = model.sanitize(read_weights(folder))
    except ValueError as e:  # experts missing or of mismatched shapes
        raise UserError(f"the weights do not fit config.json: {str(e).splitlines()[0]}") from None
    _quantize(model, config, weights)
    _check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if kernels is not None:
        from . import kernels as kernel_modes

        kernel_modes.set_mode(model, kernels)  # this model's layers only
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def load(path_or_id, lazy: bool = False, kernels: Optional[str] = None):
    """Load a Qwen3, Qwen3-MoE or Qwen2/QwQ model and its tokenizer.

    Args:
        path_or_id: a local folder (Hugging Face or MLX layout) or a Hugging Face Hub id.
        lazy: leave the weights on disk until first use.
        kernels: "auto" (custom Metal kernels after a self-check), "custom" or "builtin", for this
            process; default: MLX_QWEN3_KERNELS, else auto.

    Returns:
        (model, tokenizer)
    """
    from .tokenizer import Tokenizer

    folder = resolve(str(path_or_id))
    model, _ = load_model(folder, lazy=lazy, kernels=kernels)
    tokenizer = Tokenizer.from_folder(folder)
    check_vocabulary(model, tokenizer)
    return model, tokenizer


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
