"""What every API's request shares: the error a refusal raises, JSON checks, messages, and `Call` (a request in
the generator's terms), which each API module (chat.py, completions.py, responses.py, messages.py) makes from
its own shape; `prepare` turns one into a Prompt. The generation options are checked once, by the generator,
whose errors name the option (mapped back to the request's field)."""

import json
import re
from dataclasses import dataclass, field
from typing import Optional

from ..errors import UserError, show
from ..generate import prepare as prepare_prompt

MAX_DEPTH = 100  # levels of nesting a request's JSON may have (the template's tojson recurses, as do we)
MAX_STOP = 1000  # characters in one stop string (every token is checked against each of its prefixes)
_SURROGATE = re.compile("[\ud800-\udfff]")


class RequestError(Exception):
    """A bad request: the HTTP status and OpenAI's error object."""

    KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.KINDS.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---- the request: OpenAI's shape checked here, the options by the generator, into a Prompt ----

_KINDS = {bool: "a boolean", int: "an integer", str: "a string", list: "an array", dict: "an object"}


def typed(body: dict, key: str, kind):
    """A field of the request's own (not a generation option, which the generator checks), of one JSON type."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # True is an int too
        raise RequestError(422, f"'{key}' must be {_KINDS[kind]}", key, "invalid_type")
    return value


def check_json(body: dict):
    """Every string must be Unicode that can be encoded (json.loads lets a lone surrogate such as
    "\\ud800" through; the tokenizer and every response would fail on it later), and no field may nest
    deeper than MAX_DEPTH. Iterative: a deep request cannot exhaust our stack either."""
    for key, value in body.items():
        param = key if len(key) <= 60 and not _SURROGATE.search(key) else None  # echoed back: short, clean
        name = f"'{param}'" if param is not None else "a field"
        stack = [(key, 1), (value, 1)]
        while stack:
            item, depth = stack.pop()
            if isinstance(item, str):
                if not item.isascii() and _SURROGATE.search(item):
                    raise RequestError(400, f"{name} holds a lone surrogate (an unpaired \\ud800-\\udfff escape); "
                                            "strings must be valid Unicode", param, "invalid_unicode")
            elif isinstance(item, (list, dict)):
                if depth > MAX_DEPTH:
                    raise RequestError(400, f"{name} nests deeper than {MAX_DEPTH} levels", param,
                                       "too_deep")
                items = [*item.keys(), *item.values()] if isinstance(item, dict) else item
                stack.extend((x, depth + 1) for x in items)


def text_of(content, where: str, param: str, parts: tuple = ("text",)) -> str:
    """A message's content as text: a string, or an array of text parts (of the kinds in `parts`), joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") not in parts or not isinstance(p.get("text"), str) for p in content):
            raise RequestError(422, f"{where}: only text content parts ({', '.join(parts)}) are supported", param,
                               "unsupported_content")
        return "".join(p["text"] for p in content)
    raise RequestError(422, f"{where}: content must be a string or an array of text parts", param, "invalid_type")


def _tool_calls(calls, where: str) -> list:
    """An assistant's earlier tool calls, as OpenAI writes them: {"function": {"name", "arguments"}}."""
    if not isinstance(calls, list):
        raise RequestError(422, f"{where}.tool_calls must be an array", where, "invalid_type")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(422, f"{where}.tool_calls[{j}] needs a 'function' object with a 'name'", where,
                               "invalid_tool_call")
        if not isinstance(function.get("arguments"), (str, dict)):
            raise RequestError(422, f"{where}.tool_calls[{j}].function.arguments must be a JSON string or an object",
                               where, "invalid_tool_call")
    return calls


def parse_messages(raw) -> list:
    if not isinstance(raw, list):
        raise RequestError(422, "'messages' must be an array of messages", "messages", "invalid_type")
    if not raw:
        raise RequestError(400, "'messages' is empty; send at least one message", "messages", "empty_messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise RequestError(422, f"{where} needs a role of system, user, assistant or tool", where, "invalid_role")
        content = "" if m.get("content") is None else text_of(m["content"], where, where)  # (None: only tool calls)
        msg = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        reasoning = m.get("reasoning_content", m.get("reasoning"))  # clients disagree on the name
        if m["role"] == "assistant" and isinstance(reasoning, str):
            msg["reasoning_content"] = reasoning
        if m["role"] == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], where)
        out.append(msg)
    return out


@dataclass
class Call:
    """A request in the generator's terms: the conversation (or, with `raw`, one text fed as it is, without
    the chat template), the generation options by the generator's names, and for each option that came
    from a field of another name, that field (errors name it). `extra`: what the API's answer needs to
    remember of its request."""

    messages: list
    options: dict = field(default_factory=dict)
    fields: dict = field(default_factory=dict)
    stream: bool = False
    raw: Optional[str] = None
    extra: dict = field(default_factory=dict)


def call_errors(calls: list) -> str:
    """The malformed calls among `calls`, reported in the text (not dropped)."""
    return "".join(f"\n[tool call error: {c['error']}]" for c in calls if not c.get("name"))


def check_model(body: dict):
    """`model` is taken whatever it names (one model is served; the answer names it), but it must be a string."""
    typed(body, "model", str)


# The request fields that are generation options under the same name, in every API that has them.
OPTIONS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
           "seed", "thinking_budget", "kv_bits", "kv_start", "loop_guard", "loop_repeats", "loop_min_tokens",
           "loop_recurring", "loop_window", "prompt_lookup", "num_draft", "parallel_tool_calls")
MAX_TEMPERATURE = 2  # OpenAI's API takes temperatures in [0, 2]; the generator takes any finite one


def same_named(body: dict) -> dict:
    """The generation options a request names as the generator does; a temperature checked against OpenAI's range
    (its type is the generator's to check)."""
    opts = {k: body[k] for k in OPTIONS if body.get(k) is not None}
    temperature = opts.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > MAX_TEMPERATURE:
        raise RequestError(422, f"'temperature' must be in [0, {MAX_TEMPERATURE}], not {show(temperature)}",
                           "temperature", "out_of_range")
    return opts


# a reasoning effort -> our thinking: "none"/"minimal" turn it off, "low"/"medium" bound it (tokens), "high" does not
EFFORT = {"none": False, "minimal": False, "low": 1024, "medium": 4096, "high": None, "xhigh": None}


def reasoning_effort(effort, opts: dict, fields: dict, key: str):
    """OpenAI's reasoning effort (chat's `reasoning_effort`, Responses' `reasoning.effort`) as our thinking
    options, put into `opts`; a request's own `thinking_budget` comes first."""
    if effort is None:
        return
    if not isinstance(effort, str) or effort not in EFFORT:
        raise RequestError(422, f"'{key}' must be one of {', '.join(EFFORT)}, not {show(effort)}", key.split(".")[0],
                           "invalid_value")
    if EFFORT[effort] is False:
        opts["enable_thinking"], fields["enable_thinking"] = False, key.split(".")[0]
    elif EFFORT[effort] is not None:
        opts.setdefault("thinking_budget", EFFORT[effort])


def stop_strings(stop, key: str = "stop", most: Optional[int] = 4) -> Optional[list]:
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or (most is not None and len(stop) > most) or not all(isinstance(s, str) for s in stop):
        limit = f"at most {most} strings" if most is not None else "strings"
        raise RequestError(422, f"'{key}' must be a string or an array of {limit}", key, "invalid_type")
    if any(len(s) > MAX_STOP for s in stop):
        raise RequestError(422, f"a stop string may have at most {MAX_STOP} characters", key, "out_of_range")
    return stop


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object whose strings are valid Unicode and whose nesting is bounded."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError, and integers over 4,300 digits
        raise RequestError(400, f"the body is not valid JSON: {clip(str(e))}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object", None, "invalid_body")
    check_json(body)
    return body


def prepare(raw: bytes, api, model, tokenizer, defaults: Optional[dict] = None) -> tuple:
    """A request's body -> (Call, Prompt), or a RequestError: everything that can be known before generating is
    checked here, the prompt rendered and tokenized included. Slow for big prompts: run it off the event loop.
    `api` parses its own shape; `defaults`: the server's generation options, under the request's."""
    call = api.parse(parse_json(raw))
    try:
        prompt = prepare_prompt(model, tokenizer, call.messages if call.raw is None else call.raw,
                                raw=call.raw is not None, **{**(defaults or {}), **call.options})
    except UserError as e:  # a bad option, a prompt too long; a template that fails on this request too
        status = 400 if e.code in ("context_length_exceeded", "invalid_schema") else 422
        raise RequestError(status, str(e), call.fields.get(e.param, e.param), e.code or "invalid_value") from None
    return call, prompt
