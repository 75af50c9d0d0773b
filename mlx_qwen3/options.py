"""What a caller sets for one generation, grouped by what it is (sampling, stopping, prompt) and checked
once. A bad value raises UserError with `param` (the option's name) and `code` (invalid_type,
out_of_range, invalid_value, unknown_parameter), so every entry point reports it without checking again."""

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional, Union

from .errors import UserError, show
from .loop_guard import LoopSettings

# Qwen's recommended sampling per mode; generation_config.json overrides, then the caller.
THINKING_DEFAULTS = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
NON_THINKING_DEFAULTS = dict(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)
WRAP_UP = "\n\nConsidering the limited time, I have to give the solution based on the thinking directly now.\n"
# What a thought that loops is told the first time (loop_guard.py); the second time it is closed with WRAP_UP.
NUDGE = "\n\nWait, I am repeating myself. Let me step back and finish the reasoning.\n\n"
# The arguments the chat template gets from the request itself; chat_template_kwargs may not override them.
# ("self" too: apply_chat_template is a method.)
KV_BITS = ("auto", 16, 8, 4)
MAX_DRAFT = 16  # the most tokens a draft proposes at once (num_draft's ceiling; "auto" adapts below it)  # auto: the least quantization the memory plan fits (memory.kv_setting)
RESERVED_TEMPLATE_ARGS = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "self"})

MAX_LOGPROBS = 20  # alternatives reported per token (OpenAI's limit)
_INT, _NUM, _BITS, _AUTO = (int,), (int, float), (str, int), (int, str)  # _BITS, _AUTO: one kind, two names
_KIND_NAMES = {_INT: "an integer", _NUM: "a number", _BITS: '"auto" or a number of bits', _AUTO: '"auto" or an integer',
               (bool,): "a boolean",
               (str,): "a string", (tuple, list): "a list of strings", (list,): "a list", (dict,): "a dict",
               (str, dict): "a string or an object"}
# option: (types, check, the range it checks)
_CHECKS = {
    "max_tokens": (_INT, lambda v: v >= 1, "at least 1"),
    "temperature": (_NUM, lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    "top_p": (_NUM, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (_INT, lambda v: v >= 0, ">= 0 (0: off)"),
    "min_p": (_NUM, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "presence_penalty": (_NUM, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (_NUM, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    # beyond these, logits divided or multiplied by the penalty overflow half precision
    "repetition_penalty": (_NUM, lambda v: 0.01 <= v <= 10, "in [0.01, 10] (1: off)"),
    "seed": (_INT, lambda v: 0 <= v < 2**64, "in [0, 2**64)"),
    "thinking_budget": (_INT, lambda v: v >= 0, ">= 0"),
    "enable_thinking": ((bool,), None, ""),
    "stop": ((tuple, list), lambda v: all(isinstance(s, str) for s in v), "a list of strings"),
    "wrap_up": ((str,), None, ""),
    "system": ((str,), None, ""),
    "tools": ((list,), lambda v: all(isinstance(t, dict) for t in v), "a list of tool objects"),
    "chat_template_kwargs": ((dict,), None, ""),
    "kv_bits": (_BITS, lambda v: v in KV_BITS, '"auto", 16, 8 or 4'),
    "kv_start": (_INT, lambda v: v >= 0, ">= 0"),
    "loop_guard": ((bool,), None, ""),
    "loop_repeats": (_INT, lambda v: v >= 2, "at least 2"),
    "loop_min_tokens": (_INT, lambda v: v >= 1, "at least 1"),
    "loop_recurring": (_INT, lambda v: v >= 2, "at least 2"),
    "loop_window": (_INT, lambda v: v >= 1, "at least 1"),
    "prompt_lookup": ((bool,), None, ""),
    "tool_choice": ((str, dict), None, ""),  # its shape: Structure
    "parallel_tool_calls": ((bool,), None, ""),
    "response_format": ((dict,), None, ""),  # its shape: Structure
    "logprobs": (_INT, lambda v: 0 <= v <= MAX_LOGPROBS, f"0 to {MAX_LOGPROBS} (alternatives per token)"),
    "num_draft": (_AUTO, lambda v: v == "auto" or isinstance(v, int) and 1 <= v <= MAX_DRAFT,
                  f'"auto" or 1 to {MAX_DRAFT}'),
}


def check_text(text: str, what: str, param: Optional[str] = None):
    """Text must be valid Unicode: a lone surrogate cannot be encoded for the tokenizer. One in
    U+DC80..U+DCFF is a byte that was not UTF-8, kept by Python's surrogateescape (sys.argv, stdin
    read so): it is named as that byte, at its offset in the bytes as they came."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = text[e.start]
        if "\udc80" <= c <= "\udcff":
            offset = len(text[:e.start].encode("utf-8"))
            raise UserError(f"{what} is not valid UTF-8: byte 0x{ord(c) - 0xdc00:02x} at offset {offset}", param,
                            "invalid_unicode") from None
        raise UserError(f"{what} is not valid Unicode: a lone surrogate U+{ord(c):04X} at character {e.start}",
                        param, "invalid_unicode") from None


def _check(group):
    """Each field's type and range. None is the field's default (for some, None itself: the mode's default)."""
    for f in fields(group):
        value = getattr(group, f.name)
        if value is None:
            object.__setattr__(group, f.name, f.default if f.default_factory is MISSING else f.default_factory())
            continue
        kind, ok, span = _CHECKS[f.name]
        if not isinstance(value, kind) or isinstance(value, bool) and bool not in kind:  # True is an int too
            raise UserError(f"{f.name} must be {_KIND_NAMES[kind]}, not {show(value, 60)}", f.name, "invalid_type")
        if ok is not None and not ok(value):  # NaN fails every range
            raise UserError(f"{f.name} must be {span}, not {show(value, 60)}", f.name,
                            "invalid_type" if f.name == "stop" else "out_of_range")


@dataclass(frozen=True)
class Sampling:
    """How each token is drawn. None: the default for the mode in effect."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # report each answer token's log-probability and this many alternatives

    def __post_init__(self):
        _check(self)

    def resolve(self, thinking: bool, generation_config: dict) -> dict:
        """temperature, top_p, top_k, min_p: the mode's defaults, then generation_config.json, then the caller's."""
        params = dict(THINKING_DEFAULTS if thinking else NON_THINKING_DEFAULTS)
        params.update({k: generation_config[k] for k in params if generation_config.get(k) is not None})
        params.update({k: getattr(self, k) for k in params if getattr(self, k) is not None})
        return params


@dataclass(frozen=True)
class Stopping:
    """When the reply ends, and how a thought over its budget is closed."""

    max_tokens: int = 8192
    stop: tuple = ()  # strings that end the answer (not included in it)
    thinking_budget: Optional[int] = None
    wrap_up: str = WRAP_UP  # what a thought over its budget is closed with

    def __post_init__(self):
        _check(self)
        object.__setattr__(self, "stop", tuple(self.stop))
        for s in self.stop:
            check_text(s, "stop", "stop")
        check_text(self.wrap_up, "wrap_up", "wrap_up")


@dataclass(frozen=True)
class PromptOptions:
    """What goes into the prompt besides the messages."""

    system: Optional[str] = None
    tools: Optional[list] = None
    enable_thinking: Optional[bool] = None
    chat_template_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        _check(self)
        if self.system is not None:
            check_text(self.system, "system", "system")
        for key in self.chat_template_kwargs:
            if not isinstance(key, str) or key in RESERVED_TEMPLATE_ARGS:
                raise UserError(f"chat_template_kwargs may not set {key!r}: the template gets it from the request "
                                f"itself (reserved: {', '.join(sorted(RESERVED_TEMPLATE_ARGS))})",
                                "chat_template_kwargs", "reserved_template_argument")


@dataclass(frozen=True)
class CacheOptions:
    """How the KV cache is held: "auto" (the least quantization that fits the planned context), 16-bit,
    or quantized to 8 or 4 bits from `kv_start` tokens on."""

    kv_bits: Union[str, int] = "auto"  # one of KV_BITS; None: "auto"
    kv_start: int = 0

    def __post_init__(self):
        _check(self)


@dataclass(frozen=True)
class LoopOptions:
    """The loop guard (loop_guard.py), on unless loop_guard=False: a span repeated loop_repeats times back to
    back over at least loop_min_tokens tokens, or a line recurring loop_recurring times within loop_window
    tokens, is a loop."""

    loop_guard: bool = True
    loop_repeats: int = LoopSettings.repeats
    loop_min_tokens: int = LoopSettings.min_tokens
    loop_recurring: int = LoopSettings.recurring
    loop_window: int = LoopSettings.window

    def __post_init__(self):
        _check(self)
        least = LoopSettings.min_line * self.loop_recurring
        if self.loop_window < least:
            raise UserError(f"loop_window must be at least {least}, to hold loop_recurring ({self.loop_recurring}) "
                            f"lines of {LoopSettings.min_line} tokens; not {self.loop_window}", "loop_window",
                            "out_of_range")

    @property
    def settings(self) -> Optional[LoopSettings]:
        """The guard's settings; None when it is off."""
        if not self.loop_guard:
            return None
        return LoopSettings(repeats=self.loop_repeats, min_tokens=self.loop_min_tokens,
                            recurring=self.loop_recurring, window=self.loop_window)


@dataclass(frozen=True)
class Drafting:
    """Speculative decoding: drafts proposed from the context's own n-grams (prompt_lookup) and/or by a draft
    model (given to the generator or the server, not here), num_draft tokens at a time ("auto": adapted to
    how many the model accepts), checked by the model in one pass."""

    prompt_lookup: bool = False
    num_draft: Union[str, int] = "auto"

    def __post_init__(self):
        _check(self)


@dataclass(frozen=True)
class Structure:
    """What the reply must look like, enforced by constrained decoding (structured.py) from the end of the thought:
    `tool_choice` "auto" (calls are parsed, their arguments held to the tools' schemas), "none" (the tools are not
    offered), "required" (one call or more), or {"type": "function", "function": {"name": N}} (a call to N);
    `parallel_tool_calls`: whether one reply may make several; `response_format` {"type": "text"},
    {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""

    tool_choice: Union[str, dict] = "auto"
    parallel_tool_calls: bool = True
    response_format: Optional[dict] = None

    def __post_init__(self):
        _check(self)
        choice = self.tool_choice
        if isinstance(choice, str) and choice not in ("auto", "none", "required"):
            raise UserError(f'tool_choice must be "auto", "none", "required" or {{"type": "function", "function": '
                            f'{{"name": ...}}}}, not {show(choice, 60)}', "tool_choice", "invalid_value")
        if isinstance(choice, dict) and not isinstance(self.forced_tool, str):
            raise UserError('tool_choice names a function as {"type": "function", "function": {"name": "NAME"}}',
                            "tool_choice", "invalid_value")
        kind = (self.response_format or {"type": "text"}).get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise UserError(f'response_format type must be "text", "json_object" or "json_schema", not {show(kind, 60)}',
                            "response_format", "invalid_value")
        if kind == "json_schema" and not isinstance(self.schema, dict):
            raise UserError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                            "response_format", "invalid_value")

    @property
    def forced_tool(self) -> Optional[str]:
        """The function tool_choice names (None: it names none)."""
        choice = self.tool_choice
        if not isinstance(choice, dict):
            return None
        function = choice.get("function")
        return function.get("name") if isinstance(function, dict) else choice.get("name")  # (Responses' shape too)

    @property
    def forced_call(self) -> bool:
        """Whether the reply must be tool calls (tool_choice "required" or a named function)."""
        return self.tool_choice == "required" or self.forced_tool is not None

    @property
    def strict(self) -> bool:
        """json_schema's "strict": true: every keyword of the schema is enforced (one the grammar engine does not
        implement is refused); else those are left unchecked (structured.json_grammar)."""
        return self._json_schema.get("strict") is True

    @property
    def schema(self) -> Optional[dict]:
        """The JSON schema the answer must match; None: the answer is free text."""
        kind = (self.response_format or {"type": "text"})["type"]
        if kind == "json_object":
            return {"type": "object"}
        if kind == "json_schema":
            return self._json_schema.get("schema")
        return None

    @property
    def _json_schema(self) -> dict:
        """What holds the schema and "strict": response_format's "json_schema" object, else the format itself."""
        fmt = self.response_format or {}
        inner = fmt.get("json_schema")
        return inner if isinstance(inner, dict) else fmt


_GROUPS = {"sampling": Sampling, "stopping": Stopping, "prompt": PromptOptions, "cache": CacheOptions,
           "loops": LoopOptions, "drafting": Drafting,
           "structure": Structure}
_GROUP_OF = {f.name: group for group, cls in _GROUPS.items() for f in fields(cls)}


@dataclass(frozen=True)
class GenerationOptions:
    """Every option of one generation, checked once, in its group."""

    sampling: Sampling = field(default_factory=Sampling)
    stopping: Stopping = field(default_factory=Stopping)
    prompt: PromptOptions = field(default_factory=PromptOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)
    loops: LoopOptions = field(default_factory=LoopOptions)
    drafting: Drafting = field(default_factory=Drafting)
    structure: Structure = field(default_factory=Structure)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "GenerationOptions":
        """From the flat names (temperature=..., max_tokens=..., system=...) every API takes."""
        unknown = sorted(set(kwargs) - set(_GROUP_OF))
        if unknown:
            raise UserError(f"unknown generation option {unknown[0]!r}; known: {', '.join(sorted(_GROUP_OF))}",
                            unknown[0], "unknown_parameter")
        grouped = {group: {} for group in _GROUPS}
        for name, value in kwargs.items():
            grouped[_GROUP_OF[name]][name] = value
        return cls(**{group: _GROUPS[group](**values) for group, values in grouped.items()})
