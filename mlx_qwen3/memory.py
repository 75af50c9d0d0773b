"""Memory, in one place: what this machine has for us, what the weights take, the wired limit held while
generating, and the budget for cached prompts."""

import logging
import os
import threading
from contextlib import contextmanager
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

log = logging.getLogger(__name__)


def recommended_working_set() -> Optional[int]:
    """The bytes Metal recommends keeping resident on this Mac; None off Metal."""
    return mx.device_info().get("max_recommended_working_set_size") if mx.metal.is_available() else None


def usable_memory() -> int:
    """What the model may take: the GPU's recommended working set on a Mac, physical memory elsewhere."""
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
