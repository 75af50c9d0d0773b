"""What one generation makes of the tokens the decoder gives it (Reply): events by channel, the thinking
budget, the loop guard, stop strings and the end of the reply; then its GenerationResult. The decoder
(decode.py) knows nothing of text; a Reply knows nothing of the model."""

import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from .loop_guard import Endings, LoopGuard
from .stopping import AnswerLoops, StopStrings, ThinkingBudget
from .thinking import ANSWER, THINKING, Event, ThinkingRouter, starts_in_thinking


def offers_tools(opts) -> bool:
    """Whether the model is offered tools (GenerationOptions): then its calls are parsed into tool_calls; else a
    call it writes stays in the answer's text (Qwen-Agent writes the tools into the system message itself)."""
    return bool(opts.prompt.tools) and opts.structure.tool_choice != "none"


@dataclass
class GenerationResult:
    """What a generation produced; also the last event of a stream, with type "done"."""

    thinking: str
    answer: str
    tool_calls: list
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    generation_tokens: int
    thinking_tokens: int  # of generation_tokens, those spent thinking (the tags included)
    prompt_tps: float
    generation_tps: float
    peak_memory: float  # GB
    cached_tokens: int = 0  # of prompt_tokens, those the cache given already held
    rope_factor: float = 1.0  # the YaRN factor the context was rotated with (1: plain RoPE)
    rescaled_from: Optional[float] = None  # the conversation outgrew its cache of this factor: processed again
    # what the loop guard did: {"channel": thinking | answer, "kind": repeat | recurring, "period" (tokens),
    # "position" (of the generated token that completed the loop, from 0), "action": nudged | closed | stopped}
    loops: list = field(default_factory=list)
    # speculative decoding: tokens proposed by a draft (prompt lookup or a draft model) and, of those, the
    # ones the model accepted; forward_passes: the model calls this reply took part in (prompt chunks too)
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    forward_passes: int = 0
    logprobs: list = field(default_factory=list)  # with logprobs: OpenAI's entry for each answer token
    stop_sequence: Optional[str] = None  # the stop string that ended the answer (Anthropic's Messages names it)
    type: str = "done"
    text: str = ""


class Reply:
    """Takes a generation's tokens one by one (`take`), gives out its events (`events`, drained by the
    caller), and knows when it is over (`finish` set). `forced`: ids the decoder feeds instead of sampled
    ones (how a thinking budget or the loop guard ends a thought)."""

    def __init__(self, tokenizer, prompt, max_tokens: int):
        opts = prompt.options
        self.max_tokens = max_tokens
        self.router = ThinkingRouter(tokenizer, thinking=not prompt.raw and starts_in_thinking(prompt.ids, tokenizer),
                                     tools=offers_tools(opts), channels=not prompt.raw)
        settings = opts.loops.settings  # None: the loop guard is off
        guards = [None, None] if settings is None else [LoopGuard(Endings.of(tokenizer), settings) for _ in range(2)]
        self.budget = ThinkingBudget(tokenizer, opts.stopping, max_tokens, guards[0])  # one guard per channel
        self.forced = self.budget.forced
        # an answer held to a grammar is left to it: a JSON list of like records is no loop, and a cut would break it
        s = opts.structure
        held = s.schema is not None or (offers_tools(opts) and s.forced_call)
        self.answer = AnswerLoops(None if held else guards[1])
        # they change the channel: what is held goes before them
        self.special = {i for i in self.router.ids.values() if i is not None}
        self.stops = StopStrings(opts.stopping.stop)
        self.eos = tokenizer.eos_token_ids
        self.boundaries = frozenset(self.special | set(self.eos))  # a draft stops after one: a channel change, an end
        self.events = []
        self.tokenizer, self.scored = tokenizer, []  # with logprobs: the answer tokens' whose text was given out
        self.unsent = []  # and those whose text is still held (or dropped: a stripped newline, a stop string)
        self.owed = b""  # the text of a given token that is still to come
        self.n = self.thinking_tokens = 0
        self.finish = None  # stop | length | cancelled, once over
        self.started, self.first = time.perf_counter(), None  # when it began; when its first token came
        self.budget.step(self.router.state, self.router.state)  # a budget of 0 ends a thought the prompt opened

    @property
    def room(self) -> int:
        """Tokens the reply may still take."""
        return self.max_tokens - self.n

    def take(self, token: int, scores: Optional[tuple] = None) -> bool:
        """One generated token; returns whether the reply goes on. `scores` (with logprobs): its log-probability,
        and its alternatives' ids and log-probabilities, best first."""
        if self.first is None:
            self.first = time.perf_counter()
        if token in self.eos:
            return self._end("stop")
        self.n += 1
        router, stops = self.router, self.stops
        before = router.state
        events = stops.cut(router.feed(token))
        if scores is not None and before == ANSWER == router.state and token not in self.special:
            self.unsent.append(self._logprob(token, *scores))
        if before == ANSWER and token not in self.special and not stops.hit:
            events, looped = self.answer.feed(token, events, self.n - 1)
        else:
            events, looped = self.answer.release(events), False
        self._give_scores(events)
        self.events.extend(events)
        self.thinking_tokens += before == THINKING or router.state == THINKING
        self.budget.step(before, router.state, token, self.n - 1)
        if stops.hit or looped:
            return self._end("stop")
        if self.n >= self.max_tokens:
            return self._end("length")
        return True

    def cancel(self):
        if self.finish is None:
            self._end("cancelled")

    def _end(self, finish: str) -> bool:
        self.finish = finish
        rest = self.router.finish() + [Event(ANSWER, "")]  # after a loop: the dropped copy's, never given out
        events = self.answer.release([] if self.answer.loops else self.stops.cut(rest, last=True))
        self._give_scores(events)
        self.events.extend(events)
        return False

    def _logprob(self, token: int, logprob: float, ids: list, logprobs: list) -> dict:
        """OpenAI's entry for one token: its text, bytes (a token may hold part of a character), log-probability,
        and the alternatives'."""
        def entry(t, lp):
            raw = self.tokenizer.token_bytes(t)
            return {"token": raw.decode("utf-8", "replace"), "logprob": lp, "bytes": list(raw)}

        return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in zip(ids, logprobs)]}

    def _give_scores(self, events: list):
        """Each answer event carries the entries of the tokens whose text begins in it (text lags its tokens); a
        token of newlines that is not there was stripped, and goes, as do tokens a stop string cut away."""
        for event in events:
            if event.type != ANSWER or not (self.unsent or self.owed):
                continue
            text, at, given = event.text.encode(), 0, []
            while at < len(text):
                if self.owed:  # the rest of a token already given
                    n = 0
                    while n < min(len(self.owed), len(text) - at) and self.owed[n] == text[at + n]:
                        n += 1
                    at, self.owed = at + n, self.owed[n:] if n else b""
                    continue
                if not self.unsent:
                    break
                piece = bytes(self.unsent[0]["bytes"])
                if not text.startswith(b"\n", at):  # newlines the router stripped
                    piece = piece.lstrip(b"\n")
                entry = self.unsent.pop(0)
                if piece and piece[0] == text[at]:
                    given.append(entry)
                    self.owed = piece
            event.logprobs = given
            self.scored += given

    def drain(self) -> list:
        events, self.events = self.events, []
        return events

    def result(self, prompt_tokens: int, cached: int, **fields) -> GenerationResult:
        """The result of a finished reply; `fields`: what the decoder and the cache know (GenerationResult's)."""
        now = time.perf_counter()
        first = self.first or now
        prompt_time, gen_time = first - self.started, now - first
        return GenerationResult(
            thinking=self.router.texts[THINKING],
            answer=self.answer.text,
            tool_calls=self.router.tool_calls,
            finish_reason=self.finish,
            prompt_tokens=prompt_tokens,
            generation_tokens=self.n,
            thinking_tokens=self.thinking_tokens,
            prompt_tps=(prompt_tokens - cached) / prompt_time if prompt_time > 0 and self.first else 0.0,
            generation_tps=(self.n - 1) / gen_time if self.n > 1 and gen_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            cached_tokens=cached,
            loops=self.budget.loops + self.answer.loops,
            logprobs=self.scored,
            stop_sequence=self.stops.hit,
            **fields,
        )
