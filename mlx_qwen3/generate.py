"""prepare (prompt -> ids) -> generate_step (ids) -> stream_generate (events) -> generate; ChatSession."""

import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.core as mx

from . import distributed, memory
from .errors import UserError
from .models.cache import CacheSetting, PromptCache, PromptCachePool
from .loop_guard import Endings, LoopGuard
from .options import GenerationOptions, PromptOptions, check_text
from .sample import make_processors, make_sampler
from .stopping import AnswerLoops, StopStrings, ThinkingBudget
from .thinking import ANSWER, THINKING, Event, ThinkingRouter, starts_in_thinking, thinking_wanted


PREFILL_CHUNK = 512  # prompt tokens per model call: bounds the working memory of a long prompt


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


def generate_step(model, prompt: mx.array, cache: PromptCache, sampler, processors=(),
                  forced: Optional[deque] = None, cancel=None, progress=None):
    """Yield token ids until `cancel` (a threading.Event) is set: the prompt goes through `cache` first,
    then one token at a time; `cache.ids` records every id the model was fed.

    Ids put in `forced` are fed instead of sampled ones (how a thinking budget ends a thought).
    The next step is computed while the caller looks at this token (mx.async_eval).
    On a model sharded over several ranks, rank 0's token and its cancel flag are every rank's, so all
    ranks feed the same ids and stop after the same token. `progress`: see process_prompt.
    """
    forced = forced if forced is not None else deque()
    history = mx.zeros((0,), dtype=mx.uint32)
    group = distributed.group_of(model)

    def sample(logits):  # -> [token, stop]
        for p in processors:
            logits = p(history, logits)
        stop = mx.array([cancel is not None and cancel.is_set()], dtype=mx.uint32)
        return distributed.agree(mx.concatenate([sampler(logits).astype(mx.uint32), stop]), group)

    with distributed.watchdog.waiting(group):  # on several ranks: a lost one ends the wait, not a hang
        y = sample(process_prompt(model, prompt[None], cache.layers, progress=progress))
        mx.async_eval(y)
    cache.ids.extend(prompt.tolist())
    while True:
        if forced:
            y = mx.concatenate([mx.array([forced.popleft()], dtype=mx.uint32), y[1:]])
        if processors:
            history = mx.concatenate([history, y[:1]])
        with distributed.watchdog.waiting(group):
            next_y = sample(model(y[None, :1], cache=cache.layers)[:, -1, :])
            mx.async_eval(next_y)
            token, stop = y.tolist()
        cache.ids.append(token)
        yield token
        if stop or (group is None and cancel is not None and cancel.is_set()):
            return
        y = next_y


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
    type: str = "done"
    text: str = ""


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to generate from: its ids, the messages they render, the mode in effect, the options,
    and how its cache is made for the context it plans (the prompt and max_tokens)."""

    ids: list
    messages: list
    thinking: bool
    options: GenerationOptions
    setting: CacheSetting = CacheSetting()


def to_messages(prompt, system: Optional[str] = None) -> list:
    """A plain prompt becomes one user message; a message list is taken as it is."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError("the prompt is empty; give some text", "messages", "empty_messages")
        check_text(prompt, "the prompt", "messages")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        if not messages:
            raise UserError("the conversation is empty; give at least one message", "messages", "empty_messages")
    if system is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_prompt(tokenizer, messages: list, opts: PromptOptions) -> list:
    for i, message in enumerate(messages):
        for key, value in message.items() if isinstance(message, dict) else ():
            if isinstance(value, str):
                check_text(value, f"message {i}'s {key}", "messages")
    text = tokenizer.apply_chat_template(
        messages, tools=opts.tools, add_generation_prompt=True,
        **{"enable_thinking": opts.enable_thinking, **opts.chat_template_kwargs},
    )
    check_text(text, "the prompt (with its tools and template arguments)", "messages")  # what the loop cannot see
    return tokenizer.encode(text)


def check_ids(model, ids: list):
    """Never feed an id the embedding has no row for (MLX would read past it, unchecked)."""
    rows = model.args.vocab_size
    top = max(ids, default=0)
    if top >= rows:
        raise UserError(f"token id {top} is past the model's {rows}-row embedding; "
                        "the tokenizer does not belong to this model")


def prepare(model, tokenizer, prompt, **options) -> Prompt:
    """Check the options, render the prompt (text or messages) with the chat template, tokenize it and
    check it fits the model: everything that can fail before generating. Slow for a big prompt."""
    opts = GenerationOptions.from_kwargs(**options)
    messages = to_messages(prompt, opts.prompt.system)
    ids = render_prompt(tokenizer, messages, opts.prompt)
    check_ids(model, ids)
    window = model.args.context_window
    if len(ids) >= window:
        raise UserError(f"the prompt is {len(ids)} tokens; the context window is {window}", "messages",
                        "context_length_exceeded")
    context = memory.planned_context(model.args, len(ids), opts.stopping.max_tokens)
    kv_bits, kv_start = memory.kv_setting(model, opts.cache.kv_bits, opts.cache.kv_start, len(ids), context)
    setting = CacheSetting(kv_bits, kv_start, model.args.rope_factor(context))
    return Prompt(ids, messages, thinking_wanted(messages, opts.prompt.enable_thinking), opts, setting)


def stream_generate(model, tokenizer, prompt, cache: Optional[PromptCache] = None, cancel=None,
                    progress=None, **options) -> Iterator:
    """Stream a reply to a prompt (a string), a conversation (a list of messages) or a prepared Prompt.

    Args:
        prompt: text (wrapped as one user message), [{"role", "content"}, ...], or prepare()'s Prompt.
        cache: a PromptCache to start from: the prefix it shares with the prompt is not computed again,
            and it holds the whole exchange afterwards. None: a new one.
        cancel: a threading.Event; set it from another thread to stop.
        progress: called as progress(done, total) after each chunk of the prompt's processing, where
            total counts the tokens not reused from `cache`; the last call has done == total. Not called
            when only the last token is left to feed. On several ranks, called on each.
        options: see options.py (max_tokens, temperature, top_p, top_k, min_p, presence_penalty,
            frequency_penalty, repetition_penalty, seed, stop, enable_thinking, thinking_budget,
            wrap_up, system, tools, chat_template_kwargs, kv_bits, kv_start, loop_guard, loop_repeats,
            loop_min_tokens, loop_recurring, loop_window); with a Prompt, give them to prepare().
            kv_bits/kv_start apply to the cache made here (not to one given).

    Returns:
        An iterator of Events (.type thinking | answer | tool_call, .text), then a
        GenerationResult with .type "done".
    """
    if not isinstance(prompt, Prompt):
        prompt = prepare(model, tokenizer, prompt, **options)
    elif options:
        raise UserError(f"a prepared prompt carries its options: give {sorted(options)[0]!r} to prepare()")
    cache = PromptCache.new(model, prompt.setting) if cache is None else cache
    todo = cache.reuse_for(prompt.ids)
    reused = len(cache.ids)
    rescaled_from, cache.rescaled_from = cache.rescaled_from, None  # reported once
    opts = prompt.options
    max_tokens = min(opts.stopping.max_tokens, model.args.context_window - len(prompt.ids))
    params = opts.sampling.resolve(prompt.thinking, tokenizer.generation_config)
    sampler = make_sampler(params["temperature"], params["top_p"], params["top_k"], params["min_p"], opts.sampling.seed)
    processors = make_processors(opts.sampling.presence_penalty, opts.sampling.repetition_penalty,
                                 opts.sampling.frequency_penalty)
    router = ThinkingRouter(tokenizer, thinking=starts_in_thinking(prompt.ids, tokenizer))
    settings = opts.loops.settings  # None: the loop guard is off
    guards = [None, None] if settings is None else [LoopGuard(Endings.of(tokenizer), settings) for _ in range(2)]
    budget = ThinkingBudget(tokenizer, opts.stopping, max_tokens, guards[0])  # one guard per channel
    check_ids(model, budget.ending + budget.nudge)
    answer = AnswerLoops(guards[1])
    special = set(router.ids.values())  # they change the channel: what is held goes out before their events
    stops = StopStrings(opts.stopping.stop)
    eos = tokenizer.eos_token_ids

    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_time, n, thinking_tokens, finish = None, 0, 0, "length"
    steps = generate_step(model, mx.array(todo, dtype=mx.uint32), cache, sampler, processors, budget.forced, cancel,
                          progress=progress)
    budget.step(router.state, router.state)  # a budget of 0 ends a thought the prompt opened at once
    with memory.wired.hold(model), closing(steps):
        for token in steps:
            if prompt_time is None:
                prompt_time, tic = time.perf_counter() - tic, time.perf_counter()
            if token in eos:
                finish = "stop"
                break
            n += 1
            before = router.state
            events = stops.cut(router.feed(token))
            if before == ANSWER and token not in special and not stops.hit:
                events, looped = answer.feed(token, events, n - 1)
            else:
                events, looped = answer.release(events), False
            yield from events
            thinking_tokens += before == THINKING or router.state == THINKING
            budget.step(before, router.state, token, n - 1)
            if stops.hit or looped:
                finish = "stop"
                break
            if n >= max_tokens:
                break
        else:  # the steps end only when cancelled
            finish = "cancelled"
    rest = router.finish() + [Event("answer", "")]  # after a loop: the dropped copy's, never to be given out
    yield from answer.release([] if answer.loops else stops.cut(rest, last=True))  # nothing held is lost
    gen_time = time.perf_counter() - tic
    yield GenerationResult(
        thinking=router.texts[THINKING],
        answer=answer.text,
        tool_calls=router.tool_calls,
        finish_reason=finish,
        prompt_tokens=len(prompt.ids),
        generation_tokens=n,
        thinking_tokens=thinking_tokens,
        prompt_tps=(len(prompt.ids) - reused) / prompt_time if prompt_time else 0.0,
        generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
        peak_memory=mx.get_peak_memory() / 1e9,
        cached_tokens=reused,
        rope_factor=cache.setting.rope_factor,
        rescaled_from=rescaled_from,
        loops=budget.loops + answer.loops,
    )


def generate(model, tokenizer, prompt, **kwargs) -> GenerationResult:
    """Generate a whole reply; the same arguments as stream_generate. Returns a GenerationResult."""
    for event in stream_generate(model, tokenizer, prompt, **kwargs):
        pass
    return event


class ChatSession:
    """A conversation that keeps its history and its KV cache: a new turn processes only new tokens.

    The template drops earlier turns' thinking, so each turn rewinds the cache to the longest
    prefix it shares with the new prompt before going on.
    """

    def __init__(self, model, tokenizer, system: Optional[str] = None, **options):
        self.model, self.tokenizer = model, tokenizer
        self.options = options
        self.messages = [] if system is None else [{"role": "system", "content": system}]
        self.pool = PromptCachePool(max_entries=1)  # this conversation's cache, between turns

    def reset_cache(self):
        self.pool.clear()

    def reset(self):
        self.messages = self.messages[:1] if self.messages and self.messages[0]["role"] == "system" else []
        self.reset_cache()

    def stream(self, message, cancel=None, progress=None, **options) -> Iterator:
        """Send a user message (text or a message dict, e.g. a tool result); yields events, then the result.

        Args:
            message: text, or a message dict.
            cancel, progress: as in stream_generate.
            options: per-turn options, over the session's.

        Returns:
            An iterator of Events, then a GenerationResult.
        """
        if isinstance(message, str) and not message.strip():
            raise UserError("the message is empty; give some text", "messages", "empty_messages")
        if isinstance(message, str):
            check_text(message, "the message", "messages")
        turn = {"role": "user", "content": message} if isinstance(message, str) else dict(message)
        prompt = prepare(self.model, self.tokenizer, self.messages + [turn], **{**self.options, **options})
        cache = self.pool.start(self.model, prompt.ids, prompt.setting)
        result = None
        try:
            for event in stream_generate(self.model, self.tokenizer, prompt, cache=cache, cancel=cancel,
                                         progress=progress):
                result = event
                yield event
        finally:
            self.pool.put(cache)  # kept only if whole (not after a failure in the middle of a step)
        self.messages = prompt.messages + [_assistant_message(result)]

    def send(self, message, **kwargs) -> GenerationResult:
        for event in self.stream(message, **kwargs):
            pass
        return event


def _assistant_message(result: GenerationResult) -> dict:
    message = {"role": "assistant", "content": result.answer}
    if result.thinking:
        message["reasoning_content"] = result.thinking
    if result.tool_calls:
        message["tool_calls"] = [
            {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in result.tool_calls if c.get("name")
        ]
    return message


if __name__ == "__main__":  # python -m mlx_qwen3.generate is `mlx-qwen3 generate`
    from .cli import main
    main("generate")
