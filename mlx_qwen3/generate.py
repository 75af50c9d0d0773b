"""generate_step (token ids) -> stream_generate (events) -> generate (a result); ChatSession."""

import logging
import math
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


if __name__ == "__main__":  # python -m mlx_qwen3.generate is `mlx-qwen3 generate`
    from .cli import main
    main("generate")
