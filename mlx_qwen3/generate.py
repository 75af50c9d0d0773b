"""prepare (prompt -> ids) -> Generation (a Decoder row and its Reply) -> stream_generate (events) -> generate;
ChatSession."""

from dataclasses import dataclass
from typing import Iterator, Optional

import mlx.core as mx

from . import memory
from .decode import Decoder
from .errors import UserError, show
from .models.cache import CacheSetting, PromptCache, PromptCachePool
from .options import GenerationOptions, PromptOptions, check_text
from .reply import GenerationResult, Reply, offers_tools
from .sample import make_processors, make_sampler
from .thinking import starts_in_thinking, thinking_wanted


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to generate from: its ids, the messages they render, the mode in effect, the options,
    how its cache is made for the context it plans (the prompt and max_tokens), and whether it is raw text."""

    ids: list
    messages: list
    thinking: bool
    options: GenerationOptions
    setting: CacheSetting = CacheSetting()
    raw: bool = False  # text fed as it is: the reply is text too (no thinking or tool-call channels)


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


def render_prompt(tokenizer, messages: list, opts: PromptOptions, tools: Optional[list]) -> list:
    for i, message in enumerate(messages):
        for key, value in message.items() if isinstance(message, dict) else ():
            if isinstance(value, str):
                check_text(value, f"message {i}'s {key}", "messages")
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True,
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


def prepare(model, tokenizer, prompt, raw: bool = False, **options) -> Prompt:
    """Check the options, render the prompt (text or messages) with the chat template, tokenize it and
    check it fits the model: everything that can fail before generating. Slow for a big prompt. `raw`: the
    prompt is text fed as it is (no template; its own <think> decides whether the reply starts in a thought)."""
    opts = GenerationOptions.from_kwargs(**options)
    if raw:
        if not isinstance(prompt, str) or not prompt:
            raise UserError("the prompt is empty; give some text", "prompt", "empty_prompt")
        check_text(prompt, "the prompt", "prompt")
        messages, ids = [], tokenizer.encode(prompt)
    else:
        messages = to_messages(prompt, opts.prompt.system)
        ids = render_prompt(tokenizer, messages, opts.prompt, opts.prompt.tools if offers_tools(opts) else None)
    check_ids(model, ids)
    window = model.args.context_window
    if len(ids) >= window:
        # (worded as Anthropic's API words it: Claude Code reads the two numbers to compact its conversation)
        raise UserError(f"the prompt is too long: {len(ids)} tokens > {window} maximum (the context window); shorten "
                        "it", "messages", "context_length_exceeded")
    context = memory.planned_context(model.args, len(ids), opts.stopping.max_tokens)
    kv_bits, kv_start = memory.kv_setting(model, opts.cache.kv_bits, opts.cache.kv_start, len(ids), context)
    setting = CacheSetting(kv_bits, kv_start, model.args.rope_factor(context))
    thinking = starts_in_thinking(ids, tokenizer) if raw else thinking_wanted(messages, opts.prompt.enable_thinking)
    prompt = Prompt(ids, messages, thinking, opts, setting, raw)
    constraint_for(model, tokenizer, prompt)  # a schema that cannot be compiled is refused here, before generating
    return prompt


def constraint_for(model, tokenizer, prompt: Prompt):
    """The logits processor that holds the reply to its structure (options.Structure), or None: a forced call
    (tool_choice "required" or a named function), else a JSON answer (response_format; with tools offered, or
    calls), else with tools each call the model starts (at <tool_call>) held to the tools' schemas. The thought
    is never constrained."""
    from . import structured  # the grammar engine loads on first use

    s, tools = prompt.options.structure, prompt.options.prompt.tools
    offered = offers_tools(prompt.options)
    if not s.forced_call and s.schema is None and not offered:
        return None
    # a thought the prompt opened is free to its end; in thinking mode the reply may open one (Qwen3 does, a
    # Qwen3-Instruct-2507 never does: its first token must be free to be the answer's)
    opened = starts_in_thinking(prompt.ids, tokenizer)
    where = dict(thinking=opened, may_think=prompt.thinking and not opened)
    if s.forced_call:
        if not tools:
            raise UserError(f"tool_choice {show(s.tool_choice, 60)} needs tools", "tool_choice", "invalid_value")
        names = structured.tool_grammar(tools).tools  # (which checks them)
        if s.forced_tool is not None and s.forced_tool not in names:
            raise UserError(f"tool_choice names {show(s.forced_tool, 60)}, which is not among the tools "
                            f"({', '.join(map(str, names))})", "tool_choice", "invalid_value")
        grammar = structured.tool_grammar(tools, s.forced_tool, s.parallel_tool_calls)
    elif s.schema is not None and offered:  # a JSON answer, or calls
        answer = structured.json_grammar(s.schema, s.strict)
        calls = structured.tool_grammar(tools, None, s.parallel_tool_calls)
        for alone in (answer, calls):  # each compiled alone too: an error names its own field
            structured.constraint(tokenizer, model.args.vocab_size, alone, **where)
        grammar = structured.either(answer, calls)
    elif s.schema is not None:
        grammar = structured.json_grammar(s.schema, s.strict)
    else:
        grammar = structured.tool_grammar(tools, None, s.parallel_tool_calls)
        where["trigger"] = tokenizer.token_id("<tool_call>")
    return structured.constraint(tokenizer, model.args.vocab_size, grammar, **where)


class Generation:
    """One reply decoded in a Decoder (with the others it holds): its row and its Reply. After each
    `decoder.step()`, `drain()` gives its new events; once `done`, `result()`."""

    def __init__(self, decoder: Decoder, tokenizer, prompt: Prompt, cache: Optional[PromptCache] = None,
                 cancel=None, progress=None):
        model = decoder.model
        self.prompt = prompt
        self.cache = cache = PromptCache.new(model, prompt.setting) if cache is None else cache
        todo = cache.reuse_for(prompt.ids)
        self.reused = len(cache.ids)
        self.rescaled_from, cache.rescaled_from = cache.rescaled_from, None  # reported once
        opts = prompt.options
        max_tokens = min(opts.stopping.max_tokens, model.args.context_window - len(prompt.ids))
        params = opts.sampling.resolve(prompt.thinking, tokenizer.generation_config)
        draw = (params["temperature"], params["top_p"], params["top_k"], params["min_p"])
        seed = opts.sampling.seed
        processors = make_processors(opts.sampling.presence_penalty, opts.sampling.repetition_penalty,
                                     opts.sampling.frequency_penalty)
        constraint = constraint_for(model, tokenizer, prompt)
        if constraint is not None:  # after the penalties: a token it rules out stays ruled out
            processors.append(constraint)
        self.reply = Reply(tokenizer, prompt, max_tokens)
        check_ids(model, self.reply.budget.ending + self.reply.budget.nudge)
        # the draft model draws with the same parameters from its own random stream
        draft_sampler = None if decoder.draft_model is None else make_sampler(*draw, None if seed is None else seed + 1)
        self.row = decoder.add(todo, cache, make_sampler(*draw, seed), processors, self.reply, cancel, progress,
                               opts.drafting, draft_sampler, opts.sampling.logprobs)

    @property
    def done(self) -> bool:
        return self.row.done

    def drain(self) -> list:
        return self.reply.drain()

    def result(self) -> GenerationResult:
        drafter = self.row.drafter
        return self.reply.result(
            len(self.prompt.ids), self.reused, rope_factor=self.cache.setting.rope_factor,
            rescaled_from=self.rescaled_from, forward_passes=self.row.passes,
            drafted_tokens=0 if drafter is None else drafter.drafted,
            accepted_tokens=0 if drafter is None else drafter.accepted)


def stream_generate(model, tokenizer, prompt, cache: Optional[PromptCache] = None, cancel=None,
                    progress=None, draft_model=None, **options) -> Iterator:
    """Stream a reply to a prompt (a string), a conversation (a list of messages) or a prepared Prompt.

    Args:
        prompt: text (wrapped as one user message), [{"role", "content"}, ...], or prepare()'s Prompt.
        cache: a PromptCache to start from: the prefix it shares with the prompt is not computed again,
            and it holds the whole exchange afterwards. None: a new one.
        cancel: a threading.Event; set it from another thread to stop.
        progress: called as progress(done, total) after each chunk of the prompt's processing, where
            total counts the tokens not reused from `cache`; the last call has done == total. Not called
            when only the last token is left to feed. On several ranks, called on each.
        draft_model: a smaller model of the same vocabulary (Qwen3-0.6B for any Qwen3) whose drafts the
            model checks several at a time (speculative decoding; num_draft, prompt_lookup in options).
        options: see options.py (max_tokens, temperature, top_p, top_k, min_p, presence_penalty,
            frequency_penalty, repetition_penalty, seed, stop, enable_thinking, thinking_budget,
            wrap_up, system, tools, chat_template_kwargs, kv_bits, kv_start, loop_guard, loop_repeats,
            loop_min_tokens, loop_recurring, loop_window, prompt_lookup, num_draft); with a Prompt, give
            them to prepare(). kv_bits/kv_start apply to the cache made here (not to one given).

    Returns:
        An iterator of Events (.type thinking | answer | tool_call, .text), then a
        GenerationResult with .type "done".
    """
    if not isinstance(prompt, Prompt):
        prompt = prepare(model, tokenizer, prompt, **options)
    elif options:
        raise UserError(f"a prepared prompt carries its options: give {sorted(options)[0]!r} to prepare()")
    decoder = Decoder(model, draft_model)
    generation = Generation(decoder, tokenizer, prompt, cache, cancel, progress)
    mx.reset_peak_memory()
    with memory.wired.hold(model):
        while not generation.done:
            decoder.step()
            yield from generation.drain()
    yield generation.result()


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

    def __init__(self, model, tokenizer, system: Optional[str] = None, draft_model=None, **options):
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
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
                                         progress=progress, draft_model=self.draft_model):
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
