"""PromptCache and PromptCachePool: the ids a cache holds, reuse, copies, the pool's choices and limits."""

import mlx.core as mx
import pytest

from mlx_qwen3.models.cache import KVCache, PromptCache, PromptCachePool


def filled(ids: list, width: int = 4) -> PromptCache:
    """A one-layer cache holding `ids`: position i's key and value are i's id."""
    cache = PromptCache([KVCache()])
    if ids:
        kv = mx.array(ids, dtype=mx.float32).reshape(1, 1, len(ids), 1) * mx.ones((1, 1, 1, width))
        cache.layers[0].update_and_fetch(kv, kv)
    cache.ids.extend(ids)
    return cache


def held(cache: PromptCache) -> list:
    """What the layer holds, read back from its keys."""
    c = cache.layers[0]
    return [] if c.keys is None else c.keys[0, 0, : c.offset, 0].astype(mx.int32).tolist()


def test_reuse_for_keeps_the_shared_prefix_and_returns_what_is_left():
    cache = filled([1, 2, 3, 4, 5])
    assert cache.reuse_for([1, 2, 9, 9]) == [9, 9]
    assert cache.ids == [1, 2] and held(cache) == [1, 2] and cache.consistent
    # the whole prompt cached already: its last token is fed again, for its logits
    cache = filled([1, 2, 3])
    assert cache.reuse_for([1, 2, 3]) == [3] and cache.ids == [1, 2]
    assert filled([7, 8]).reuse_for([1, 2]) == [1, 2]


def test_copy_leaves_the_original_whole():
    cache = filled([1, 2, 3, 4])
    part = cache.copy(2)
    assert (part.ids, held(part)) == ([1, 2], [1, 2])
    part.layers[0].update_and_fetch(*(mx.full((1, 1, 1, 4), 9.0),) * 2)
    part.ids.append(9)
    assert (held(part), held(cache), cache.ids) == ([1, 2, 9], [1, 2, 3, 4], [1, 2, 3, 4])
    assert cache.copy().ids == [1, 2, 3, 4] and cache.nbytes > 0


def test_inconsistent_caches_are_not_kept():
    pool = PromptCachePool(4)
    broken = filled([1, 2, 3])
    broken.ids.append(4)  # as after a failure between feeding the model and recording the id
    assert not broken.consistent
    pool.put(broken)
    pool.put(PromptCache([KVCache()]))  # nothing in it: nothing worth keeping
    assert len(pool) == 0


def test_a_conversation_going_on_takes_its_cache_over():
    pool = PromptCachePool(4)
    first = filled([1, 2, 3])
    pool.put(first)
    taken = pool.take([1, 2, 3, 4, 5])
    assert taken is first and taken.ids == [1, 2, 3] and len(pool) == 0


def test_a_shared_prefix_is_copied_so_the_other_conversation_stays_whole():
    pool = PromptCachePool(4)
    pool.put(filled([1, 2, 3, 4]))
    pool.put(filled([7, 7]))
    taken = pool.take([1, 2, 9])
    assert taken.ids == [1, 2] and held(taken) == [1, 2]
    assert len(pool) == 2 and pool.take([1, 2, 3, 4, 5]).ids == [1, 2, 3, 4]  # the best match, still whole
    assert pool.take([5, 5]) is None


def test_a_pool_of_one_rewinds_in_place():
    """A pool of one (ChatSession) would drop the old entry when the new one comes back: no copy."""
    pool = PromptCachePool(1)
    first = filled([1, 2, 3, 4])
    pool.put(first)
    taken = pool.take([1, 2, 9])
    assert taken is first and taken.ids == [1, 2] and len(pool) == 0


def test_put_drops_covered_entries_then_the_oldest_over_the_limits():
    pool = PromptCachePool(2)
    pool.put(filled([1, 2]))
    pool.put(filled([1, 2, 3]))  # covers [1, 2]
    assert len(pool) == 1
    pool.put(filled([5]))
    pool.put(filled([6]))
    assert len(pool) == 2 and pool.take([1, 2, 3, 4]) is None  # the oldest went
    one = filled([8, 8]).nbytes
    small = PromptCachePool(10, max_bytes=one)
    small.put(filled([8, 8]))
    small.put(filled([9, 9]))
    assert len(small) == 1 and small.nbytes == one and small.take([9, 9, 1]) is not None
    nothing = PromptCachePool(0)
    nothing.put(filled([1, 2]))
    assert len(nothing) == 0


@pytest.mark.parametrize("entries", [1, 3])
def test_clear(entries):
    pool = PromptCachePool(entries)
    pool.put(filled([1, 2]))
    pool.clear()
    assert len(pool) == 0 and pool.nbytes == 0
