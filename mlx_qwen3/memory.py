"""Memory, in one place: what this machine has for us, what the weights take, the wired limit held while
generating, the budget for cached prompts, and the plan (weights + KV cache + working memory against
what this Mac keeps resident)."""

import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import UserError

log = logging.getLogger(__name__)


def recommended_working_set() -> Optional[int]:
    """The bytes Metal recommends keeping resident on this Mac; None off Metal."""
    return mx.device_info().get("max_recommended_working_set_size") if mx.metal.is_available() else None


def usable_memory() -> int:
    """What the model may take: MLX_QWEN3_MEMORY_GB if set, else the GPU's recommended working set on a
    Mac, physical memory elsewhere."""
    if os.environ.get("MLX_QWEN3_MEMORY_GB"):
        try:
            gb = float(os.environ["MLX_QWEN3_MEMORY_GB"])
        except ValueError:
            gb = -1
        if not gb > 0:
            raise UserError(f"MLX_QWEN3_MEMORY_GB={os.environ['MLX_QWEN3_MEMORY_GB']!r} is not a positive "
                            "number of GB; unset it, or give e.g. 48")
        return int(gb * 2**30)
    return recommended_working_set() or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def weight_bytes(model) -> int:
    """The bytes the model's parameters take (quantized weights with their scales and biases)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def cache_budget(model) -> int:
    """The default bytes for cached prompts: a quarter of the memory the weights leave free."""
    return max(0, usable_memory() - weight_bytes(model)) // 4


class WiredLimit:
    """While any generation runs, keep up to the GPU's recommended working set wired (as mlx-lm does), so
    macOS does not page the weights out between tokens; the old limit returns when the last one ends.
    The limit is the process's, so one instance (`wired`) serves every model; off Metal it does nothing."""

    def __init__(self):
        self._lock = threading.Lock()
        self.users = 0  # generations running
        self._old = 0
        self._warned = False  # that the weights do not fit: said once

    @contextmanager
    def hold(self, model):
        limit = recommended_working_set()
        if not limit:
            yield
            return
        with self._lock:
            if self.users == 0:
                if not self._warned and weight_bytes(model) > 0.9 * limit:
                    self._warned = True
                    log.warning("the weights take %d MB of the %d MB Metal keeps resident; generation may be slow",
                                weight_bytes(model) // 2**20, limit // 2**20)
                self._old = mx.set_wired_limit(limit)
            self.users += 1
        try:
            yield
        finally:
            with self._lock:
                self.users -= 1
                if self.users == 0:
                    mx.synchronize()  # the limit must not change under a running evaluation
                    mx.set_wired_limit(self._old)


wired = WiredLimit()


# ---- the plan: does a context fit? ----

KV_SETTINGS = (16, 8, 4)  # KV cache bits: float16, or quantized in groups of KV_GROUP
KV_GROUP = 64
CHUNK = 512  # prompt tokens processed at once (generate.process_prompt)


def kv_bytes_per_token(args, bits: int) -> float:
    """The KV cache's bytes per token: keys and values of every layer; quantized ones carry a float16
    scale and bias per group."""
    per_value = 2.0 if bits == 16 else bits / 8 + 4 / KV_GROUP
    return args.num_hidden_layers * 2 * args.num_key_value_heads * args.dims_per_head * per_value


def working_bytes(args, context: int, bits: int = 16) -> int:
    """Memory a step needs besides weights and cache, at most: a prompt chunk's activations (its MLP
    widest), the last logits, and over a quantized cache the chunk's attention scores against the whole
    context (float32, one layer at a time; over float16 Metal's fused attention keeps no scores)."""
    wide = max(args.intermediate_size,
               getattr(args, "moe_intermediate_size", 0) * getattr(args, "num_experts_per_tok", 0))
    activations = CHUNK * (4 * args.hidden_size + 3 * wide) * 4
    return int(activations + args.vocab_size * 4 + _scores_per_token(args, bits) * context)


def _scores_per_token(args, bits: int) -> int:
    return 0 if bits == 16 else CHUNK * args.num_attention_heads * 4


def plan(args, weights: int, context: int, limit: int) -> list:
    """For each KV setting: the bytes weights + KV + working memory take at `context` tokens, whether that
    fits in `limit`, and the longest context that does (0: not even the weights and one chunk)."""
    rows = []
    for bits in KV_SETTINGS:
        per_token = kv_bytes_per_token(args, bits)
        kv = int(per_token * context)
        total = weights + kv + working_bytes(args, context, bits)
        fixed = weights + working_bytes(args, 0, bits)
        slope = per_token + _scores_per_token(args, bits)  # what grows with the context
        longest = max(0, min(args.context_window, int((limit - fixed) / slope)))
        rows.append({"kv_bits": bits, "kv_bytes": kv, "total_bytes": total, "fits": total <= limit,
                     "longest_context": longest})
    return rows


def planned_context(args, prompt_tokens: int, max_tokens: int) -> int:
    """The tokens a prompt's cache is planned for: the prompt and max_tokens, within the window."""
    return min(prompt_tokens + max_tokens, args.context_window)


# ---- what the plan compares with, and one generation's KV setting ----

AUTO = "auto"  # kv_bits: the least quantization that fits


@dataclass(frozen=True)
class Resident:
    """The weights' bytes and the memory they and the caches may take (`limit`). `where` names it in
    messages ("this Mac's 21.3 GB")."""

    weights: int
    limit: int
    where: str


def resident(model) -> Resident:
    """What a plan for `model` compares with: on a sharded model the figures every rank agreed on at load
    (agree_resident); otherwise this process's, now."""
    agreed = getattr(model, "resident", None)
    if agreed is not None:
        return agreed
    limit = usable_memory()
    return Resident(weight_bytes(model), limit, f"this Mac's {limit / 2**30:.1f} GB")


def kv_share(model) -> float:
    """The part of the whole model's KV cache this rank's share holds (its layers, its key/value heads)."""
    args = model.args
    # a tensor-parallel block is wrapped (shard.Summed): its attention is its `block`
    heads = sum(getattr(layer.self_attn, "block", layer.self_attn).n_kv_heads for layer in model.layers)
    return heads / (args.num_hidden_layers * args.num_key_value_heads)


def agree_resident(model, group) -> Resident:
    """On a model sharded over `group` (every rank calls it at once): rank r, holding its weights w_r and
    kv_share s_r of the cache, fits KV + working memory K when w_r + s_r * K <= limit_r, that is when
    K <= (limit_r - w_r) / s_r. The ranks agree on the smallest such headroom (the working memory scaled
    by the share too: an approximation), so every rank plans a prompt alike: another KV setting on one
    rank would be another cache there, and a deadlock."""
    from . import distributed

    mine = {"weights": weight_bytes(model), "headroom": (usable_memory() - weight_bytes(model)) / kv_share(model)}
    every = distributed.gather(mine, group)
    weights = sum(r["weights"] for r in every)
    headroom = min(r["headroom"] for r in every)
    limit = weights + max(0, int(headroom))
    return Resident(weights, limit, f"{len(every)} ranks' memory (as one model: {limit / 2**30:.1f} GB)")


def kv_setting(model, kv_bits, kv_start: int, prompt_tokens: int, context: int) -> tuple:
    """The (kv_bits, kv_start) a cache planned for `context` tokens is made with (CacheSetting's: kv_bits
    None is 16-bit): `kv_bits` "auto" (or None) picks the least quantization that fits (16, else 8, else 4);
    16, 8 or 4 is taken if it fits. A kv_start keeps the first positions 16-bit: those must fit too.
    Otherwise a UserError (code context_length_exceeded) saying the longest context each setting fits.
    """
    at = resident(model)
    args = model.args
    rows = plan(args, at.weights, context, at.limit)
    wanted = KV_SETTINGS if kv_bits in (None, AUTO) else (kv_bits,)
    for row in rows:
        bits = row["kv_bits"]
        if bits not in wanted or not row["fits"]:
            continue
        if bits == 16:
            return None, 0
        if not kv_start or plan(args, at.weights, min(context, kv_start), at.limit)[0]["fits"]:
            return bits, kv_start
    longest = ", ".join(f"{r['longest_context']:,} at {r['kv_bits']}-bit" for r in rows)
    chosen = "" if len(wanted) > 1 else f" with {kv_bits}-bit KV" + (f" from token {kv_start:,}" if kv_start else "")
    advice = ("lower max_tokens or shorten the prompt" if len(wanted) > 1 else
              "lower max_tokens, shorten the prompt, or set kv_bits (--kv-bits) to auto or fewer bits")
    raise UserError(f"this request plans {context:,} tokens (prompt {prompt_tokens:,} + max_tokens "
                    f"{context - prompt_tokens:,}){chosen}; with {at.where} the longest that fits is {longest} KV: "
                    f"{advice}", "messages", "context_length_exceeded")


def kv_bytes(args, setting, positions: int, allocated: Optional[int] = None) -> int:
    """The planned bytes of a cache made with `setting` (a CacheSetting) holding `positions` (in
    `allocated` positions, by default as many): 16-bit until its kv_start, all quantized after."""
    quantized = setting.kv_bits is not None and positions >= setting.kv_start
    return int(kv_bytes_per_token(args, setting.kv_bits if quantized else 16) * (allocated or positions))


def planned_bytes(args, setting, prompt_tokens: int, max_tokens: int) -> tuple:
    """(KV bytes, working bytes) a prompt's generation plans at most: its cache made with `setting` (a
    CacheSetting) filled to the planned context (its 16-bit start counted too), and a step's working memory."""
    context = planned_context(args, prompt_tokens, max_tokens)
    kv = kv_bytes(args, setting, context)
    if setting.kv_start:  # before the switch, its 16-bit positions may take more
        kv = max(kv, kv_bytes(args, setting, min(context, setting.kv_start - 1)))
    return kv, working_bytes(args, context, setting.kv_bits or 16)


def check_loadable(args, weights: int, limit: int, ranks: int = 1):
    """Refuse (UserError), before reading them, `weights` bytes that with the working memory of one prompt
    chunk do not fit `limit`. `ranks`: the model is shared by so many (`weights` is this rank's part)."""
    need = weights + working_bytes(args, CHUNK)
    if need > limit:
        part = f"this rank's part of the weights (1/{ranks})" if ranks > 1 else "the weights"
        raise UserError(f"{part} and a prompt's working memory take {need / 2**30:.1f} GB, more than the "
                        f"{limit / 2**30:.1f} GB this Mac keeps resident: use a smaller or more quantized model"
                        + (", or more Macs" if ranks > 1 else ""))


if __name__ == "__main__":  # python -m mlx_qwen3.memory is `mlx-qwen3 plan`
    from .cli import main
    main("plan")
