"""Memory, in one place: what this machine has for us, what the weights take, the wired limit held while
generating, the budget for cached prompts, and the plan (weights + KV cache + working memory against
what this Mac keeps resident)."""

import logging
import os
import threading
from contextlib import contextmanager
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


if __name__ == "__main__":  # python -m mlx_qwen3.memory is `mlx-qwen3 plan`
    from .cli import main
    main("plan")
