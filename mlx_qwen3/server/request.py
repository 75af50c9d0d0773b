"""A chat/completions request: OpenAI's shape checked here, the generation options by the generator
(whose errors name the option), into a Prompt; every refusal is OpenAI's error JSON with its status."""

import json
import re
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


def _field(body: dict, key: str, kind):
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


def _text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise RequestError(422, f"{where}: only text content parts are supported", where, "unsupported_content")
        return "".join(p["text"] for p in content)
    raise RequestError(422, f"{where}: content must be a string or a list of text parts", where, "invalid_type")


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
        msg = {"role": "system" if m["role"] == "developer" else m["role"], "content": _text(m.get("content"), where)}
        reasoning = m.get("reasoning_content", m.get("reasoning"))  # clients disagree on the name
        if m["role"] == "assistant" and isinstance(reasoning, str):
            msg["reasoning_content"] = reasoning
        if m["role"] == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], where)
        out.append(msg)
    return out


def serves(served: str, wanted: str) -> bool:
    """Whether a request's `model` names the served one: as given to --model, or its last path part."""
    return wanted in (served, served.rstrip("/").split("/")[-1])


# The request fields that are generation options under the same name; every option's type and range is
# checked once, by the generator, whose errors name the option (mapped back to the request's field).
OPTIONS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
           "seed", "thinking_budget", "kv_bits", "kv_start", "loop_guard", "loop_repeats", "loop_min_tokens",
           "loop_recurring", "loop_window", "prompt_lookup", "num_draft")
MAX_TEMPERATURE = 2  # OpenAI's API takes temperatures in [0, 2]; the generator takes any finite one


def parse_request(body, served: str) -> tuple:
    """-> (messages, generation options as the generator names them, the request field of each option,
    stream, include_usage). What is checked here is OpenAI's shape of the request; `body` has been
    through check_json."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object", None, "invalid_body")
    model = _field(body, "model", str)
    if model is not None and not serves(served, model):
        raise RequestError(404, f"the model {show(model, 60)} is not served here; this server has '{served}'", "model",
                           "model_not_found")
    messages = parse_messages(body.get("messages"))
    if _field(body, "n", int) not in (None, 1):
        raise RequestError(422, f"'n' must be 1 (one choice per request), not {show(body['n'], 60)}", "n",
                           "out_of_range")
    opts = {k: body[k] for k in OPTIONS if body.get(k) is not None}
    temperature = opts.get("temperature")  # a number's range beyond OpenAI's; its type is the generator's to check
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > MAX_TEMPERATURE:
        raise RequestError(422, f"'temperature' must be in [0, {MAX_TEMPERATURE}], not {show(temperature)}",
                           "temperature", "out_of_range")
    fields = {}
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            opts["max_tokens"], fields["max_tokens"] = body[key], key
            break
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise RequestError(422, "'stop' must be a string or an array of at most 4 strings", "stop", "invalid_type")
        if any(len(s) > MAX_STOP for s in stop):
            raise RequestError(422, f"a stop string may have at most {MAX_STOP} characters", "stop", "out_of_range")
        opts["stop"] = stop
    tools = _field(body, "tools", list)
    if tools is not None and body.get("tool_choice") != "none":
        if not all(isinstance(t, dict) for t in tools):
            raise RequestError(422, "'tools' must be an array of objects", "tools", "invalid_type")
        opts["tools"] = tools
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, dict):
        kwargs = dict(kwargs)
        if "enable_thinking" in kwargs:
            opts["enable_thinking"] = kwargs.pop("enable_thinking")
            fields["enable_thinking"] = "chat_template_kwargs"
    if kwargs is not None:
        opts["chat_template_kwargs"] = kwargs
    stream = bool(_field(body, "stream", bool))
    include_usage = bool((_field(body, "stream_options", dict) or {}).get("include_usage"))
    return messages, opts, fields, stream, include_usage


def prepare(raw: bytes, model, tokenizer, served: str, defaults: Optional[dict] = None) -> tuple:
    """A request's body -> (Prompt, stream, include_usage), or a RequestError: everything that can be known
    before generating is checked here, the prompt rendered and tokenized included. Slow for big prompts:
    run it off the event loop. `defaults`: the server's generation options, under the request's."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError, and integers over 4,300 digits
        raise RequestError(400, f"the body is not valid JSON: {clip(str(e))}", None,
                           "invalid_json") from None
    if isinstance(body, dict):
        check_json(body)
    messages, options, fields, stream, include_usage = parse_request(body, served)
    try:
        prompt = prepare_prompt(model, tokenizer, messages, **{**(defaults or {}), **options})
    except UserError as e:  # a bad option, a prompt too long; a template that fails on this request too
        status = 400 if e.code == "context_length_exceeded" else 422
        raise RequestError(status, str(e), fields.get(e.param, e.param), e.code or "invalid_value") from None
    return prompt, stream, include_usage
