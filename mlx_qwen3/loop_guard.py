"""Notice, token by token, when generated text has started to loop: a span repeated back to back, or the
same line or sentence recurring within a recent window.

Intended use by the generator: one LoopGuard per channel; `feed(token)` each generated id (it returns a
Loop when that token completes one) and `reset()` when a new channel starts (after </think>). In a
thought, a first Loop is the cue to nudge, a second to close the thought. In the answer, hold back the
last `pending` tokens (a copy in progress of the text before them, or the start of one) and release them
as `pending` shrinks; on a "repeat" Loop, drop the held tokens from `loop.second` on: the repeated text
is never delivered twice (a "recurring" Loop's text, spread out, is already out: stop there). Positions
count the tokens fed since the last reset, from 0.
"""

from dataclasses import dataclass
from functools import lru_cache

REPEAT, RECURRING = "repeat", "recurring"
_KGRAM = 2  # a period is proposed when the last 2 ids occurred together `period` ids back
_ENDINGS = (".", "?", "!", "。", "？", "！")


@dataclass(frozen=True)
class Loop:
    """What the guard found. `kind` "repeat": a span of `period` tokens repeated back to back, its first
    copy starting at `first`, the second at `second`. "recurring": a line or sentence seen `recurring`
    times in the window, first at `first`, then at `second`; `period` is the distance between its last
    two occurrences. `position` is the token that completed the loop."""

    kind: str
    period: int
    position: int
    first: int
    second: int


@dataclass(frozen=True)
class LoopSettings:
    """repeats: copies of a span back to back that make a loop; min_tokens: tokens those copies must
    cover in all (so that runs of "=" or spaces, or short lists, do not count); max_period: the longest
    span looked for; recurring: times a line recurs within `window` tokens to make a loop; min_line:
    tokens a line needs to count (blank lines, braces and fences recur legitimately). The defaults fire
    0 times on Python's standard library and docs (scripts/bench_loop_guard.py)."""

    repeats: int = 3
    min_tokens: int = 256
    max_period: int = 1024
    recurring: int = 32
    window: int = 4096
    min_line: int = 12

    def __post_init__(self):
        for name in ("repeats", "min_tokens", "max_period", "recurring", "window", "min_line"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"loop guard: {name} must be a positive integer, not {value!r}")
        if self.repeats < 2 or self.recurring < 2:
            raise ValueError("loop guard: repeats and recurring count copies and must be at least 2")
        if self.window < self.min_line * self.recurring:
            raise ValueError(f"loop guard: a window of {self.window} tokens cannot hold {self.recurring} lines of "
                             f"{self.min_line} tokens; make it at least {self.min_line * self.recurring}")


@lru_cache(maxsize=4)
def ending_ids(tokenizer) -> frozenset:
    """The ids whose text ends a line or a sentence (holds a newline, or ends in . ? ! and their CJK forms).

    Args:
        tokenizer: a Tokenizer (its token_bytes and max_id are used).

    Returns:
        A frozenset of token ids, to give LoopGuard.
    """
    return frozenset(i for i in range(tokenizer.max_id + 1) if _ends(tokenizer.token_bytes(i)))


class Endings:
    """ending_ids(tokenizer) decided for each id the first time it is asked: deciding a whole vocabulary
    up front takes a second, which a first generation should not wait for. A container of ids for
    LoopGuard, one per tokenizer (`Endings.of`)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    @staticmethod
    @lru_cache(maxsize=4)
    def of(tokenizer) -> "Endings":
        return Endings(tokenizer)

    def __contains__(self, token: int) -> bool:
        found = self.known.get(token)
        if found is None:
            found = self.known[token] = _ends(self.tokenizer.token_bytes(token))
        return found


def _ends(piece: bytes) -> bool:
    text = piece.decode("utf-8", errors="ignore").rstrip(" ")
    return "\n" in text or text.endswith(_ENDINGS)


class LoopGuard:
    """Feed token ids one at a time; constant amortised work per token. A Loop spends its evidence: the
    next one needs copies made after it (a thought nudged once that loops again is found again).

    Args:
        endings: ids that end a line or sentence (`ending_ids(tokenizer)`, or `Endings.of(tokenizer)`).
        settings: a LoopSettings, or its fields as keywords.
    """

    def __init__(self, endings, settings: "LoopSettings | None" = None, **fields):
        if settings is not None and fields:
            raise ValueError("loop guard: give a LoopSettings or its fields, not both")
        self.settings = settings if settings is not None else LoopSettings(**fields)
        self.endings = endings if isinstance(endings, Endings) else frozenset(endings)
        self.reset()

    def reset(self):
        """Forget everything: a new channel starts, at position 0."""
        self.ids = []
        self._forget(0)

    def _forget(self, start: int):
        self._start = start  # nothing before it counts
        self._last = {}  # (id, id) -> where that pair last ended
        self._runs = {}  # period -> tokens in a row equal to the token `period` back
        self._line_start = start
        self._lines = {}  # a line's ids -> where it started (the latest `recurring` times, in the window)
        self._pruned = start

    @property
    def pending(self) -> int:
        """How many of the latest tokens are a copy in progress of the text before them (or may be the
        start of one): what the answer holds back until the copy breaks."""
        return min(len(self.ids) - self._start, max(self._runs.values(), default=_KGRAM - 1))

    def feed(self, token: int):
        """Take the next id. Returns a Loop when this token completes one, else None."""
        ids = self.ids
        t = len(ids)
        ids.append(token)
        s = self.settings
        runs = self._runs
        found = None
        for period in list(runs) if runs else ():
            if ids[t - period] == token:
                runs[period] += 1
                if runs[period] >= max((s.repeats - 1) * period, s.min_tokens - period):
                    if found is None or period < found.period:
                        found = self._repeat(period, t)
            else:
                del runs[period]
        if t > self._start:
            pair = (ids[t - 1], token)
            before = self._last.get(pair)
            self._last[pair] = t
            if found is None and before is not None and t - before not in runs and t - before <= s.max_period:
                found = self._propose(t - before, t)
        if token in self.endings:
            found = self._end_line(t) if found is None else found
        if found is not None:
            self._forget(t + 1)
        elif t - self._pruned >= 2 * max(s.window, s.max_period):
            self._prune(t)
        return found

    def _propose(self, period: int, t: int):
        """A candidate period: count its run back and follow it. The count stops where a loop is made, so
        that a long run found late costs no more than the loop it makes."""
        s, ids = self.settings, self.ids
        need = max((s.repeats - 1) * period, s.min_tokens - period)
        run, i = _KGRAM, t - _KGRAM
        while run < need and i - period >= self._start and ids[i] == ids[i - period]:
            run += 1
            i -= 1
        self._runs[period] = run
        return self._repeat(period, t) if run >= need else None

    def _repeat(self, period: int, t: int) -> Loop:
        second = t - self._runs[period] + 1
        return Loop(REPEAT, period, t, second - period, second)

    def _end_line(self, t: int):
        s = self.settings
        start, self._line_start = self._line_start, t + 1
        if t + 1 - start < s.min_line:
            return None
        seen = self._lines.setdefault(tuple(self.ids[start:]), [])
        seen.append(start)
        if len(seen) > s.recurring or seen[0] < t - s.window:
            seen[:] = [x for x in seen[-s.recurring:] if x >= t - s.window]
        if len(seen) < s.recurring:
            return None
        return Loop(RECURRING, start - seen[-2], t, seen[0], seen[1])

    def _prune(self, t: int):
        """Drop what is too old to matter, so the tables stay the size of the window."""
        s = self.settings
        self._last = {k: v for k, v in self._last.items() if v >= t - s.max_period}
        self._lines = {k: v for k, v in self._lines.items() if v[-1] >= t - s.window}
        self._pruned = t
