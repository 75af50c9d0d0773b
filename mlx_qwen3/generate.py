"""generate_step (token ids) -> stream_generate (events) -> generate (a result); ChatSession; the CLI."""

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
import logging
import math
import sys
import threading
import time
from collections import deque
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, fields
from typing import Iterator, Optional

import mlx.core as mx

from .errors import UserError
from .models.base import make_cache, process_prompt, weight_bytes
from .sample import make_processors, make_sampler
from .thinking import Event, ThinkingRouter, starts_in_thinking, thinking_wanted

# Qwen's recommended sampling per mode; generation_config.json overrides, then the caller.
THINKING_DEFAULTS = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
NON_THINKING_DEFAULTS = dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)
log = logging.getLogger(__name__)
WRAP_UP = "\n\nConsidering the limited time, I have to give the solution based on the thinking directly now.\n"


# The arguments the chat template gets from the request itself; chat_template_kwargs may not override them.
# ("self" too: apply_chat_template is a method.)
RESERVED_TEMPLATE_ARGS = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "self"})
_INT, _NUM = (int,), (int, float)
_KIND_NAMES = {_INT: "an integer", _NUM: "a number", (bool,): "a boolean", (str,): "a string",
               (tuple, list): "a list of strings", (list,): "a list", (dict,): "a dict"}
# (option, types, check, the range it checks): every entry point goes through these, once.
_CHECKS = [
    ("max_tokens", _INT, lambda v: v >= 1, "at least 1"),
    ("temperature", _NUM, lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    ("top_p", _NUM, lambda v: 0 < v <= 1, "in (0, 1]"),
    ("top_k", _INT, lambda v: v >= 0, ">= 0 (0: off)"),
    ("min_p", _NUM, lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("presence_penalty", _NUM, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    ("frequency_penalty", _NUM, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    # beyond these, logits divided or multiplied by the penalty overflow half precision
    ("repetition_penalty", _NUM, lambda v: 0.01 <= v <= 10, "in [0.01, 10] (1: off)"),
    ("seed", _INT, lambda v: 0 <= v < 2**64, "in [0, 2**64)"),
    ("thinking_budget", _INT, lambda v: v >= 0, ">= 0"),
    ("enable_thinking", (bool,), lambda v: True, ""),
    ("stop", (tuple, list), lambda v: all(isinstance(s, str) for s in v), "a list of strings"),
    ("wrap_up", (str,), lambda v: True, ""),
    ("system", (str,), lambda v: True, ""),
    ("tools", (list,), lambda v: True, ""),
    ("chat_template_kwargs", (dict,), lambda v: True, ""),
]

_wired_lock = threading.Lock()
_wired = {"users": 0, "old": 0, "warned": False}


def recommended_working_set() -> Optional[int]:
    """The bytes Metal recommends keeping resident on this Mac; None off Metal."""
    return mx.device_info().get("max_recommended_working_set_size") if mx.metal.is_available() else None


@contextmanager
def wired(model):
    """While any generation runs, keep up to the GPU's recommended working set wired (as mlx-lm does),
    so macOS does not page the weights out between tokens; the old limit returns when the last ends.
    Off Metal, nothing to do."""
    limit = recommended_working_set()
    if not limit:
        yield
        return
    with _wired_lock:
        if _wired["users"] == 0:
            if not _wired["warned"] and weight_bytes(model) > 0.9 * limit:
                _wired["warned"] = True
                log.warning("the weights take %d MB of the %d MB Metal keeps resident; generation may be slow",
                            weight_bytes(model) // 2**20, limit // 2**20)
            _wired["old"] = mx.set_wired_limit(limit)
        _wired["users"] += 1
    try:
        yield
    finally:
        with _wired_lock:
            _wired["users"] -= 1
            if _wired["users"] == 0:
                mx.synchronize()  # the limit must not change under a running evaluation
                mx.set_wired_limit(_wired["old"])


def generate_step(model, prompt: mx.array, cache: list, sampler, processors=(), forced: Optional[deque] = None):
    """Yield token ids forever: the prompt goes through `cache` first, then one token at a time.

    Ids put in `forced` are fed instead of sampled ones (how a thinking budget ends a thought).
    The next step is computed while the caller looks at this token (mx.async_eval).
    """
    forced = forced if forced is not None else deque()
    history = mx.zeros((0,), dtype=mx.uint32)

    def sample(logits):
        for p in processors:
            logits = p(history, logits)
        return sampler(logits).astype(mx.uint32)

    y = sample(process_prompt(model, prompt[None], cache))
    mx.async_eval(y)
    while True:
        if forced:
            y = mx.array([forced.popleft()], dtype=mx.uint32)
        if processors:
            history = mx.concatenate([history, y])
        next_y = sample(model(y[None], cache=cache)[:, -1, :])
        mx.async_eval(next_y)
        yield y.item()
        y = next_y


@dataclass(frozen=True)
class GenerationOptions:
    """Everything a caller can set, checked once. None means: the default for the mode in effect."""

    max_tokens: int = 8192
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple = ()  # strings that end the answer (not included in it)
    seed: Optional[int] = None
    enable_thinking: Optional[bool] = None
    thinking_budget: Optional[int] = None
    wrap_up: str = WRAP_UP
    system: Optional[str] = None
    tools: Optional[list] = None
    chat_template_kwargs: dict = field(default_factory=dict)
    cancel: object = None  # a threading.Event: set it from another thread to stop

    def __post_init__(self):
        for name, kind, ok, span in _CHECKS:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, kind) or isinstance(value, bool) and bool not in kind:  # True is an int too
                raise UserError(f"{name} must be {_KIND_NAMES[kind]}, not {value!r}")
            if not ok(value):  # NaN fails every range
                raise UserError(f"{name} must be {span}, not {value}")
        for name in ("stop", "chat_template_kwargs"):  # None: the default, as for every other option
            if getattr(self, name) is None:
                object.__setattr__(self, name, () if name == "stop" else {})
        for name, text in [("wrap_up", self.wrap_up), ("system", self.system)] + [("stop", s) for s in self.stop]:
            if text is not None:
                check_text(text, name)  # what the tokenizer or the stop matching would choke on
        for key in self.chat_template_kwargs:
            if not isinstance(key, str) or key in RESERVED_TEMPLATE_ARGS:
                raise UserError(f"chat_template_kwargs may not set {key!r}: the template gets it from the request "
                                f"itself (reserved: {', '.join(sorted(RESERVED_TEMPLATE_ARGS))})")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "GenerationOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UserError(f"unknown generation option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def sampling(self, thinking: bool, generation_config: dict) -> dict:
        """Mode defaults, then generation_config.json, then what the caller set."""
        params = dict(THINKING_DEFAULTS if thinking else NON_THINKING_DEFAULTS)
        params.update({k: generation_config[k] for k in params if generation_config.get(k) is not None})
        params.update({k: getattr(self, k) for k in params if getattr(self, k) is not None})
        return params


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
    type: str = "done"
    text: str = ""


def check_text(text: str, what: str):
    """Text must be valid Unicode: a lone surrogate cannot be encoded for the tokenizer. One in
    U+DC80..U+DCFF is a byte that was not UTF-8, kept by Python's surrogateescape (sys.argv, stdin
    read so): it is named as that byte, at its offset in the bytes as they came."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = text[e.start]
        if "\udc80" <= c <= "\udcff":
            offset = len(text[:e.start].encode("utf-8"))
            raise UserError(f"{what} is not valid UTF-8: byte 0x{ord(c) - 0xdc00:02x} at offset {offset}") from None
        raise UserError(f"{what} is not valid Unicode: a lone surrogate U+{ord(c):04X} at character {e.start}") from None


def to_messages(prompt, system: Optional[str] = None) -> list:
    """A plain prompt becomes one user message; a message list is taken as it is."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError("the prompt is empty; give some text")
        check_text(prompt, "the prompt")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        if not messages:
            raise UserError("the conversation is empty; give at least one message")
    if system is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def context_window(model) -> int:
    args = model.args
    scaling = args.rope_scaling or {}
    if scaling.get("factor") and scaling.get("original_max_position_embeddings"):
        return max(args.max_position_embeddings, int(scaling["factor"] * scaling["original_max_position_embeddings"]))
    return args.max_position_embeddings


def render_prompt(tokenizer, messages: list, opts: GenerationOptions) -> list:
    for i, message in enumerate(messages):
        for key, value in message.items() if isinstance(message, dict) else ():
            if isinstance(value, str):
                check_text(value, f"message {i}'s {key}")
    text = tokenizer.apply_chat_template(
        messages, tools=opts.tools, add_generation_prompt=True,
        **{"enable_thinking": opts.enable_thinking, **opts.chat_template_kwargs},
    )
    check_text(text, "the prompt (with its tools and template arguments)")  # what the loop above cannot see
    return tokenizer.encode(text)


def run(model, tokenizer, prompt_ids: list, cache: list, opts: GenerationOptions, thinking: bool,
        fed: Optional[list] = None) -> Iterator:
    """Generate after `prompt_ids` (whose first `cache[0].offset` tokens are already in `cache`).

    Yields Events, then the GenerationResult. Every token the model consumed is appended to `fed`.
    """
    window = context_window(model)
    if len(prompt_ids) >= window:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens; the context window is {window}")
    start = cache[0].offset
    params = opts.sampling(thinking, tokenizer.generation_config)
    sampler = make_sampler(params["temperature"], params["top_p"], params["top_k"], params["min_p"], opts.seed)
    processors = make_processors(opts.presence_penalty, opts.repetition_penalty, opts.frequency_penalty)
    router = ThinkingRouter(tokenizer, thinking=starts_in_thinking(prompt_ids, tokenizer))
    eos = tokenizer.eos_token_ids
    max_tokens = min(opts.max_tokens, window - len(prompt_ids))

    forced = deque()
    ending, budget, thought = [], None, 0  # a budget feeds: a wrap-up sentence, </think>, a blank line
    if opts.thinking_budget is not None and tokenizer.token_id("</think>") is not None:
        ending = tokenizer.encode(opts.wrap_up) + [tokenizer.token_id("</think>")] + tokenizer.encode("\n\n")
        reserve = max(1, min(512, max_tokens // 4))  # room kept for the answer
        budget = max(0, min(opts.thinking_budget, max_tokens - len(ending) - reserve))
    check_ids(model, prompt_ids + ending)

    def end_thought_if_due():
        nonlocal budget
        if budget is not None and router.state == "thinking" and thought >= budget:
            forced.extend(ending)
            budget = None

    fed = fed if fed is not None else []
    fed.extend(prompt_ids[start:])
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_time, n, finish = None, 0, "length"
    stops = _StopStrings(opts.stop)
    answer = ""
    thinking_tokens = 0

    def cut(events: list, last: bool = False) -> list:
        """The router's events with the answer cut at a stop string (`last`: let go of what was held)."""
        nonlocal answer
        out = []
        for event in events:
            if event.type == "answer":
                text = "" if last and stops.hit else stops.feed(event.text) + (stops.flush() if last else "")
                event = Event("answer", text)
                answer += text
            if event.text or event.tool_call:
                out.append(event)
        return out

    steps = generate_step(model, mx.array(prompt_ids[start:], dtype=mx.uint32), cache, sampler, processors, forced)
    end_thought_if_due()
    with wired(model), closing(steps):
        for token in steps:
            if prompt_time is None:
                prompt_time = time.perf_counter() - tic
                tic = time.perf_counter()
            fed.append(token)
            if token in eos:
                finish = "stop"
                break
            n += 1
            thinking_before = router.state == "thinking"
            yield from cut(router.feed(token))
            thought += thinking_before and router.state == "thinking"
            thinking_tokens += thinking_before or router.state == "thinking"
            end_thought_if_due()
            if stops.hit:
                finish = "stop"
                break
            if opts.cancel is not None and opts.cancel.is_set():
                finish = "cancelled"
                break
            if n >= max_tokens:
                break
    yield from cut(router.finish() + [Event("answer", "")], last=True)
    gen_time = time.perf_counter() - tic
    yield GenerationResult(
        thinking=router.texts["thinking"],
        answer=answer,
        tool_calls=router.tool_calls,
        finish_reason=finish,
        prompt_tokens=len(prompt_ids),
        generation_tokens=n,
        thinking_tokens=thinking_tokens,
        prompt_tps=(len(prompt_ids) - start) / prompt_time if prompt_time else 0.0,
        generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
        peak_memory=mx.get_peak_memory() / 1e9,
    )


def check_ids(model, ids: list):
    """Never feed an id the embedding has no row for (MLX would read past it, unchecked)."""
    rows = model.args.vocab_size
    top = max(ids, default=0)
    if top >= rows:
        raise UserError(f"token id {top} is past the model's {rows}-row embedding; "
                        "the tokenizer does not belong to this model")


class _StopStrings:
    """Cuts the answer at the first stop string; text that may be the start of one is held back."""

    def __init__(self, stops):
        self.stops = [s for s in ([stops] if isinstance(stops, str) else stops) if s]
        self.held, self.hit = "", False

    def feed(self, text: str) -> str:
        buf = self.held + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return buf[: min(found)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def common_prefix(a: list, b: list) -> int:
    """How many leading tokens two id lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def rewind(cache: list, cached: list, ids: list) -> list:
    """Trim `cache` (which holds `cached`) to the longest prefix it shares with `ids`, keeping at least
    one token of `ids` to feed; returns what the cache then holds."""
    common = min(common_prefix(cached, ids), len(ids) - 1)
    for c in cache:
        c.trim(c.offset - common)
    return cached[:common]


def stream_generate(model, tokenizer, prompt, **options) -> Iterator:
    """Stream a reply to a prompt (a string) or a conversation (a list of messages).

    Args:
        prompt: text (wrapped as one user message) or [{"role", "content"}, ...].
        options: see GenerationOptions (max_tokens, temperature, top_p, top_k, min_p,
            presence_penalty, repetition_penalty, seed, enable_thinking, thinking_budget,
            system, tools, chat_template_kwargs, cancel).

    Returns:
        An iterator of Events (.type thinking | answer | tool_call, .text), then a
        GenerationResult with .type "done".
    """
    opts = GenerationOptions.from_kwargs(**options)
    messages = to_messages(prompt, opts.system)
    ids = render_prompt(tokenizer, messages, opts)
    yield from run(model, tokenizer, ids, make_cache(model), opts, thinking_wanted(messages, opts.enable_thinking))


def generate(model, tokenizer, prompt, **options) -> GenerationResult:
    """Generate a whole reply; the same arguments as stream_generate. Returns a GenerationResult."""
    for event in stream_generate(model, tokenizer, prompt, **options):
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
        self.reset_cache()

    def reset_cache(self):
        self.cache = make_cache(self.model)
        self.cached = []  # the token ids whose keys and values are in the cache

    def reset(self):
        self.messages = self.messages[:1] if self.messages and self.messages[0]["role"] == "system" else []
        self.reset_cache()

    def stream(self, message, **options) -> Iterator:
        """Send a user message (text or a message dict, e.g. a tool result); yields events, then the result."""
        opts = GenerationOptions.from_kwargs(**{**self.options, **options})
        turn = {"role": "user", "content": message} if isinstance(message, str) else dict(message)
        if isinstance(message, str) and not message.strip():
            raise UserError("the message is empty; give some text")
        if isinstance(message, str):
            check_text(message, "the message")
        messages = self.messages + [turn]
        ids = render_prompt(self.tokenizer, messages, opts)
        self.cached = rewind(self.cache, self.cached, ids)
        result = None
        for event in run(self.model, self.tokenizer, ids, self.cache, opts,
                         thinking_wanted(messages, opts.enable_thinking), fed=self.cached):
            result = event
            yield event
        self.messages = messages + [_assistant_message(result)]

    def send(self, message, **options) -> GenerationResult:
        for event in self.stream(message, **options):
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
