"""A processed prompt on disk (--prompt-cache-file): save_prompt_cache writes a PromptCache to one
safetensors file, atomically; load_prompt_cache reads it back for a run of the same model and cache
setting, and refuses in one line a file made for another model, KV setting or rope factor, or a damaged one.

    prompt = prepare(model, tokenizer, "a long document... a question")
    cache = load_prompt_cache("doc.cache", model, prompt.setting)  # or PromptCache.new(model, prompt.setting)
    stream_generate(model, tokenizer, prompt, cache=cache)          # the shared prefix is not computed again
    save_prompt_cache("doc.cache", cache.copy(len(prompt.ids)), model)  # the prompt, not the reply
    chat.pool.put(load_prompt_cache("doc.cache", model))                # a ChatSession starts from it

The file holds each layer's keys and values as the layer holds them (16-bit, or 4/8-bit packed with their
scales and biases, or 16-bit still under its kv_start), the ids they hold, and in its metadata the format,
the model's identity (model_identity) and the CacheSetting.
"""

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import distributed
from .checkpoint import safetensors_header
from .errors import UserError
from .models.cache import CacheSetting, KVCache, PromptCache, QuantizedKVCache, make_cache

FORMAT = "mlx-qwen3 prompt cache 1"
SAMPLES = 64  # values read from each weight tensor for the model's identity


def model_identity(model) -> str:
    """A hash of the model's config and of a few values of every weight tensor (names, shapes, dtypes
    too): the same weights from any folder match, a fine-tune with the same shapes does not, and
    nothing like the whole of the weights is read."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.args), sort_keys=True, default=str).encode())
    params = tree_flatten(model.parameters())
    samples = []
    for _, p in params:
        flat = p.reshape(-1)
        samples.append(flat[:: max(1, flat.size // SAMPLES)][:SAMPLES])
    mx.eval(samples)
    for (name, p), s in zip(params, samples):
        h.update(f"{name} {p.shape} {p.dtype}".encode())
        h.update(np.array(s.view(mx.uint8)).tobytes())
    return h.hexdigest()[:16]


def save_prompt_cache(path, cache: PromptCache, model):
    """Write `cache` to `path`: a new file in the same folder, renamed over `path` once complete, so
    that `path` is always either the previous file or the whole new one.

    Args:
        path: the file to write (any name).
        cache: a PromptCache whose layers hold its ids (trim it to the prompt first: cache.copy(n)).
        model: the model that made it.
    """
    path = Path(path)
    _check_whole(model)
    if not cache.consistent:
        raise UserError(f"not saving {path}: the prompt cache does not hold its ids (a generation that failed?)")
    arrays = {"ids": mx.array(cache.ids, dtype=mx.int32)}
    for i, layer in enumerate(cache.layers):
        arrays.update(_layer_arrays(i, layer))
    bits, start, rope = cache.setting
    meta = {"format": FORMAT, "model": model_identity(model), "kv_bits": str(bits or 16), "kv_start": str(start),
            "rope_factor": repr(float(rope))}
    tmp = None
    try:
        # readable by its owner only (mkstemp's mode), as the prompt it holds may be private
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            mx.save_safetensors(f, arrays, metadata=meta)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old file or the new one
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); it is unchanged") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _layer_arrays(i: int, layer) -> dict:
    """One layer's positions as `i.keys`/`i.values` (16-bit) or `i.keys.0`..`i.values.2` (packed, scales, biases)."""
    n = layer.offset
    if isinstance(layer, QuantizedKVCache) and layer.quantized:
        if layer.keys is None:
            return {}
        return {f"{i}.{name}.{j}": a[..., :n, :]
                for name, held in (("keys", layer.keys), ("values", layer.values)) for j, a in enumerate(held)}
    plain = layer.plain if isinstance(layer, QuantizedKVCache) else layer
    if plain.keys is None:
        return {}
    return {f"{i}.keys": plain.keys[..., :n, :], f"{i}.values": plain.values[..., :n, :]}


def read_setting(path) -> CacheSetting:
    """The CacheSetting a prompt cache file was made with, from its header alone (a quick check before a
    model loads); a file that is not one, or is damaged, is refused in one line."""
    return _setting(path, _metadata(path))


def load_prompt_cache(path, model, setting: Optional[CacheSetting] = None) -> PromptCache:
    """Read a prompt cache file written by save_prompt_cache for `model`.

    Args:
        path: the file.
        model: the model this run uses; a file made for another is refused.
        setting: this run's CacheSetting (Prompt.setting); a file made with another KV setting or rope
            factor is refused. None: the file's own setting (a cache is reused only for prompts of it).

    Returns:
        A PromptCache holding the file's ids, ready for stream_generate(cache=...).
    """
    path = Path(path)
    _check_whole(model)
    meta = _metadata(path)
    made = _setting(path, meta)
    if meta.get("model") != model_identity(model):
        raise UserError(f"{path}: the prompt cache file was made for another model; give this model's file "
                        "or another path")
    if setting is not None:
        check_setting(path, made, setting)
    try:
        arrays = mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError, OSError) as e:
        raise _damaged(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    ids = arrays.pop("ids", None)
    if ids is None or ids.ndim != 1 or ids.dtype != mx.int32:
        raise _damaged(path, "no ids")
    ids = ids.tolist()
    if any(not 0 <= t < model.args.vocab_size for t in ids) or len(ids) >= model.args.context_window:
        raise _damaged(path, "ids past the model's vocabulary or context window")
    layers = make_cache(model, *made)
    for i, layer in enumerate(layers):
        _fill(path, layer, i, arrays, len(ids), model.args)
    if arrays:
        raise _damaged(path, f"unexpected arrays ({', '.join(sorted(arrays)[:3])})")
    return PromptCache(layers, ids, made)


def check_setting(path, made: CacheSetting, run: CacheSetting):
    """Refuse, in one line saying what to do, a file made with another setting than this run's."""
    if (made.kv_bits, made.kv_start if made.kv_bits else 0) != (run.kv_bits, run.kv_start if run.kv_bits else 0):
        raise UserError(f"{path} was made with {_kv(made)}; this run uses {_kv(run)}: run with {_flags(made)}, "
                        "or give another file")
    # a larger factor covers this run's context too (the cache keeps its factor; models/rope.py)
    if run.rope_factor is not None and made.rope_factor < run.rope_factor:
        raise UserError(f"{path} was made with rope factor {made.rope_factor:g}; this run's context needs "
                        f"{run.rope_factor:g}: give a file made for a context of this length (a larger --max-tokens "
                        "when it was made), or another file")


def _kv(s: CacheSetting) -> str:
    if s.kv_bits is None:
        return "16-bit KV"
    return f"{s.kv_bits}-bit KV" + (f" from position {s.kv_start}" if s.kv_start else "")


def _flags(s: CacheSetting) -> str:
    if s.kv_bits is None:
        return "no --kv-bits"
    return f"--kv-bits {s.kv_bits}" + (f" --kv-start {s.kv_start}" if s.kv_start else "")


def _damaged(path, why: str) -> UserError:
    return UserError(f"{path} is not a prompt cache file, or it is damaged ({why}): give another file, or "
                     "remove it to make a new one")


def _metadata(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a file; give a prompt cache file")
    try:
        header = safetensors_header(path)
    except UserError as e:  # its advice is for model weights: keep only what it found
        found = str(e).split(";")[0].removeprefix(str(path)).strip()
        raise _damaged(path, "it " + found if found.startswith(("is ", "has ")) else found) from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        found = meta.get("format")
        raise _damaged(path, f"format {found!r}, this version reads {FORMAT!r}" if found else "no format")
    return meta


def _setting(path, meta: dict) -> CacheSetting:
    try:
        bits, start, rope = int(meta["kv_bits"]), int(meta["kv_start"]), float(meta["rope_factor"])
    except (KeyError, ValueError):
        raise _damaged(path, "its setting is unreadable") from None
    if bits not in (4, 8, 16) or start < 0 or not rope >= 1:
        raise _damaged(path, "its setting is out of range")
    return CacheSetting(None if bits == 16 else bits, start if bits != 16 else 0, rope)


def _fill(path, layer, i: int, arrays: dict, n: int, args):
    """Put layer i's arrays from the file into a new layer cache made with the file's setting, once their
    shapes and dtypes are those the model's attention takes (never a crash mid-generation)."""
    quantized = f"{i}.keys.0" in arrays
    if quantized and isinstance(layer, KVCache):
        raise _damaged(path, f"layer {i} is quantized in a 16-bit file")
    D = args.dims_per_head
    if quantized:
        names = [f"{i}.{k}.{j}" for k in ("keys", "values") for j in range(3)]
        packed, groups = (D * layer.bits // 32, mx.uint32), (D // layer.group_size, None)
        want = [packed, groups, groups] * 2
    else:
        names, want = [f"{i}.keys", f"{i}.values"], [(D, None)] * 2
    held = [arrays.pop(name, None) for name in names]
    if n == 0 and all(a is None for a in held):
        return
    for a, name, (last, dtype) in zip(held, names, want):
        dtypes = (dtype,) if dtype else (mx.float16, mx.bfloat16, mx.float32)
        if a is None or a.shape != (1, args.num_key_value_heads, n, last) or a.dtype not in dtypes:
            raise _damaged(path, f"{name} is missing, or not of this model's shape and kind")
    if isinstance(layer, KVCache):
        layer.keys, layer.values = held
    elif quantized:
        layer.plain, layer.keys, layer.values = None, tuple(held[:3]), tuple(held[3:])
    elif layer.plain is not None and n < layer.start:
        layer.plain.keys, layer.plain.values = held
        layer.plain.offset = n
    else:
        raise _damaged(path, f"layer {i} holds {n} positions 16-bit, past its kv_start {layer.start}")
    layer.offset = n


def _check_whole(model):
    group = distributed.group_of(model)
    if group is not None:
        raise UserError(f"a prompt cache file needs the whole model in one process; this one is split across "
                        f"{group.size()} ranks: run without --prompt-cache-file")


def check_file(path, kv_bits="auto", kv_start: int = 0, chat: bool = False) -> Optional[CacheSetting]:
    """Before a model loads (the CLI): the setting `path` was made with, or None if it does not exist. One
    that exists is checked as far as its header and this run's kv_bits ("auto": the file's), kv_start
    allow; one that does not needs a folder to be written in."""
    path = Path(path)
    if path.exists():
        made = read_setting(path)
        if kv_bits != "auto":
            run = CacheSetting(None if kv_bits == 16 else kv_bits, kv_start, made.rope_factor)
            check_setting(path, made, run)
        return made
    if chat:
        raise UserError(f"{path} does not exist: --chat starts from a prompt cache file made by a --prompt run "
                        "(the same --system and document)")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} is not a folder: give a --prompt-cache-file in an existing folder")
    return None
