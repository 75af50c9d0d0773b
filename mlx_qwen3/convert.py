"""Hugging Face safetensors -> MLX folder (float or quantized), streamed tensor by tensor and atomic.

The same path as loading (resolve -> config -> model -> sanitize), then each output tensor is
computed lazily and written straight to its shard, so peak memory is about one tensor, not the model.
"""

import json
import logging
import os
import re
import shutil
import signal
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from . import __version__
from .checkpoint import read_config, read_weights, resolve
from .errors import UserError
from .load import build_model, check_weights
from .models.config import normalize_config

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = ("bfloat16", "float16", "float32")
MAX_SHARD_BYTES = 5 * 10**9
# Beside the weights: tokenizer, chat template, generation defaults.
SIDE_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
]
_ST_DTYPES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32"}
log = logging.getLogger(__name__)
_MIXED = re.compile(r"^mixed_([234568])_([234568])$")  # the bit widths MLX packs


@dataclass(frozen=True)
class QuantPolicy:
    """How each layer is quantized; `mixed` is (low bits, high bits) for a mixed recipe."""

    bits: int = 4
    group_size: int = 64
    mixed: Optional[tuple] = None
    quantize_embeddings: bool = True

    def params(self, path: str, module: nn.Module, num_layers: int):
        """-> {"group_size", "bits", "mode"} for a layer to quantize, or False to keep it float."""
        if not hasattr(module, "to_quantized"):
            return False  # norms
        if path.endswith("mlp.gate"):
            return False  # the MoE router: see README, "Quantization"
        if not self.quantize_embeddings and path.split(".")[-1] in ("embed_tokens", "lm_head"):
            return False
        if module.weight.shape[-1] % self.group_size:
            return False
        bits = self.bits
        if self.mixed:
            low, high = self.mixed
            bits = high if _sensitive(path, num_layers) else low
        return {"group_size": self.group_size, "bits": bits, "mode": "affine"}


def _sensitive(path: str, num_layers: int) -> bool:
    """The layers a mixed recipe gives more bits (after llama.cpp's Q4_K_M, as mlx-lm does)."""
    if path.endswith("lm_head"):
        return True
    m = re.search(r"layers\.(\d+)\.", path)
    if not m or not re.search(r"(v_proj|down_proj)$", path):
        return False
    i, n = int(m.group(1)), num_layers
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def parse_mixed(recipe: Optional[str]):
    if recipe is None:
        return None
    m = _MIXED.match(recipe)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise UserError(
            f"--mixed {recipe!r} is not a recipe; use mixed_LOW_HIGH with bits from 2, 3, 4, 5, 6, 8 "
            "and LOW < HIGH, e.g. mixed_4_6 or mixed_4_8"
        )
    return int(m.group(1)), int(m.group(2))


def convert(
    hf_path: str,
    mlx_path: str,
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    dtype: Optional[str] = None,
    mixed: Optional[str] = None,
    quantize_embeddings: bool = True,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Optional[Callable[[int, int, int, int], None]] = None,
) -> Path:
    """Convert a Hugging Face checkpoint (folder or Hub id) into an MLX folder at `mlx_path`.

    Args:
        hf_path: a local folder or a Hugging Face Hub id.
        mlx_path: the folder to create; refused if it exists unless `force`.
        quantize: quantize with `bits` and `group_size` (affine); a `mixed` recipe implies it.
        dtype: bfloat16, float16 or float32 for what stays float; default: the checkpoint's own.
        mixed: a recipe mixed_LOW_HIGH: HIGH bits for v_proj/down_proj in the first and last
            eighth of the layers (and every third in between) and for lm_head, LOW for the rest.
        quantize_embeddings: quantize embed_tokens and lm_head too.
        progress: called after each tensor written, with (tensors written, tensors in all, bytes
            written, bytes in all); the CLI's bar on a terminal.

    Returns:
        The path of the written folder.
    """
    policy = _check_options(quantize, bits, group_size, dtype, mixed, quantize_embeddings)
    src = resolve(hf_path)
    out = _check_output(src, mlx_path, force)

    config = read_config(src)
    if "quantization" in config:
        raise UserError(f"{src} is already an MLX quantized folder; convert from the original checkpoint")
    model = build_model(config, src)  # parameters stay lazy: never evaluated, never in memory
    weights = model.sanitize(read_weights(src))
    check_weights(model, weights)
    dtype = dtype or config.get("torch_dtype") or config.get("dtype")
    target = getattr(mx, dtype) if dtype in DTYPES else None

    tensors, quant_config = _output_tensors(model, weights, policy, target)
    side_files = [src / name for name in SIDE_FILES if (src / name).is_file()]
    nbytes = sum(t.nbytes for t in tensors.values())
    _check_disk(out, nbytes + sum(f.stat().st_size for f in side_files))

    tmp, old = (out.parent / f".{out.name}.{kind}-{os.getpid()}" for kind in ("partial", "old"))
    swapped = False
    try:
        try:
            tmp.mkdir(parents=True)
            _write_shards(tmp, tensors, max_shard_bytes, _tally(len(tensors), nbytes, progress))
            _write_config(tmp / "config.json", config, quant_config, dtype if target else None)
            for f in side_files:
                shutil.copy(f, tmp / f.name)
            # The old folder aside, the new one in, the old one gone: one step for Ctrl-C and SIGTERM.
            with _interrupts_deferred():
                if _has_entries(out):
                    out.rename(old)
                try:
                    tmp.rename(out)
                except OSError:
                    if old.exists():
                        old.rename(out)  # back in place before anyone is told what OUT holds
                    raise
                swapped = True
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except KeyboardInterrupt:
        raise Interrupted(f"{out} holds the new conversion" if swapped else _unchanged(out)) from None
    except OSError as e:
        raise UserError(f"could not write {out}: {e.strerror or e}; {_unchanged(out)}") from None
    return out


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a conversion; the message says what the output folder holds."""


def _unchanged(out: Path) -> str:
    return f"{out} is as it was" if out.exists() else f"nothing was written to {out}"


def _has_entries(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


@contextmanager
def _interrupts_deferred():
    """Ctrl-C and SIGTERM that arrive inside the block take effect at its end (main thread only:
    signal handlers can be set nowhere else)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {s: signal.signal(s, lambda signum, _: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            raise KeyboardInterrupt


def _check_options(quantize, bits, group_size, dtype, mixed, quantize_embeddings) -> Optional[QuantPolicy]:
    if bits not in BITS:
        raise UserError(f"--bits {bits} is not supported; use 4 or 8 (or a --mixed recipe)")
    if group_size not in GROUP_SIZES:
        raise UserError(f"--group-size {group_size} is not supported; use 32, 64 or 128")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not supported; use {', '.join(DTYPES)}")
    recipe = parse_mixed(mixed)
    if not (quantize or recipe):
        return None
    return QuantPolicy(recipe[0] if recipe else bits, group_size, recipe, quantize_embeddings)


def _check_output(src: Path, mlx_path, force: bool) -> Path:
    """The output folder, absolute; refused where writing it could lose anything."""
    if not str(mlx_path).strip():
        raise UserError("--mlx-path is empty; name the folder to create")
    out = Path(mlx_path).expanduser().absolute()
    src, real = src.resolve(), out.resolve()
    if real == src or src in real.parents:
        raise UserError(f"the output {out} is inside the input folder {src}; write it somewhere else")
    if src.is_relative_to(real):
        raise UserError(f"the output {out} holds the input folder {src}; write it somewhere else")
    if real in (Path(real.anchor), Path.home().resolve()) or Path.cwd().resolve().is_relative_to(real):
        raise UserError(f"the output {out} is the root, home or current folder (or holds it); name a new folder")
    _recover(out)
    if not out.exists() and not out.is_symlink() or out.is_dir() and not out.is_symlink() and not _has_entries(out):
        return out  # nothing there to lose (an empty folder is filled)
    if not force:
        raise UserError(f"{out} exists; pass --force to replace it (an earlier conversion only), or choose another --mlx-path")
    why = _not_a_conversion(out)
    if why:
        raise UserError(f"refusing to replace {out}: {why}; remove it yourself or choose another --mlx-path")
    return out


# What a conversion (ours or mlx-lm's) leaves in its folder; --force replaces no folder holding anything else.
_OUTPUT_FILES = re.compile(r"^(config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
                           r"|README\.md|\.DS_Store)$")


def _not_a_conversion(out: Path) -> Optional[str]:
    """Why --force may not replace `out`, or None where it is an earlier MLX conversion and nothing else."""
    if out.is_symlink():
        return "it is a symbolic link"
    if not out.is_dir():
        return "it is not a folder"
    odd = sorted(p.name for p in out.iterdir()
                 if p.is_symlink() or not p.is_file() or not (_OUTPUT_FILES.match(p.name) or p.name in SIDE_FILES))
    if odd:
        return f"it holds what a conversion does not write ({', '.join(odd[:3])})"
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    ours = isinstance(config, dict) and str(config.get("converted_by", "")).startswith("mlx-qwen3")
    mlx_lm = isinstance(config, dict) and isinstance(config.get("quantization"), dict)
    if not (ours or mlx_lm) or not list(out.glob("*.safetensors")):
        return "it is not an earlier MLX conversion (weights and a config.json marked by mlx-qwen3 or quantized by mlx-lm)"
    return None


def _check_disk(out: Path, nbytes: int):
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise UserError(
            f"not enough free disk at {parent}: the output needs {_size(nbytes)}, {_size(free)} are free"
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _recover(out: Path):
    """What a conversion killed outright (SIGKILL) left beside `out`: its partial folder goes; an old
    folder it had set aside goes back in place if the new one never went in, else it goes too."""
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        kind, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if not p.name.startswith(f".{out.name}.") or kind not in ("partial", "old") or not pid.isdigit() \
                or int(pid) != os.getpid() and _alive(int(pid)):  # ours: left by a killed run with our pid
            continue
        if kind == "old" and not out.exists():
            p.rename(out)
            log.warning("restored %s, which a conversion killed while replacing it had set aside", out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _output_tensors(model: nn.Module, weights: dict, policy: Optional[QuantPolicy], dtype):
    """Every output tensor, lazily, in the model's order; and the per-layer quantization record."""
    if dtype is not None:  # in place: no reference to a source tensor may outlive its use
        for k, v in weights.items():
            if mx.issubdtype(v.dtype, mx.floating):
                weights[k] = v.astype(dtype)
    if policy is None:
        return weights, None

    default = {"group_size": policy.group_size, "bits": policy.bits, "mode": "affine"}
    record = dict(default)
    out = {}
    num_layers = len(model.layers)
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        params = policy.params(path, module, num_layers)
        if params != default:
            record[path] = params  # mlx-lm's layout: per-layer entries, False for float
        if params:
            w = weights.pop(f"{path}.weight")
            q, scales, biases = mx.quantize(w, params["group_size"], params["bits"])
            out.update({f"{path}.weight": q, f"{path}.scales": scales, f"{path}.biases": biases})
    out.update(weights)
    return dict(sorted(out.items(), key=lambda kv: _natural(kv[0]))), record


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _tally(total_tensors: int, total_bytes: int, progress: Optional[Callable]) -> Optional[Callable[[int], None]]:
    """write_safetensors' `written` callback: counts the tensors and bytes and tells `progress`."""
    if progress is None:
        return None
    tensors = done = 0

    def written(nbytes: int):
        nonlocal tensors, done
        tensors, done = tensors + 1, done + nbytes
        progress(tensors, total_tensors, done, total_bytes)

    return written


def _write_shards(folder: Path, tensors: dict, max_bytes: int, written: Optional[Callable[[int], None]] = None):
    """Split into shards of at most `max_bytes` and write each with its index; `written(nbytes)` after
    each tensor."""
    shards, size = [[]], 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t.nbytes
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(folder / file, {k: tensors.pop(k) for k in names}, written)
        weight_map.update({k: file for k in names})
    total = sum(os.path.getsize(folder / f) for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def write_safetensors(file: Path, tensors: dict, written: Optional[Callable[[int], None]] = None):
    """Write the header from the (lazy) shapes, then evaluate and write one tensor at a time;
    `written(nbytes)` after each."""
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "mlx"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in list(tensors):
            t = mx.contiguous(tensors.pop(name))
            if t.dtype == mx.bfloat16:
                t = t.view(mx.uint16)  # the buffer protocol has no bfloat16
            mx.eval(t)
            f.write(memoryview(t))
            if written is not None:
                written(t.nbytes)
            del t


def _write_config(file: Path, config: dict, quant: Optional[dict], dtype: Optional[str]):
    config = normalize_config(config)  # the Hub's spellings, which mlx-lm reads, beside transformers 5's
    for key in ("torch_dtype", "dtype"):
        if dtype and key in config:
            config[key] = dtype
    config["converted_by"] = f"mlx-qwen3 {__version__}"  # what lets --force replace this folder later
    if quant:
        config["quantization"] = quant
        config["quantization_config"] = quant  # transformers-style tools look here
    file.write_text(json.dumps(config, indent=2))


if __name__ == "__main__":  # python -m mlx_qwen3.convert is `mlx-qwen3 convert`
    from .cli import main
    main("convert")
