"""prepare (prompt -> ids) -> generate_step (ids) -> stream_generate (events) -> generate; ChatSession."""

import os
import signal

if __name__ == "__main__":  # Ctrl-C while the modules import: exit status 130, as later, not a traceback
    def _leave(*_):
        try:
            os.write(2, b"\n")
        except OSError:
            pass
        os._exit(130)

    signal.signal(signal.SIGINT, _leave)

import json
import sys
import threading
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass
from typing import Iterator, Optional

import mlx.core as mx

from . import memory
from .errors import UserError
from .models.cache import PromptCache, PromptCachePool
from .options import GenerationOptions, PromptOptions, Stopping, check_text
from .sample import make_processors, make_sampler
from .thinking import THINKING, Event, ThinkingRouter, starts_in_thinking, thinking_wanted


def process_prompt(model, ids: mx.array, layers: list, chunk_size: int = 512) -> mx.array:
    """Feed `ids` (B, L) through the model in chunks, filling the per-layer caches; returns the last
    position's logits. All but the last token only fill the cache: their logits are never computed."""
    L = ids.shape[1]
    start = 0
    while start < L - 1:
        n = min(chunk_size, L - 1 - start)
        model(ids[:, start : start + n], cache=layers)
        mx.eval([c.state for c in layers])
        start += n
    return model(ids[:, start:], cache=layers)[:, -1, :]


def generate_step(model, prompt: mx.array, cache: PromptCache, sampler, processors=(),
                  forced: Optional[deque] = None):
    """Yield token ids forever: the prompt goes through `cache` first, then one token at a time; `cache.ids`
    records every id the model was fed.

    Ids put in `forced` are fed instead of sampled ones (how a thinking budget ends a thought).
    The next step is computed while the caller looks at this token (mx.async_eval).
    """
    forced = forced if forced is not None else deque()
    history = mx.zeros((0,), dtype=mx.uint32)

    def sample(logits):
        for p in processors:
            logits = p(history, logits)
        return sampler(logits).astype(mx.uint32)

    y = sample(process_prompt(model, prompt[None], cache.layers))
    cache.ids.extend(prompt.tolist())
    mx.async_eval(y)
    while True:
        if forced:
            y = mx.array([forced.popleft()], dtype=mx.uint32)
        if processors:
            history = mx.concatenate([history, y])
        next_y = sample(model(y[None], cache=cache.layers)[:, -1, :])
        mx.async_eval(next_y)
        token = y.item()
        cache.ids.append(token)
        yield token
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
    type: str = "done"
    text: str = ""


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to generate from: its ids, the messages they render, the mode in effect, the options."""

    ids: list
    messages: list
    thinking: bool
    options: GenerationOptions


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
    return Prompt(ids, messages, thinking_wanted(messages, opts.prompt.enable_thinking), opts)


class ThinkingBudget:
    """Ends a thought that reaches its budget by feeding a wrap-up sentence, </think> and a blank line
    (`forced`, which generate_step feeds instead of sampled tokens)."""

    def __init__(self, tokenizer, stopping: Stopping, max_tokens: int):
        self.forced = deque()
        self.ending, self.budget, self.thought = [], None, 0
        end = tokenizer.token_id("</think>")
        if stopping.thinking_budget is not None and end is not None:
            self.ending = tokenizer.encode(stopping.wrap_up) + [end] + tokenizer.encode("\n\n")
            reserve = max(1, min(512, max_tokens // 4))  # room kept for the answer
            self.budget = max(0, min(stopping.thinking_budget, max_tokens - len(self.ending) - reserve))

    def step(self, before: str, after: str):
        """After a token that took the router from state `before` to `after`."""
        self.thought += before == THINKING and after == THINKING
        if self.budget is not None and after == THINKING and self.thought >= self.budget:
            self.forced.extend(self.ending)
            self.budget = None


class StopStrings:
    """Cuts the answer at the first stop string; text that may be the start of one is held back."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held, self.hit, self.answer = "", False, ""

    def cut(self, events: list, last: bool = False) -> list:
        """The router's events with the answer cut (`last`: let go of what was held)."""
        out = []
        for event in events:
            if event.type == "answer":
                text = "" if last and self.hit else self._feed(event.text) + (self._flush() if last else "")
                event = Event("answer", text)
                self.answer += text
            if event.text or event.tool_call:
                out.append(event)
        return out

    def _feed(self, text: str) -> str:
        buf = self.held + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return buf[: min(found)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep]

    def _flush(self) -> str:
        out, self.held = self.held, ""
        return out


def stream_generate(model, tokenizer, prompt, cache: Optional[PromptCache] = None, cancel=None,
                    **options) -> Iterator:
    """Stream a reply to a prompt (a string), a conversation (a list of messages) or a prepared Prompt.

    Args:
        prompt: text (wrapped as one user message), [{"role", "content"}, ...], or prepare()'s Prompt.
        cache: a PromptCache to start from: the prefix it shares with the prompt is not computed again,
            and it holds the whole exchange afterwards. None: a new one.
        cancel: a threading.Event; set it from another thread to stop.
        options: see options.py (max_tokens, temperature, top_p, top_k, min_p, presence_penalty,
            frequency_penalty, repetition_penalty, seed, stop, enable_thinking, thinking_budget,
            wrap_up, system, tools, chat_template_kwargs); with a Prompt, give them to prepare().

    Returns:
        An iterator of Events (.type thinking | answer | tool_call, .text), then a
        GenerationResult with .type "done".
    """
    if not isinstance(prompt, Prompt):
        prompt = prepare(model, tokenizer, prompt, **options)
    elif options:
        raise UserError(f"a prepared prompt carries its options: give {sorted(options)[0]!r} to prepare()")
    cache = PromptCache.new(model) if cache is None else cache
    todo = cache.reuse_for(prompt.ids)
    reused = len(cache.ids)
    opts = prompt.options
    max_tokens = min(opts.stopping.max_tokens, model.args.context_window - len(prompt.ids))
    params = opts.sampling.resolve(prompt.thinking, tokenizer.generation_config)
    sampler = make_sampler(params["temperature"], params["top_p"], params["top_k"], params["min_p"], opts.sampling.seed)
    processors = make_processors(opts.sampling.presence_penalty, opts.sampling.repetition_penalty,
                                 opts.sampling.frequency_penalty)
    router = ThinkingRouter(tokenizer, thinking=starts_in_thinking(prompt.ids, tokenizer))
    budget = ThinkingBudget(tokenizer, opts.stopping, max_tokens)
    check_ids(model, budget.ending)
    stops = StopStrings(opts.stopping.stop)
    eos = tokenizer.eos_token_ids

    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_time, n, thinking_tokens, finish = None, 0, 0, "length"
    steps = generate_step(model, mx.array(todo, dtype=mx.uint32), cache, sampler, processors, budget.forced)
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
            yield from stops.cut(router.feed(token))
            thinking_tokens += before == THINKING or router.state == THINKING
            budget.step(before, router.state)
            if stops.hit:
                finish = "stop"
                break
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if n >= max_tokens:
                break
    yield from stops.cut(router.finish() + [Event("answer", "")], last=True)
    gen_time = time.perf_counter() - tic
    yield GenerationResult(
        thinking=router.texts[THINKING],
        answer=stops.answer,
        tool_calls=router.tool_calls,
        finish_reason=finish,
        prompt_tokens=len(prompt.ids),
        generation_tokens=n,
        thinking_tokens=thinking_tokens,
        prompt_tps=(len(prompt.ids) - reused) / prompt_time if prompt_time else 0.0,
        generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
        peak_memory=mx.get_peak_memory() / 1e9,
        cached_tokens=reused,
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

    def stream(self, message, cancel=None, **options) -> Iterator:
        """Send a user message (text or a message dict, e.g. a tool result); yields events, then the result."""
        if isinstance(message, str) and not message.strip():
            raise UserError("the message is empty; give some text", "messages", "empty_messages")
        if isinstance(message, str):
            check_text(message, "the message", "messages")
        turn = {"role": "user", "content": message} if isinstance(message, str) else dict(message)
        prompt = prepare(self.model, self.tokenizer, self.messages + [turn], **{**self.options, **options})
        cache = self.pool.take(prompt.ids) or PromptCache.new(self.model)
        result = None
        try:
            for event in stream_generate(self.model, self.tokenizer, prompt, cache=cache, cancel=cancel):
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


# ---- the CLI: a thin shell over stream_generate and ChatSession ----
# Its promises under faults: bad input (an option, a prompt that is not UTF-8) is one line and exit status 2,
# before the model loads; in --chat a bad line is one line and the session goes on. A stdout whose reader
# went away (`| head`) ends it quietly with exit status 141; a full one (`> /dev/full`) is one line and
# exit status 1 (errors.run_cli). Ctrl-C stops a reply (exit status 130), a second one stops at once.

DIM, RESET = "\x1b[2m", "\x1b[0m"


class Printer:
    """Shows events: on a terminal thinking is dimmed and labelled; --json gives one object per line."""

    def __init__(self, as_json: bool, hide_thinking: bool, tty: bool):
        self.as_json, self.hide_thinking, self.tty = as_json, hide_thinking, tty
        self.channel = None
        # JSON escapes what a stdout that is not UTF-8 cannot show (plain text: see _prepare_stdout)
        self.ascii = not _is_utf8(getattr(sys.stdout, "encoding", None))

    def show(self, event) -> Optional[GenerationResult]:
        out = sys.stdout
        if self.as_json:
            if event.type == "done":
                record = {k: v for k, v in vars(event).items() if k != "text"}
            else:
                record = {"type": event.type, "text": event.text}
                if event.tool_call is not None:
                    record["tool_call"] = event.tool_call
            if event.type != "thinking" or not self.hide_thinking:
                print(json.dumps(record, ensure_ascii=self.ascii), flush=True)
            return event if event.type == "done" else None
        if event.type == "done":
            self._enter(None)
            print(file=out, flush=True)
            print(_stats(event), file=sys.stderr)
            return event
        if event.type == "thinking" and self.hide_thinking:
            return None
        self._enter(event.type)
        if event.type == "tool_call":
            call = event.tool_call
            text = f"[tool call] {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})"
            if call.get("error"):
                text = f"[tool call, {call['error']}] {event.text}"
            out.write(text + "\n")
        else:
            out.write(event.text)
        out.flush()
        return None

    def abandon(self):
        """A stream cut short (a second Ctrl-C, a failed write): on a terminal, end the dimming, so that
        the shell's prompt is not left dim."""
        if self.tty and not self.as_json and self.channel == "thinking":
            try:
                sys.stdout.write(RESET + "\n")
                sys.stdout.flush()
            except Exception:  # the stream is what failed: nothing more to show
                pass
        self.channel = None

    def _enter(self, channel):
        """Open or close the thinking block when the channel changes."""
        if channel == self.channel:
            return
        out = sys.stdout
        if self.channel == "thinking":
            out.write(RESET + "\n\n" if self.tty else "\n</think>\n\n")
        elif self.channel == "answer" and channel == "tool_call":
            out.write("\n")
        if channel == "thinking":
            out.write(DIM + "Thinking:\n" if self.tty else "<think>\n")
        self.channel = channel


def _stats(r: GenerationResult) -> str:
    return (f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
            f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
            f"peak memory: {r.peak_memory:.2f} GB | finish: {r.finish_reason}")


def _show_stream(events, printer: Printer, cancel) -> GenerationResult:
    """Print a stream; the first Ctrl-C cancels generation cleanly, a second one stops at once."""
    def on_sigint(*_):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = None
        for event in events:
            result = printer.show(event) or result
        return result
    except BaseException:
        printer.abandon()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        if hasattr(events, "close"):
            events.close()  # now, not when the garbage collector gets to it


def _is_utf8(encoding: Optional[str]) -> bool:
    import codecs

    try:
        return codecs.lookup(encoding or "").name == "utf-8"
    except LookupError:
        return False


def _prepare_stdout():
    """Text a stdout that is not UTF-8 cannot encode (a latin-1 locale, PYTHONIOENCODING=ascii) is
    written as backslash escapes, not a UnicodeEncodeError. Lone surrogates never reach it."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and not _is_utf8(getattr(sys.stdout, "encoding", None)):
        reconfigure(errors="backslashreplace")


def _read_stdin() -> str:
    """All of stdin, as the prompt. Bytes that are not text in stdin's encoding (UTF-8, as a rule) are
    refused, not replaced: a prompt must not change meaning unseen. Newlines as text mode reads them."""
    encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # stdin replaced by a text stream: it has decoded already
        return sys.stdin.read()
    data = buffer.read()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        name = "UTF-8" if _is_utf8(encoding) else encoding
        raise UserError(f"stdin is not valid {name}: byte 0x{data[e.start]:02x} at offset {e.start}; "
                        f"convert it first (e.g. iconv -f latin1 -t utf-8)") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def main():
    import click

    from .errors import run_cli
    from .load import load

    if sys.stdout is None:  # started with stdout closed (>&-); stderr may be closed too
        if sys.stderr is not None:
            print("error: cannot write the output: stdout is closed", file=sys.stderr)
        sys.exit(1)

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--model", required=True, help="Model folder or Hugging Face Hub id.")
    @click.option("--prompt", default=None, help="The prompt; - reads it from stdin.")
    @click.option("--system", default=None, help="A system message.")
    @click.option("--max-tokens", type=int, default=8192, show_default=True)
    @click.option("--temp", "temperature", type=float, default=None, help="Default: per mode (0.6 thinking, 0.7 not).")
    @click.option("--top-p", type=float, default=None, help="Default: per mode (0.95 thinking, 0.8 not).")
    @click.option("--top-k", type=int, default=None, help="Default: 20.")
    @click.option("--min-p", type=float, default=None, help="Default: 0.")
    @click.option("--presence-penalty", type=float, default=0.0, show_default=True)
    @click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
    @click.option("--seed", type=int, default=None)
    @click.option("--think/--no-think", "enable_thinking", default=None, help="Default: the model's (thinking on).")
    @click.option("--thinking-budget", type=int, default=None, help="End the thought after N tokens.")
    @click.option("--hide-thinking", is_flag=True, help="Do not print the thinking.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per event and line.")
    @click.option("--chat", is_flag=True, help="An interactive chat (/think, /no_think, /budget N, /reset, /exit).")
    def cli(model, prompt, chat, hide_thinking, as_json, **options):
        """Generate with a Qwen3 / Qwen3-MoE / QwQ model."""
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here click makes Ctrl-C exit status 130
        cancel = threading.Event()
        GenerationOptions.from_kwargs(**options)  # bad values fail before the model loads
        if prompt is None and not chat:
            raise UserError("give --prompt TEXT (or --prompt - to read stdin), or --chat")
        if prompt == "-":
            prompt = _read_stdin()
        elif prompt is not None:
            check_text(prompt, "--prompt")
        if prompt is not None:
            to_messages(prompt)
        model, tokenizer = load(model)
        _prepare_stdout()
        printer = Printer(as_json, hide_thinking, sys.stdout.isatty())
        if not chat:
            result = _show_stream(stream_generate(model, tokenizer, prompt, cancel=cancel, **options), printer, cancel)
            return 130 if result.finish_reason == "cancelled" else 0
        return _repl(ChatSession(model, tokenizer, **options), printer, prompt)

    run_cli(cli)


def _repl(session: ChatSession, printer: Printer, first: Optional[str]) -> int:
    commands = "/think, /no_think, /budget N (or off), /reset, /exit"
    print(f"chat: {commands}; Ctrl-C stops a reply, Ctrl-D leaves", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 arrives, to be refused alone
        sys.stdin.reconfigure(errors="surrogateescape")
    line = first
    while True:
        if line is None:
            try:
                line = input(">>> ")
            except EOFError:
                return 0
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return 130
            except UnicodeDecodeError as e:  # only where stdin could not be reconfigured
                print(f"error: that line is not valid {e.encoding}; nothing was sent", file=sys.stderr)
                continue
        line, text = None, line.strip()
        if not text:
            continue
        try:
            check_text(text, "that line")
        except UserError as e:
            print(f"error: {e}; nothing was sent", file=sys.stderr)
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            session.reset()
        elif text in ("/think", "/no_think"):
            session.options["enable_thinking"] = text == "/think"
        elif text.startswith("/budget"):
            arg = (text.split()[1:] or ["?"])[0]
            if arg == "off":
                session.options["thinking_budget"] = None
            elif (budget := _count(arg)) is not None:
                session.options["thinking_budget"] = budget
            else:
                print("usage: /budget N, or /budget off", file=sys.stderr)
        elif text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(commands, file=sys.stderr)
        else:
            cancel = threading.Event()
            try:
                _show_stream(session.stream(text, cancel=cancel), printer, cancel)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
            printer.channel = None


def _count(text: str) -> Optional[int]:
    """A whole number >= 0 written in digits, or None ("²" is a digit to str.isdigit, not to int)."""
    try:
        return int(text) if text.isdigit() else None
    except ValueError:  # that, or more digits than int() reads (4,300)
        return None


if __name__ == "__main__":
    main()
