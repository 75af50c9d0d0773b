"""Prompt-lookup drafting: what PromptLookup proposes, against a plain scan of the context."""

import random

import pytest

from mlx_qwen3.lookup import PromptLookup


def scan(ids: list, k: int, ngram_max: int = 4, ngram_min: int = 2) -> list:
    """The reference: for the longest final n-gram found earlier, what followed its latest occurrence."""
    for n in range(min(ngram_max, len(ids)), ngram_min - 1, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == tail:
                return ids[start + n:start + n + k]
    return []


def test_a_copy_proposes_the_copied_continuation():
    snippet = [101, 7, 55, 13, 90, 4, 77, 31, 8, 60]
    prompt = [1, 2, 3] + snippet + [5, 6, 9]
    lookup = PromptLookup(prompt + snippet[:3])  # the reply starts quoting the snippet
    assert lookup.propose(5) == snippet[3:8]
    lookup.extend(snippet[3:8])  # accepted: the quote goes on
    assert lookup.propose(5) == [8, 60, 5, 6, 9]


def test_no_match_proposes_nothing():
    assert PromptLookup([1, 2, 3, 4, 5, 6]).propose(4) == []
    assert PromptLookup([]).propose(4) == []
    assert PromptLookup([7]).propose(4) == []
    assert PromptLookup([1, 2, 1]).propose(3) == []  # one token matching is below ngram_min 2
    assert PromptLookup([1, 2, 1], ngram_min=1).propose(3) == [2, 1]
    assert PromptLookup([1, 2, 3, 1, 2]).propose(0) == []


def test_the_latest_occurrence_wins():
    assert PromptLookup([1, 2, 3, 9, 1, 2, 4, 9, 1, 2]).propose(2) == [4, 9]


def test_a_longer_match_wins_over_a_later_shorter_one():
    # "2 3" last occurred before 9, but "5 1 2 3" occurred before 7
    assert PromptLookup([5, 1, 2, 3, 7, 8, 2, 3, 9, 5, 1, 2, 3]).propose(1) == [7]
    assert PromptLookup([5, 1, 2, 3, 7, 8, 2, 3, 9, 5, 1, 2, 3], ngram_max=2).propose(1) == [9]


def test_k_caps_the_proposal_and_the_context_end_cuts_it():
    lookup = PromptLookup([4, 5, 10, 11, 12, 13, 14, 4, 5])
    assert [lookup.propose(k) for k in (1, 3, 5)] == [[10], [10, 11, 12], [10, 11, 12, 13, 14]]
    assert lookup.propose(20) == [10, 11, 12, 13, 14, 4, 5]
    assert PromptLookup([4, 5, 4, 5]).propose(8) == [4, 5]  # the continuation may run into the tail itself


def test_extend_keeps_every_proposal_equal_to_a_scan():
    rng = random.Random(0)
    ids = [rng.randrange(6) for _ in range(600)]  # a small alphabet: many matches, of every length
    for ngram_max, ngram_min in [(4, 2), (3, 1), (5, 5)]:
        lookup = PromptLookup(ids[:50], ngram_max, ngram_min)
        at = 50
        while at < len(ids):
            step = rng.randrange(1, 6)  # tokens arrive in uneven bursts, as accepted drafts do
            lookup.extend(ids[at:at + step])
            at += step
            assert lookup.propose(4) == scan(ids[:at], 4, ngram_max, ngram_min), (ngram_max, ngram_min, at)


class Reads(list):
    """A list that counts the elements read through it (indexing, slicing, iteration)."""
    read = 0

    def __getitem__(self, key):
        got = super().__getitem__(key)
        Reads.read += len(got) if isinstance(key, slice) else 1
        return got

    def __iter__(self):
        Reads.read += len(self)
        return super().__iter__()


def test_a_long_context_is_read_only_at_its_tail_and_the_proposal():
    rng = random.Random(1)
    ids = [rng.randrange(150_000) for _ in range(50_000)]
    quote = ids[1_000:1_040]
    lookup = PromptLookup(ids + quote[:4])
    lookup.ids, Reads.read = Reads(lookup.ids), 0  # from here on, count what is read of the context
    for i in range(4, 36):
        assert lookup.propose(4) == quote[i:i + 4]
        lookup.extend([quote[i]])
    # per token: extend indexes the final 2-, 3- and 4-grams, propose looks them up and reads 4 (a scan: 50K)
    assert Reads.read <= 32 * (2 * (2 + 3 + 4) + 4)


def test_bad_ngram_sizes_say_what_is_wrong():
    for ngram_max, ngram_min in [(1, 2), (4, 0)]:
        with pytest.raises(ValueError, match="prompt lookup needs 1 <= ngram_min <= ngram_max"):
            PromptLookup([1, 2], ngram_max, ngram_min)
