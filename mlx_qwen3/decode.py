"""The decoder: token ids in, token ids out, for several rows at once.

Every step makes one forward pass for all the rows decoding (one read of the weights for all of them) and,
before it, processes one chunk of the prompt of a row that is joining, so a long prompt never stalls the
others. Rows join and leave at any step. Each row keeps its own cache (models/cache.py Rows), sampler,
penalties and drafts: with speculative decoding a row feeds its pending token and the drafts proposed after
it, the model checks them all in that same pass (sample.verify), and the row's caches are rewound past the
rejected ones. Who takes a row's tokens (a Reply, or generate_step's list) may end it at any token, or ask
for forced ids to be fed next; the decoder rewinds what it fed beyond that point.

On a model sharded over several ranks every pass is a collective: every rank runs the same rows in the same
order, and rank 0's sampled tokens, acceptances and cancel flags are every rank's (distributed.agree)."""

from collections import deque
from typing import Optional

import mlx.core as mx

from . import distributed
from .lookup import PromptLookup
from .models.cache import CacheSetting, PromptCache, Rows, common_prefix
from .options import MAX_DRAFT
from .sample import verify

PREFILL_CHUNK = 512  # prompt tokens per model call: bounds the working memory of a long prompt
FIRST_DRAFT = 4  # num_draft "auto" starts here, doubles while every draft is accepted (to MAX_DRAFT)
MAX_PAUSE = 64  # steps "auto" drafting rests after drafts that keep missing (doubling from 1)
FRESH, TOKEN, FORCED, DRAFTS = "fresh", "token", "forced", "drafts"  # what a row feeds in a pass (Decoder._plan)


def process_prompt(model, ids: mx.array, layers: list, chunk_size: Optional[int] = None, progress=None) -> mx.array:
    """Feed `ids` (B, L) through the model in chunks, filling the per-layer caches; returns the last
    position's logits. All but the last token only fill the cache: their logits are never computed.
    `progress(done, L)` is called after each chunk, the last one included, when L > 1."""
    L = ids.shape[1]
    start = 0
    while start < L - 1:
        n = min(chunk_size or PREFILL_CHUNK, L - 1 - start)
        model(ids[:, start : start + n], cache=layers)
        mx.eval([c.state for c in layers])
        distributed.watchdog.beat()  # on several ranks, each chunk is an answer from the others
        start += n
        if progress is not None:
            progress(start, L)
    logits = model(ids[:, start:], cache=layers)[:, -1, :]
    if progress is not None and L > 1:
        mx.eval(logits)  # counted once done, as the other chunks
        progress(L, L)
    return logits


class Taker:
    """Takes every token (generate_step's): what a row's tokens go to, at its simplest."""

    room = 1 << 62
    boundaries = frozenset()

    def __init__(self, forced: Optional[deque] = None):
        self.forced = forced if forced is not None else deque()
        self.taken = []

    def take(self, token: int) -> bool:
        self.taken.append(token)
        return True

    def cancel(self):
        pass


class Drafter:
    """Proposes a row's drafts: from the context's own n-grams (prompt lookup), else from a draft model,
    `num_draft` at a time ("auto": FIRST_DRAFT, doubled while all are accepted, cut back to what was
    accepted plus one when not, resting for a growing number of steps when none are)."""

    def __init__(self, num_draft, lookup: bool, draft_model=None, sampler=None, setting: CacheSetting = CacheSetting()):
        self.fixed = num_draft != "auto"
        self.k = num_draft if self.fixed else FIRST_DRAFT
        self.lookup = PromptLookup([]) if lookup else None
        self.looked = 0  # of the context, the ids the lookup has
        self.model, self.sampler = draft_model, sampler
        self.cache = None if draft_model is None else PromptCache.new(draft_model, setting._replace(kv_bits=None))
        self.known = 0  # of the draft's cache, the ids known to be the context's
        self.pause = self.misses = 0
        self.drafted = self.accepted = 0

    def propose(self, ids: list, token: int, room: int, boundaries: frozenset) -> tuple:
        """(drafts, their draft model's distributions or None) after `ids` (every id fed so far, which only
        grows between calls) and `token` (the one about to be): at most `room` of them, none after a
        boundary (an id that changes the channel or ends the reply)."""
        k = min(self.k, room)
        if self.pause > 0:
            self.pause -= 1
            return [], None
        if k < 1:
            return [], None
        drafts, probs = [], None
        if self.lookup is not None:
            self.lookup.extend(ids[self.looked:] + [token])
            self.looked = len(ids) + 1
            drafts = self.lookup.propose(k)
        if not drafts and self.model is not None:
            drafts, probs = self._from_model(ids, token, k)
        for i, t in enumerate(drafts):
            if t in boundaries:
                drafts = drafts[: i + 1]
                break
        return drafts, None if probs is None else probs[: len(drafts)]

    def _from_model(self, ids: list, token: int, k: int) -> tuple:
        cache, known = self.cache, self.known
        # the draft's cache holds what it was fed: the ids up to `known` are still the context's
        common = min(known + common_prefix(cache.ids[known:], ids[known:]), len(ids))
        cache.keep(common)
        todo = ids[common:] + [token]
        logits = process_prompt(self.model, mx.array(todo, dtype=mx.uint32)[None], cache.layers)
        cache.ids.extend(todo)
        tokens, probs = [], []
        for j in range(k):
            if not self.sampler.greedy:
                probs.append(self.sampler.probs(logits))
            t = self.sampler(logits).astype(mx.uint32)
            tokens.append(t)
            if j + 1 < k:
                logits = self.model(t[None], cache=cache.layers)[:, -1, :]
        drafts = mx.concatenate(tokens)
        mx.eval(drafts, *probs)
        drafts = drafts.tolist()
        cache.ids.extend(drafts[:-1])
        self.known = len(ids) + 1
        return drafts, mx.concatenate(probs) if probs else None

    def pace(self, drafted: int, accepted: int):
        """After the model checked `drafted` drafts and accepted `accepted`."""
        self.drafted += drafted
        self.accepted += accepted
        if self.fixed:
            return
        self.k = min(2 * self.k, MAX_DRAFT) if accepted == drafted else max(1, accepted + 1)
        if accepted == 0:
            self.pause = min(MAX_PAUSE, 2 ** self.misses) - 1
            self.misses += 1
        else:
            self.misses = 0


class Row:
    """One sequence being decoded: its cache, its sampling, its drafts, who takes its tokens."""

    def __init__(self, todo: list, cache: PromptCache, sampler, processors, taker, cancel, progress, drafter,
                 logprobs: Optional[int] = None):
        self.todo, self.cache = list(todo), cache
        self.sampler, self.processors, self.taker = sampler, list(processors), taker
        self.cancel, self.progress, self.drafter = cancel, progress, drafter
        self.total = len(todo)  # the prompt tokens to process (progress counts them)
        self.y = None  # (token to feed next, rank 0's cancel flag): a lazy array, once the prompt is read
        self.fresh = False  # y is the prompt's last token (not generated: the taker never sees it)
        self.history = mx.zeros((0,), dtype=mx.uint32)  # the generated tokens fed (for the penalties)
        self.passes = 0
        self.done = False
        self.logprobs = logprobs  # alternatives to report with each token's log-probability (None: none)
        self.scores = self.pending = None  # with logprobs: those of y (lazy), and of the token this pass samples

    def processed(self, logits: mx.array, history: mx.array) -> mx.array:
        for p in self.processors:
            logits = p(history, logits)
        return logits

    def stopped(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


class Decoder:
    """The rows of one model decoding together; `step()` advances every one of them by one forward pass."""

    def __init__(self, model, draft_model=None):
        self.model, self.draft_model = model, draft_model
        self.group = distributed.group_of(model)
        self.rows = []  # in the order they joined
        self.passes = self.generated = 0  # model calls (prompt chunks too); tokens given to takers

    def add(self, todo: list, cache: PromptCache, sampler, processors=(), taker=None, cancel=None, progress=None,
            drafting=None, draft_sampler=None, logprobs: Optional[int] = None) -> Row:
        """A row that feeds `todo` after what `cache` holds, then generates. `drafting`: its Drafting options
        (options.py; None: no drafts); `draft_sampler`: how the draft model draws (the row's parameters,
        its own random stream); `logprobs`: give the taker each sampled token's log-probability under the
        model and this many alternatives (such a row does not draft)."""
        drafter = None
        if drafting is not None and logprobs is None and (drafting.prompt_lookup or self.draft_model is not None):
            drafter = Drafter(drafting.num_draft, drafting.prompt_lookup, self.draft_model, draft_sampler,
                              cache.setting)
        row = Row(todo, cache, sampler, processors, taker or Taker(), cancel, progress, drafter, logprobs)
        self.rows.append(row)
        return row

    def step(self):
        """One chunk of a joining row's prompt (all of it when nobody is decoding), then one forward pass
        for every row past its prompt; finished rows leave."""
        with distributed.watchdog.waiting(self.group):
            self._read_prompt()
            self._decode([row for row in self.rows if row.y is not None])
        self.rows = [row for row in self.rows if not row.done]

    def _read_prompt(self):
        """Up to PREFILL_CHUNK tokens of joining rows' prompts, the first joined first, in one pass for the
        rows whose chunks are alike in length (while nobody decodes: until one is read); a row whose prompt
        is read but its last token decodes from this step on."""
        decoding = any(row.y is not None for row in self.rows)
        budget = PREFILL_CHUNK
        while budget > 0 or not decoding:
            chunks = []  # (row, tokens): padded to the longest, at most twice the tokens they hold
            for row in (row for row in self.rows if row.y is None and len(row.todo) > 1):
                n = min(PREFILL_CHUNK, len(row.todo) - 1, budget if budget > 0 else PREFILL_CHUNK)
                longest = max([n] + [m for _, m in chunks])
                if chunks and (longest * (len(chunks) + 1) > 2 * (n + sum(m for _, m in chunks)) or n > budget):
                    break
                chunks.append((row, n))
                budget -= n
            if not chunks:
                break
            self._read_chunks(chunks)
            decoding = decoding or any(len(row.todo) == 1 for row, _ in chunks)
        for row in self.rows:  # read, but for its last token (a one-token prompt: nothing to read)
            if row.y is None and len(row.todo) == 1:
                row.y, row.fresh = mx.array([row.todo.pop(), 0], dtype=mx.uint32), True

    def _read_chunks(self, chunks: list):
        """Feed each row its next `n` prompt tokens, all in one pass."""
        T = max(n for _, n in chunks)
        ids = mx.array([row.todo[:n] + [0] * (T - n) for row, n in chunks], dtype=mx.uint32)
        self.model(ids, cache=self._layers([row for row, _ in chunks], [n for _, n in chunks]))
        mx.eval([c.state for row, _ in chunks for c in row.cache.layers])
        distributed.watchdog.beat()
        self.passes += 1
        for row, n in chunks:
            row.cache.ids.extend(row.todo[:n])
            del row.todo[:n]
            row.passes += 1
            if row.progress is not None:
                row.progress(row.total - len(row.todo), row.total)

    def _decode(self, rows: list):
        if not rows:
            return
        plans = [self._plan(row) for row in rows]
        T = max(len(ids) for _, ids, _ in plans)
        inputs = [mx.pad(ids, (0, T - len(ids))) if T > len(ids) else ids for _, ids, _ in plans]
        logits = self.model(mx.stack(inputs), cache=self._layers(rows, [len(ids) for _, ids, _ in plans]))
        self.passes += 1
        outcomes = []  # per row: [next token, rank 0's cancel flag]; after drafts [accepted, next token, flag]
        for i, (row, (kind, ids, drafts)) in enumerate(zip(rows, plans)):
            row.passes += 1
            flag = mx.array([row.stopped()], dtype=mx.uint32)
            if kind != DRAFTS:
                if kind != FRESH and row.processors:  # (without penalties, no history: a graph never evaluated)
                    row.history = mx.concatenate([row.history, ids])
                token = row.sampler(row.processed(logits[i : i + 1, len(ids) - 1], row.history))
                if row.logprobs is not None:
                    row.pending = _scores(logits[i, len(ids) - 1], token, row.logprobs)
                outcomes.append(mx.concatenate([token.astype(mx.uint32), flag]))
                continue
            drafts, probs = drafts
            target = logits[i, : len(ids)]
            if row.processors:  # each position's penalties count the drafts before it
                history = mx.concatenate([row.history, ids])
                target = mx.concatenate([row.processed(target[j : j + 1], history[: len(row.history) + j + 1])
                                         for j in range(len(ids))])
            accepted, token = verify(row.sampler, target, drafts, probs)
            outcomes.append(mx.array([accepted, token, row.stopped()], dtype=mx.uint32))
        agreed = distributed.agree(mx.concatenate(outcomes), self.group)
        mx.async_eval(agreed)  # the next pass is prepared while the takers look at this one's tokens
        at = 0
        for row, (kind, ids, drafts), outcome in zip(rows, plans, outcomes):
            self._take(row, kind, ids, drafts, agreed[at : at + outcome.shape[0]])
            at += outcome.shape[0]

    def _layers(self, rows: list, lengths: list) -> list:
        """What the model takes as its cache for `rows` fed `lengths` tokens each: one row's own layers, or
        per layer the rows' caches (models.cache.Rows)."""
        if len(rows) == 1:
            return rows[0].cache.layers
        return [Rows([row.cache.layers[i] for row in rows], lengths) for i in range(len(self.model.layers))]

    def _plan(self, row: Row) -> tuple:
        """What `row` feeds this pass: (kind, ids (1-D array), drafts) where kind is FRESH (the prompt's last
        token), TOKEN (the one sampled last, lazy), FORCED (ids the taker asked for, in its place) or DRAFTS
        (the token sampled last and the drafts after it); drafts: (draft ids, their distributions or None)."""
        if row.fresh:
            return FRESH, row.y[:1], None
        if row.taker.forced:  # they replace the token sampled last (a thought closed at its budget)
            ids = list(row.taker.forced)
            row.taker.forced.clear()
            return FORCED, mx.array(ids, dtype=mx.uint32), None
        if row.drafter is not None:
            token = row.y[0].item()
            span = row.cache.span()
            room = min(row.taker.room, span if span is not None else row.taker.room) - 1
            drafts, probs = row.drafter.propose(row.cache.ids, token, room, row.taker.boundaries)
            if self.group is not None:  # sampled drafts differ by rank: rank 0's (a fixed size on the wire)
                wire = distributed.agree(mx.array([len(drafts)] + drafts + [0] * (MAX_DRAFT - len(drafts)),
                                                  dtype=mx.uint32), self.group).tolist()
                drafts = wire[1 : 1 + wire[0]]
                probs = probs if self.group.rank() == 0 else None  # this rank's drew others; its verdict is not used
            if drafts:
                return DRAFTS, mx.array([token] + drafts, dtype=mx.uint32), (drafts, probs)
        return TOKEN, row.y[:1], None

    def _take(self, row: Row, kind: str, ids: mx.array, drafts, outcome: mx.array):
        """Give the taker what this pass settled for `row`; rewind its cache past what it did not take."""
        fed = ids.tolist()
        if kind == DRAFTS:
            accepted, token, stop = outcome.tolist()
            row.drafter.pace(len(drafts[0]), accepted)
            settled = fed[: accepted + 1]
        else:
            stop = row.y[1].item()  # the flag that came with the token replaced or fed
            settled = fed
        scores, row.scores = (row.scores if kind == TOKEN else None), row.pending
        if kind == FRESH:  # the prompt's last token: fed, not generated
            row.cache.ids.extend(fed)
            row.fresh, row.y = False, outcome
            if row.progress is not None and row.total > 1:
                row.progress(row.total, row.total)
            return
        taken = 0
        for t in settled:
            taken += 1
            self.generated += 1
            if not (row.taker.take(t) if scores is None else row.taker.take(t, [x.tolist() for x in scores])):
                row.done = True
                break
            if kind != FORCED and row.taker.forced and taken < len(settled):
                break  # forced ids come next: the rest is not fed
        row.cache.ids.extend(fed[:taken])
        row.cache.keep(len(row.cache.ids))  # past the rejected or untaken drafts
        if kind == DRAFTS:
            if row.processors:
                row.history = mx.concatenate([row.history, ids[:taken]])
            row.y = mx.array([token, stop], dtype=mx.uint32)
        else:
            row.y = outcome
        if not row.done and (stop or (self.group is None and row.stopped())):
            row.taker.cancel()
            row.done = True


def _scores(logits: mx.array, token: mx.array, n: int) -> tuple:
    """(the log-probability of `token`, the `n` likeliest ids, theirs): under the model's own distribution, as
    OpenAI reports them (before temperature and filters)."""
    logprobs = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32))
    if not n:
        return logprobs[token[0]], mx.zeros((0,), dtype=mx.uint32), mx.zeros((0,))
    best = mx.argpartition(-logprobs, kth=n - 1)[:n]  # the n best without sorting the vocabulary
    best = best[mx.argsort(-logprobs[best])]
    return logprobs[token[0]], best, logprobs[best]


def generate_step(model, prompt: mx.array, cache: PromptCache, sampler, processors=(),
                  forced: Optional[deque] = None, cancel=None, progress=None):
    """Yield token ids until `cancel` (a threading.Event) is set: the prompt goes through `cache` first,
    then one token at a time; `cache.ids` records every id the model was fed.

    Ids put in `forced` are fed instead of sampled ones. The next step is computed while the caller looks
    at this token. On a model sharded over several ranks, rank 0's tokens and cancel flag are every rank's.
    `progress`: see process_prompt."""
    taker = Taker(forced)
    decoder = Decoder(model)
    row = decoder.add(prompt.tolist(), cache, sampler, processors, taker, cancel, progress)
    while not row.done:
        decoder.step()
        yield from taker.taken
        taker.taken.clear()
