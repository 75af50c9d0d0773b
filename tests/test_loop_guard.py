"""The loop guard: repeated spans and recurring lines, found at the right token, and nothing in real text."""

import json
import random
import shutil

import pytest

from mlx_qwen3.loop_guard import RECURRING, REPEAT, Loop, LoopGuard, LoopSettings, ending_ids
from mlx_qwen3.tokenizer import Tokenizer

from checkpoints import copy_tokenizer

END = 0  # the fake vocabulary's one "end of line" id
PERIODS = (1, 2, 7, 64, 512)


def fresh(n: int, rng, low: int = 1000) -> list:
    """n distinct ids never used before by this rng's caller (so a span has no shorter period)."""
    return rng.sample(range(low, 10**9), n)


def feed_all(guard: LoopGuard, ids: list) -> list:
    return [(i, loop) for i, loop in ((i, guard.feed(t)) for i, t in enumerate(ids)) if loop is not None]


@pytest.mark.parametrize("period", PERIODS)
def test_three_copies_fire_at_the_last_token_of_the_third(period):
    rng = random.Random(period)
    prefix, span = fresh(50, rng), fresh(period, rng)
    guard = LoopGuard({END}, repeats=3, min_tokens=1)
    fired = feed_all(guard, prefix + span * 3)
    assert fired == [(50 + 3 * period - 1, Loop(REPEAT, period, 50 + 3 * period - 1, 50, 50 + period))]


@pytest.mark.parametrize("period", PERIODS)
def test_two_copies_do_not_fire(period):
    rng = random.Random(period)
    prefix, span, tail = fresh(50, rng), fresh(period, rng), fresh(600, rng)
    assert feed_all(LoopGuard({END}, repeats=3, min_tokens=1), prefix + span * 2 + tail) == []


@pytest.mark.parametrize("period", PERIODS)
def test_defaults_also_need_the_copies_to_cover_min_tokens(period):
    # runs of "=" or spaces and short lists are legitimate: a short span must repeat until it covers 256 tokens
    rng = random.Random(period)
    prefix, span = fresh(50, rng), fresh(period, rng)
    settings = LoopSettings()
    assert (settings.repeats, settings.min_tokens) == (3, 256)
    end = 50 + max(3 * period, 256) - 1
    copies = -(-(end - 50 + 1) // period) + 1
    fired = feed_all(LoopGuard({END}), prefix + span * copies)
    assert fired == [(end, Loop(REPEAT, period, end, 50, 50 + period))]


def test_a_loop_spends_its_evidence():
    # a nudged thought that keeps looping is found again, after three fresh copies
    rng = random.Random(0)
    span = fresh(10, rng)
    guard = LoopGuard({END}, min_tokens=1)
    fired = feed_all(guard, fresh(5, rng) + span * 7)
    assert [i for i, _ in fired] == [5 + 29, 5 + 29 + 30]
    assert fired[1][1] == Loop(REPEAT, 10, 64, 35, 45)


def test_pending_holds_back_every_repeated_token():
    """What the answer channel does: release tokens once they fall out of `pending`; on a loop, drop the
    held tokens from loop.second on. The text is delivered once, not a token of the second copy."""
    rng = random.Random(1)
    text, span = fresh(40, rng), fresh(30, rng)
    stream = text + span * 5
    guard, released = LoopGuard({END}, min_tokens=1), []
    for i, token in enumerate(stream):
        loop = guard.feed(token)
        if loop is not None:
            released += stream[len(released):loop.second]
            break
        released += stream[len(released):i + 1 - guard.pending]
        assert len(released) <= 40 + 30  # never past the first copy
    assert released == text + span


def test_pending_lets_go_when_the_copy_breaks():
    rng = random.Random(2)
    span = fresh(20, rng)
    guard = LoopGuard({END}, min_tokens=1)
    feed_all(guard, fresh(10, rng) + span + span[:12])
    assert guard.pending == 12
    guard.feed(fresh(1, rng)[0])
    assert guard.pending == 1  # the latest token might start a copy


def cycle(rng, sentence: list, filler: int) -> list:
    """The same sentence, then other text (two lines that never recur)."""
    half = filler // 2
    return sentence + fresh(half - 1, rng) + [END] + fresh(filler - half - 1, rng) + [END]


def test_a_line_recurring_with_other_text_between_fires():
    rng = random.Random(3)
    sentence = fresh(13, rng) + [END]
    ids = [t for _ in range(40) for t in cycle(rng, sentence, 50)]
    fired = feed_all(LoopGuard({END}), ids)
    n = LoopSettings().recurring
    assert fired[0] == (64 * (n - 1) + 13, Loop(RECURRING, 64, 64 * (n - 1) + 13, 0, 64))


def test_recurring_within_a_small_window_and_count():
    rng = random.Random(4)
    sentence = fresh(11, rng) + [END]
    ids = [t for _ in range(3) for t in cycle(rng, sentence, 30)]
    fired = feed_all(LoopGuard({END}, recurring=3, window=100, min_line=12), ids)
    assert fired == [(84 + 11, Loop(RECURRING, 42, 84 + 11, 0, 42))]


def test_recurring_too_far_apart_or_too_short_does_not_fire():
    rng = random.Random(5)
    sentence = fresh(13, rng) + [END]
    apart = [t for _ in range(100) for t in cycle(rng, sentence, 150)]  # 32 recurrences span 5,000 tokens
    assert feed_all(LoopGuard({END}), apart) == []
    brace = fresh(2, rng) + [END]  # "}\n", "```\n": short lines recur legitimately
    short = [t for _ in range(300) for t in cycle(rng, brace, 10)]
    assert feed_all(LoopGuard({END}), short) == []


def test_a_long_random_sequence_never_fires():
    rng = random.Random(6)
    ids = [rng.randrange(150_000) for _ in range(200_000)]
    endings = set(range(0, 150_000, 50))  # a line every ~50 tokens
    assert feed_all(LoopGuard(endings), ids) == []


def test_reset_forgets_and_counts_from_zero():
    rng = random.Random(7)
    span = fresh(16, rng)
    guard = LoopGuard({END}, min_tokens=1)
    assert feed_all(guard, span * 2) == []
    guard.reset()
    assert guard.pending == 0
    assert feed_all(guard, span) == []  # two copies before the reset do not count
    guard.reset()
    assert feed_all(guard, span * 3) == [(47, Loop(REPEAT, 16, 47, 0, 16))]


@pytest.mark.parametrize("fields, message", [
    (dict(repeats=1), "repeats and recurring count copies and must be at least 2"),
    (dict(recurring=1), "repeats and recurring count copies and must be at least 2"),
    (dict(min_tokens=0), "min_tokens must be a positive integer, not 0"),
    (dict(window=-5), "window must be a positive integer, not -5"),
    (dict(max_period="512"), "max_period must be a positive integer, not '512'"),
    (dict(min_line=True), "min_line must be a positive integer, not True"),
    (dict(window=100), "a window of 100 tokens cannot hold 32 lines of 12 tokens; make it at least 384"),
])
def test_bad_settings_say_what_is_wrong(fields, message):
    with pytest.raises(ValueError) as e:
        LoopGuard({END}, **fields)
    assert str(e.value) == f"loop guard: {message}"


def test_settings_or_fields_not_both():
    with pytest.raises(ValueError, match="not both"):
        LoopGuard({END}, LoopSettings(), repeats=4)
    with pytest.raises(TypeError):
        LoopGuard({END}, repeat=4)  # a misspelt field is not ignored


# The real vocabulary


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    copy_tokenizer(folder)
    tok = Tokenizer.from_folder(folder)
    return tok, ending_ids(tok)


def test_ending_ids_are_line_and_sentence_ends(real):
    tok, endings = real
    for text, ends in [("\n", True), ("\n\n", True), (".", True), ("?", True), ("!", True), (":\n", True),
                       ("。", True), ("the", False), (" the", False), (" {", False), ("(", False)]:
        ids = tok.encode(text)
        assert len(ids) == 1 and (ids[0] in endings) == ends, text


def test_a_thought_repeating_a_paragraph_fires(real):
    tok, endings = real
    head = tok.encode("Okay, the user wants the sum of the first ten odd numbers. ")
    paragraph = tok.encode("Wait, let me add them again: 1 + 3 + 5 + 7 + 9 + 11 + 13 + 15 + 17 + 19. "
                           "That is 100, which matches n squared for n = 10. But let me double-check.\n")
    ids = [tok.token_id("<think>")] + head + paragraph * 5
    fired = feed_all(LoopGuard(endings), ids)
    p, start = len(paragraph), 1 + len(head)
    end = start + max(3 * p, 256) - 1  # three copies, and the 256 tokens min_tokens asks
    assert fired == [(end, Loop(REPEAT, p, end, start, start + p))]
    assert tok.decode(ids[start + p:start + 2 * p]) == tok.decode(paragraph)


def test_a_thought_cycling_with_other_text_between_fires(real):
    tok, endings = real
    ids = tok.encode("Okay, let me work this out.")
    for n in range(40):
        ids += tok.encode(f" Hmm, maybe I should check whether the total comes out the same this time."
                          f" {n + 3} times {n + 7} is {(n + 3) * (n + 7)}, plus {n} gives {(n + 3) * (n + 7) + n}.")
    fired = feed_all(LoopGuard(endings), ids)
    assert fired and fired[0][1].kind == RECURRING
    loop = fired[0][1]
    assert tok.decode(ids[loop.first:loop.first + 16]).startswith(" Hmm, maybe I should check")


def test_real_python_and_prose_do_not_fire(real):
    tok, endings = real
    source = (shutil.__file__, json.__file__.replace("__init__.py", "encoder.py"))
    from pydoc_data.topics import topics

    for text in [open(f, encoding="utf-8").read() for f in source] + [topics["typesseq"], topics["formatstrings"]]:
        assert feed_all(LoopGuard(endings), tok.encode(text)) == []
