"""KV caches: one layer's keys and values (KVCache), a prompt's caches with the ids they hold
(PromptCache), and a bounded pool of them to start new requests from (PromptCachePool).

Quantized keys/values (QuantizedKVCache) have the same per-layer interface (offset, update_and_fetch,
trim, copy, nbytes, state), chosen where the layers are made (`make_cache`); PromptCache, the pool and
the generator only ever call that interface. Its update_and_fetch returns (packed, scales, biases)
tuples, which Attention recognises.

Built for what comes next, without changing the two classes above the layers:
- A tensor-parallel model: each machine's attention holds only its share of the heads, so its
  KVCache simply holds those; the ids are the same on every machine, and `nbytes` is this machine's.
- Several rows decoded together (decode.py): a PromptCache is one row, and each layer of a batched call
  takes the rows' caches of that layer as Rows, with each row's number of real tokens: the projections
  and MLPs run once for all rows, each row attends over its own cache (its own length, kind and rope
  factor), so rows join, leave and rewind (speculative decoding) independently.
"""

import threading
from typing import NamedTuple, Optional

import mlx.core as mx

from ..errors import UserError


class CacheSetting(NamedTuple):
    """How a prompt's caches are made. A cache is reused only for the same setting: its keys were
    rotated with its rope factor, and its layers hold its kind of keys and values."""

    kv_bits: Optional[int] = None  # None: 16-bit
    kv_start: int = 0  # with kv_bits: the positions kept 16-bit before the layer quantizes
    rope_factor: Optional[float] = None  # the YaRN factor every position is rotated with (1: plain RoPE;
    # None: the factor of the model's whole window, which PromptCache.new puts in its place)


def normal(setting: CacheSetting) -> CacheSetting:
    """16-bit from the start is one setting, whatever kv_start says."""
    return setting._replace(kv_start=0) if setting.kv_bits is None else setting


class KVCache:
    """Keys and values of one layer, preallocated in steps of `step` positions."""

    step = 256
    rope_factor = 1.0  # what Attention rotates this layer's keys with (make_cache sets it)

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        B, H, L, _ = keys.shape
        prev = self.offset
        if self.keys is None or prev + L > self.keys.shape[2]:
            n = ((prev + L + self.step - 1) // self.step) * self.step
            k = mx.zeros((B, H, n, keys.shape[3]), keys.dtype)
            v = mx.zeros((B, H, n, values.shape[3]), values.dtype)
            if self.keys is not None:
                k[..., :prev, :] = self.keys[..., :prev, :]
                v[..., :prev, :] = self.values[..., :prev, :]
            self.keys, self.values = k, v
        self.offset += L
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (to rewind to a shared prefix); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self):
        return [] if self.keys is None else [self.keys, self.values]

    def copy(self, n: int) -> "KVCache":
        """A new cache holding this one's first `n` positions; this one is left as it is."""
        c = KVCache()
        c.rope_factor = self.rope_factor
        if self.keys is not None and n > 0:
            c.keys, c.values, c.offset = self.keys[..., :n, :], self.values[..., :n, :], n
        return c

    @property
    def nbytes(self) -> int:
        """Memory held, preallocated positions included."""
        return sum(a.nbytes for a in self.state)


class QuantizedKVCache:
    """Keys and values of one layer quantized to `bits` (4 or 8) in groups of `group_size` along the
    head dimension, preallocated in steps like KVCache.

    With `start` > 0 the layer holds plain keys and values (a KVCache) until it holds `start` positions,
    then quantizes them in place, once, and stays quantized (a trim back below `start` too): the first
    `start` tokens of every prompt cost 16 bits and attend at full precision before the switch."""

    step = 256
    rope_factor = 1.0

    def __init__(self, bits: int, group_size: int = 64, start: int = 0):
        self.bits, self.group_size, self.start = bits, group_size, start
        self.plain = KVCache() if start > 0 else None
        self.keys = self.values = None  # (packed, scales, biases) each
        self.offset = 0

    @property
    def quantized(self) -> bool:
        return self.plain is None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if not self.quantized:
            k, v = self.plain.update_and_fetch(keys, values)
            self.offset = self.plain.offset
            if self.offset < self.start:
                return k, v
            self.plain, self.offset = None, 0  # the switch: all held so far is quantized now
            keys, values = k, v
        B, H, L, D = keys.shape
        prev = self.offset
        if self.keys is None or prev + L > self.keys[0].shape[2]:
            n = ((prev + L + self.step - 1) // self.step) * self.step
            k = self._empty(B, H, n, D, keys.dtype)
            v = self._empty(B, H, n, values.shape[3], values.dtype)
            if self.keys is not None:
                for new, old in zip(k + v, self.keys + self.values):
                    new[..., :prev, :] = old[..., :prev, :]
            self.keys, self.values = k, v
        self.offset += L
        for held, new in ((self.keys, keys), (self.values, values)):
            for a, q in zip(held, mx.quantize(new, self.group_size, self.bits)):
                a[..., prev : self.offset, :] = q
        return (tuple(a[..., : self.offset, :] for a in self.keys),
                tuple(a[..., : self.offset, :] for a in self.values))

    def _empty(self, B, H, n, D, dtype):
        if D % self.group_size:
            raise ValueError(f"a quantized KV cache needs a head_dim divisible by its group size "
                             f"{self.group_size}, not {D}")
        return (mx.zeros((B, H, n, D * self.bits // 32), mx.uint32),
                mx.zeros((B, H, n, D // self.group_size), dtype),
                mx.zeros((B, H, n, D // self.group_size), dtype))

    def trim(self, n: int) -> int:
        """Forget the last `n` positions; returns how many were dropped."""
        if not self.quantized:
            n = self.plain.trim(n)
            self.offset = self.plain.offset
            return n
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self):
        if not self.quantized:
            return self.plain.state
        return [] if self.keys is None else [*self.keys, *self.values]

    def copy(self, n: int) -> "QuantizedKVCache":
        """A new cache holding this one's first `n` positions; this one is left as it is."""
        c = QuantizedKVCache(self.bits, self.group_size, self.start)
        c.rope_factor = self.rope_factor
        if not self.quantized:
            c.plain = self.plain.copy(n)
            c.offset = c.plain.offset
        else:
            c.plain = None
            if self.keys is not None and n > 0:
                n = min(n, self.offset)
                c.keys = tuple(a[..., :n, :] for a in self.keys)
                c.values = tuple(a[..., :n, :] for a in self.values)
                c.offset = n
        return c

    @property
    def nbytes(self) -> int:
        """Memory held, preallocated positions included."""
        return sum(a.nbytes for a in self.state)


KV_GROUP_SIZES = (64, 32)  # 64 for Qwen's head_dim of 128; 32 where 64 does not divide the head (tiny test models)


def kv_group_size(head_dim: int) -> int:
    """The group size a quantized KV cache of heads of `head_dim` takes (KV_GROUP_SIZES, the first that divides)."""
    for gs in KV_GROUP_SIZES:
        if head_dim % gs == 0:
            return gs
    raise UserError(f"this model's head_dim {head_dim} cannot be quantized in groups of 32 or 64: give kv_bits 16 "
                    f"(--kv-bits 16)", "kv_bits", "invalid_value")


def make_cache(model, kv_bits: Optional[int] = None, kv_start: int = 0, rope_factor: Optional[float] = None) -> list:
    """One cache per layer: what `model(ids, cache=...)` takes; quantized to `kv_bits` (4 or 8, None:
    16-bit) once a layer holds `kv_start` positions; its positions rotated with YaRN's `rope_factor`
    (None: the factor of the model's whole window, which any sequence fits)."""
    if kv_bits is None:
        layers = [KVCache() for _ in model.layers]
    else:
        args = model.args
        group_size = kv_group_size(args.dims_per_head)
        layers = [QuantizedKVCache(kv_bits, group_size, kv_start) for _ in model.layers]
    if rope_factor is None:
        rope_factor = model.args.rope_factor(model.args.context_window)
    for c in layers:
        c.rope_factor = rope_factor
    return layers


class Rows:
    """One layer's caches of the rows fed together, and each row's real tokens in this call (the rest of the
    call's length is padding: neither cached nor attended; its outputs are zeros)."""

    def __init__(self, caches: list, lengths: list):
        self.caches, self.lengths = caches, lengths

    @property
    def state(self):
        return [a for c in self.caches for a in c.state]


def common_prefix(a: list, b: list) -> int:
    """How many leading tokens two id lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """The per-layer caches of one prompt and the token ids whose keys and values they hold.

    `layers` is what the model takes; whoever feeds the model records the ids it fed (`ids`), so the
    two never disagree (`consistent` checks it). `setting` is the CacheSetting its layers were made
    with: a cache is reused only for the same setting. `rescaled_from`: the rope factor of the cache this
    one replaced when its conversation outgrew it (PromptCachePool.start), until the generator reports it."""

    def __init__(self, layers: list, ids=(), setting: CacheSetting = CacheSetting()):
        self.layers = layers
        self.ids = list(ids)
        self.setting = setting
        self.rescaled_from = None

    @classmethod
    def new(cls, model, setting: CacheSetting = CacheSetting()) -> "PromptCache":
        setting = normal(setting)
        if setting.rope_factor is None:
            setting = setting._replace(rope_factor=model.args.rope_factor(model.args.context_window))
        return cls(make_cache(model, *setting), setting=setting)

    def reuse_for(self, ids: list) -> list:
        """Keep the longest prefix shared with `ids`, leaving at least one token of `ids` to feed (its
        logits are needed); returns the ids still to feed."""
        common = max(0, min(common_prefix(self.ids, ids), len(ids) - 1))
        self.keep(common)
        return ids[common:]

    def keep(self, n: int):
        """Forget everything after the first `n` positions (a rejected draft): layers and ids alike."""
        for c in self.layers:
            c.trim(c.offset - n)
        del self.ids[n:]

    def span(self) -> Optional[int]:
        """The most positions one call may feed from here and have each attend as it would fed alone (None:
        any): a layer about to quantize (QuantizedKVCache.start) switches within the call that reaches it,
        for every query of that call, so a call of drafts stops just before."""
        layer = self.layers[0] if self.layers else None
        if isinstance(layer, QuantizedKVCache) and not layer.quantized and layer.offset < layer.start - 1:
            return layer.start - 1 - layer.offset
        return None

    def copy(self, n: Optional[int] = None) -> "PromptCache":
        """A new cache holding this one's first `n` positions (all by default); this one is left as it is."""
        n = len(self.ids) if n is None else min(n, len(self.ids))
        return PromptCache([c.copy(n) for c in self.layers], self.ids[:n], self.setting)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    @property
    def consistent(self) -> bool:
        """Whether every layer holds exactly `ids` (not so after a failure in the middle of a step)."""
        return all(c.offset == len(self.ids) for c in self.layers)


class PromptCachePool:
    """Finished prompts' caches, kept to start new requests from: the newest `max_entries` that fit in
    `max_bytes` together (None: no byte limit). Safe to use from several threads."""

    def __init__(self, max_entries: int, max_bytes: Optional[int] = None, size=None):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.size = size  # what an entry counts against max_bytes: size(cache), or None: its real bytes
        self._entries = []  # most recent last
        self._lock = threading.Lock()

    def take(self, ids: list, setting: CacheSetting = CacheSetting()) -> Optional[PromptCache]:
        """The cache made with `setting` (PromptCache.setting) sharing the longest prefix with `ids`,
        reused for it (PromptCache.reuse_for), or None: a 16-bit cache never serves an 8-bit request,
        nor one rotated with another rope factor.

        A cache whose ids all begin `ids` (a conversation going on) is taken out of the pool. One that
        shares only a prefix is copied, so that its own conversation stays whole for its next turn;
        except in a pool of one entry, which the new cache would replace anyway: that one is taken."""
        with self._lock:
            setting = normal(setting)
            shared = [common_prefix(c.ids, ids) if c.setting == setting else 0 for c in self._entries]
            best = max(range(len(shared)), key=shared.__getitem__, default=None)
            common = 0 if best is None else min(shared[best], len(ids) - 1)
            if common <= 0:
                return None
            if common == len(self._entries[best].ids) or self.max_entries == 1:
                cache = self._entries.pop(best)
            else:
                cache = self._entries[best].copy(common)
        cache.reuse_for(ids)
        return cache

    def start(self, model, ids: list, setting: CacheSetting) -> PromptCache:
        """The cache to generate from `ids` with: the pooled one of `setting` sharing the most with them
        (take), else a new one. A conversation (a pooled cache of which `ids` hold at least half) keeps a
        cache of a larger rope factor than `setting`'s (every position of it is rotated alike); one that
        outgrew its cache's factor is processed again at `setting`'s, once: the new cache's
        `rescaled_from` says from which factor, and the old one leaves the pool."""
        setting = normal(setting)
        cache = self.take(ids, setting)
        if cache is not None:
            return cache
        with self._lock:
            outgrown = [c for c in self._entries if c.setting._replace(rope_factor=setting.rope_factor) == setting
                        and c.setting != setting and 2 * common_prefix(c.ids, ids) >= len(c.ids) > 0]
            larger = max((c.setting for c in outgrown if c.setting.rope_factor > setting.rope_factor),
                         key=lambda s: s.rope_factor, default=None)
            if larger is None:
                self._entries = [c for c in self._entries if c not in outgrown]
        if larger is not None:
            cache = self.take(ids, larger)
            if cache is not None:
                return cache
        cache = PromptCache.new(model, setting)
        if outgrown:
            cache.rescaled_from = max(c.setting.rope_factor for c in outgrown)
        return cache

    def put(self, cache: PromptCache):
        """Keep `cache` (if it is whole), dropping the entries it covers, then the oldest over the limits."""
        if not cache.ids or not cache.consistent:
            return
        with self._lock:
            # an entry whose ids all begin the new one's is covered by it
            self._entries = [c for c in self._entries
                             if c.setting != cache.setting or common_prefix(c.ids, cache.ids) < len(c.ids)]
            self._entries.append(cache)
            while self._entries and (len(self._entries) > self.max_entries or
                                     self.max_bytes is not None and self._nbytes() > self.max_bytes):
                self._entries.pop(0)

    def clear(self):
        with self._lock:
            self._entries = []

    def __len__(self) -> int:
        return len(self._entries)

    def _nbytes(self) -> int:
        return sum(self._sizes())

    def _sizes(self) -> list:
        return [c.nbytes if self.size is None else self.size(c) for c in self._entries]

    def sizes(self) -> list:
        """Each entry's size, oldest first."""
        with self._lock:
            return self._sizes()

    def drop_oldest(self):
        with self._lock:
            if self._entries:
                self._entries.pop(0)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes()
