"""config.json -> ModelArgs -> Model -> sanitize -> (quantize) -> load_weights, from a folder or the Hub."""

import json
import re
import struct
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import UserError, run_cli
from .models import MODELS
from .models.base import weight_bytes

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


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise UserError(f"{folder} has no config.json; is it a Hugging Face or MLX model folder?")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e}); download it again") from None


def safetensors_header(file: Path) -> dict:
    """Read and check a safetensors header: a truncated or corrupt file is refused before any load."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        if n is None or n > size - 8:
            raise UserError(f"{file} is truncated or not a safetensors file; download or convert it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{file} has a corrupt header; download or convert it again") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UserError(
            f"{file} is truncated ({size} bytes, its header needs {8 + n + end}); download or convert it again"
        )
    return header


def weight_files(folder: Path) -> list:
    """The shards named by model.safetensors.index.json, or every *.safetensors in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{folder} lacks shards named in its index: {', '.join(missing[:3])}; download them again")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no *.safetensors weights (.bin and .gguf files are not supported)")
    return files


def read_weights(folder: Path) -> dict:
    """All tensors of the folder, lazily: MLX reads each from its file when first evaluated."""
    weights = {}
    for file in weight_files(folder):
        safetensors_header(file)
        weights.update(mx.load(str(file)))
    return weights


def build_model(config: dict) -> nn.Module:
    model_type = config.get("model_type")
    if model_type not in MODELS:
        raise UserError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODELS))}")
    module = MODELS[model_type]
    try:
        args = module.ModelArgs.from_dict(config)
        return module.Model(args)
    except (ValueError, TypeError) as e:
        raise UserError(f"config.json for {model_type}: {e}") from None


def _quantize(model: nn.Module, config: dict, weights: dict):
    """Turn the layers that have quantized weights (mlx-lm layout) into quantized layers."""
    if "quantization" not in config:
        method = (config.get("quantization_config") or {}).get("quant_method")
        if method:
            raise UserError(
                f"weights quantized with {method!r} are not supported; use the bf16 original "
                "(python -m mlx_qwen3.convert makes 4- and 8-bit MLX weights from it)"
            )
        return
    q = config["quantization"]

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        params = q.get(path)
        if isinstance(params, dict):
            return params
        # Not named per layer: infer bits and group size from the packed shapes.
        in_dims = module.weight.shape[-1]
        group_size = in_dims // weights[f"{path}.scales"].shape[-1]
        bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
        return {"group_size": group_size, "bits": bits, "mode": q.get("mode", "affine")}

    nn.quantize(model, q["group_size"], q["bits"], mode=q.get("mode", "affine"), class_predicate=predicate)


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


def _few(names: list, n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_model(path_or_id, lazy: bool = False, kernels: Optional[str] = None):
    """Load the model alone. Returns (model, config dict)."""
    if kernels is not None:
        _set_kernels(kernels)
    folder = resolve(str(path_or_id))
    config = read_config(folder)
    model = build_model(config)
    weights = model.sanitize(read_weights(folder))
    _quantize(model, config, weights)
    _check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
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
    return model, Tokenizer.from_folder(folder)


def _set_kernels(mode: str):
    from . import kernels

    try:
        kernels.set_mode(mode)
    except ValueError as e:
        raise UserError(str(e)) from None


def main():
    """`python -m mlx_qwen3.load MODEL`: load a model and print what it is, as JSON."""
    import click

    @click.command()
    @click.argument("model")
    def cli(model):
        m, config = load_model(model, lazy=True)
        print(json.dumps({
            "model_type": config["model_type"],
            "layers": len(m.layers),
            "weight_bytes": weight_bytes(m),
            "quantization": config.get("quantization"),
        }))

    run_cli(cli)


if __name__ == "__main__":
    main()
