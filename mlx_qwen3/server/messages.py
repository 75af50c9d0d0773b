"""POST /v1/messages: Anthropic's Messages request into a Call; a reply as one message, or as Anthropic's
server-sent events (message_start, content_block_start/delta/stop, message_delta, message_stop).

Thinking follows Anthropic's default: off unless the request sends `thinking` {"type": "enabled",
"budget_tokens": N} (or "adaptive": no budget). Clients written for that API read `content[0].text` when
they asked for no thinking. `max_tokens`, which Anthropic requires, may be left out: the generator's default."""

import json
import uuid

from ..errors import show
from ..reply import GenerationResult
from .request import EFFORT, Call, RequestError, call_errors, check_model, same_named, stop_strings

# Anthropic's error types by HTTP status; any other 4xx is an invalid request, any other 5xx an api_error
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # and "tool", which names one


def bad(message: str, param: str) -> RequestError:
    return RequestError(400, message, param, "invalid_request")  # Anthropic answers a bad request with a 400


class Messages:
    """Anthropic's Messages."""

    prefix = "msg_"
    ping = 'event: ping\ndata: {"type": "ping"}\n\n'  # what Anthropic's API sends on a quiet stream

    def parse(self, body: dict) -> Call:
        check_model(body)
        messages = _system(body.get("system")) + _messages(body.get("messages"))
        opts, fields = same_named(body), {}
        if body.get("max_tokens") is not None:
            opts["max_tokens"] = body["max_tokens"]
        stop = stop_strings(body.get("stop_sequences"), "stop_sequences", most=None)
        if stop is not None:
            opts["stop"], fields["stop"] = stop, "stop_sequences"
        opts.update(_thinking(body.get("thinking")))
        _effort(body.get("output_config"), opts)
        tools = _tools(body.get("tools"))
        if tools is not None:
            opts["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"))
        opts.update(choice)
        fields.update(dict.fromkeys(choice, "tool_choice"))
        response_format = _format(body.get("output_config"))
        if response_format is not None:
            opts["response_format"], fields["response_format"] = response_format, "output_config"
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise bad("'stream' must be a boolean", "stream")
        return Call(messages, opts, fields, bool(stream))

    def answer(self, result: GenerationResult, call: Call, meta) -> dict:
        content = []
        if result.thinking:
            content.append({"type": "thinking", "thinking": result.thinking, "signature": ""})
        text = result.answer + call_errors(result.tool_calls)
        if text.strip():  # (blanks the grammar allowed before a forced call are no text block)
            content.append({"type": "text", "text": text})
        content += [tool_use(c) for c in result.tool_calls if c.get("name")]
        return {"id": meta.id, "type": "message", "role": "assistant", "model": meta.model, "content": content,
                **stopped(result), "usage": usage(result)}

    async def stream(self, items, call: Call, meta):
        blocks = []  # the type of each block started; the last one is open while `open_` is true
        open_ = False

        def start(block):
            blocks.append(block["type"])
            return event({"type": "content_block_start", "index": len(blocks) - 1, "content_block": block})

        def delta(d):
            return event({"type": "content_block_delta", "index": len(blocks) - 1, "delta": d})

        def stop():
            return event({"type": "content_block_stop", "index": len(blocks) - 1})

        message = {"id": meta.id, "type": "message", "role": "assistant", "model": meta.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": len(meta.prompt.ids), "output_tokens": 0}}
        yield event({"type": "message_start", "message": message})
        async for item in items:
            if isinstance(item, RequestError):  # the anthropic client raises it as an APIStatusError
                yield event(error_body(item))
                return
            if item.type == "done":
                if open_:
                    yield stop()
                yield event({"type": "message_delta", "delta": stopped(item), "usage": usage(item)})
                yield event({"type": "message_stop"})
                return
            tool = item.tool_call if item.type == "tool_call" and item.tool_call.get("name") else None
            kind = "tool_use" if tool else "thinking" if item.type == "thinking" else "text"
            if open_ and (tool or blocks[-1] != kind):
                yield stop()
                open_ = False
            if tool:
                block = tool_use(tool)
                yield start({**block, "input": {}})
                arguments = json.dumps(block["input"], ensure_ascii=False)
                yield delta({"type": "input_json_delta", "partial_json": arguments})
                yield stop()
                continue
            if not open_:
                yield start({"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking"
                            else {"type": "text", "text": ""})
                open_ = True
            if kind == "thinking":
                yield delta({"type": "thinking_delta", "thinking": item.text})
            else:
                yield delta({"type": "text_delta", "text": item.text if item.type == "answer" else
                             call_errors([item.tool_call])})


def error_body(e: RequestError) -> dict:
    """Anthropic's error shape."""
    kind = ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def error_for(path: str, e: RequestError) -> dict:
    """An error's JSON as the client of `path` reads it: Anthropic's under /v1/messages, else OpenAI's."""
    return error_body(e) if path == "/v1/messages" or path.startswith("/v1/messages/") else e.body()


# ---- the request ----

def _string(block: dict, key: str, where: str) -> str:
    if not isinstance(block.get(key), str):
        raise bad(f"{where}.{key} must be a string", where)
    return block[key]


def _blocks(content, where: str) -> list:
    """A message's content as blocks: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) and isinstance(b.get("type"), str)
                                                for b in content):
        raise bad(f"{where}.content must be a string or an array of content blocks, each with a 'type'", where)
    for j, b in enumerate(content):
        if b["type"] in ("image", "document"):
            raise bad(f"{where}.content[{j}]: {b['type']} blocks are not supported (this model reads text only); "
                      "send the text instead", where)
    return content


def _texts(blocks: list, where: str) -> str:
    """Text blocks' text, one block per line; any other kind of block is refused."""
    for j, b in enumerate(blocks):
        if b["type"] != "text":
            raise bad(f"{where}[{j}]: only text blocks may go here, not {show(b['type'], 40)}", where)
    return "\n".join(_string(b, "text", f"{where}[{j}]") for j, b in enumerate(blocks))


def _system(system) -> list:
    if system is None:
        return []
    if isinstance(system, list):
        system = _texts(_blocks(system, "system"), "system")
    if not isinstance(system, str):
        raise bad("'system' must be a string or an array of text blocks", "system")
    return [{"role": "system", "content": system}]


def _messages(raw) -> list:
    if not isinstance(raw, list):
        raise bad("'messages' must be an array of messages", "messages")
    if not raw:
        raise bad("'messages' is empty; send at least one user message", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise bad(f"{where} needs a role of user, assistant or system", where)
        blocks = _blocks(m.get("content"), where)
        if m["role"] == "system":  # a system message mid-conversation (Claude Code sends one): Qwen3's template
            out.append({"role": "system", "content": _texts(blocks, f"{where}.content")})  # keeps it in its place
        else:
            out += _user(blocks, where) if m["role"] == "user" else [_assistant(blocks, where)]
    if raw[-1]["role"] == "assistant":  # the template would close it and start a new reply, not continue it
        raise bad("the last message is the assistant's: prefilling a reply is not supported; end with a user "
                  "message", f"messages[{len(raw) - 1}]")
    return out


def _user(blocks: list, where: str) -> list:
    """A user turn: its tool results, each a tool message, and its text, in their order."""
    out, text = [], []
    for j, b in enumerate(blocks):
        at = f"{where}.content[{j}]"
        if b["type"] == "text":
            text.append(_string(b, "text", at))
        elif b["type"] == "tool_result":
            if text:
                out.append({"role": "user", "content": "\n".join(text)})
                text = []
            out.append(_tool_result(b, at))
        else:
            raise bad(f"{at}: a user message holds text and tool_result blocks, not {show(b['type'], 40)}", where)
    if text or not out:
        out.append({"role": "user", "content": "\n".join(text)})
    return out


def _tool_result(block: dict, where: str) -> dict:
    content = block.get("content")
    if content is None:
        content = ""
    elif not isinstance(content, str):
        content = _texts(_blocks(content, where), f"{where}.content")
    if block.get("is_error") not in (None, True, False):
        raise bad(f"{where}.is_error must be a boolean", where)
    message = {"role": "tool", "content": f"Error: {content}" if block.get("is_error") else content}
    if isinstance(block.get("tool_use_id"), str):
        message["tool_call_id"] = block["tool_use_id"]
    return message


def _assistant(blocks: list, where: str) -> dict:
    """An assistant turn: its thinking (the reasoning), text and tool calls; redacted thinking is dropped."""
    text, thinking, calls = [], [], []
    for j, b in enumerate(blocks):
        at = f"{where}.content[{j}]"
        if b["type"] == "text":
            text.append(_string(b, "text", at))
        elif b["type"] == "thinking":
            thinking.append(_string(b, "thinking", at))
        elif b["type"] == "tool_use":
            name, arguments = _string(b, "name", at), b.get("input", {})
            if not name or not isinstance(arguments, dict):
                raise bad(f"{at}: a tool_use block needs a 'name' and an 'input' object", where)
            calls.append({"type": "function", "id": b.get("id"), "function": {"name": name, "arguments": arguments}})
        elif b["type"] != "redacted_thinking":
            raise bad(f"{at}: an assistant message holds text, thinking and tool_use blocks, not "
                      f"{show(b['type'], 40)}", where)
    message = {"role": "assistant", "content": "\n".join(text)}
    if thinking:
        message["reasoning_content"] = "\n".join(thinking)
    if calls:
        message["tool_calls"] = calls
    return message


def _thinking(thinking) -> dict:
    if thinking is None:
        return {"enable_thinking": False}  # Anthropic's default
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise bad("'thinking' of type enabled needs 'budget_tokens': the most tokens the thought may take, an "
                      f"integer >= 0 (not {show(budget, 40)})", "thinking")
        return {"enable_thinking": True, "thinking_budget": budget}
    if kind in ("adaptive", "disabled"):
        return {"enable_thinking": kind == "adaptive"}
    raise bad('\'thinking\' must be {"type": "enabled", "budget_tokens": N}, {"type": "adaptive"} or '
              '{"type": "disabled"}', "thinking")


def _effort(config, opts: dict):
    """output_config.effort: with thinking on, "low" / "medium" bound the thought as OpenAI's reasoning effort does
    (1,024 / 4,096 tokens; budget_tokens first); "high" and "max" leave it free."""
    effort = config.get("effort") if isinstance(config, dict) else None
    if effort is None:
        return
    if effort not in ("low", "medium", "high", "max"):
        raise bad(f"'output_config.effort' must be low, medium, high or max, not {show(effort, 40)}", "output_config")
    if opts["enable_thinking"] and effort in ("low", "medium"):
        opts.setdefault("thinking_budget", EFFORT[effort])


def _tools(tools):
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("'tools' must be an array of tools", "tools")
    out = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise bad(f"{where} must be an object with 'name' and 'input_schema'", where)
        if t.get("type", "custom") not in ("custom", None):
            raise bad(f"{where}: Anthropic's server tool {show(t['type'], 40)} is not available here; send custom "
                      "tools (name, description, input_schema)", where)
        if not isinstance(t.get("name"), str) or not t["name"] or not isinstance(t.get("input_schema"), dict):
            raise bad(f"{where} needs a 'name' and an 'input_schema' object (the JSON schema of its input)", where)
        function = {"name": t["name"], "parameters": t["input_schema"]}
        if isinstance(t.get("description"), str):
            function["description"] = t["description"]
        if t.get("strict") is True:  # Anthropic's strict tool use: every keyword of the schema enforced
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice) -> dict:
    if choice is None:
        return {}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool" and isinstance(choice.get("name"), str):
        opts = {"tool_choice": {"type": "function", "function": {"name": choice["name"]}}}
    elif kind in TOOL_CHOICES:
        opts = {"tool_choice": TOOL_CHOICES[kind]}
    else:
        raise bad('\'tool_choice\' must be {"type": "auto"}, {"type": "any"}, {"type": "none"} or '
                  '{"type": "tool", "name": NAME}', "tool_choice")
    once = choice.get("disable_parallel_tool_use")
    if once is not None:
        if not isinstance(once, bool):
            raise bad("'tool_choice.disable_parallel_tool_use' must be a boolean", "tool_choice")
        opts["parallel_tool_calls"] = not once
    return opts


def _format(config):
    """output_config.format {"type": "json_schema", "schema"} as the generator's response_format."""
    if config is None or (isinstance(config, dict) and config.get("format") is None):
        return None
    fmt = config.get("format") if isinstance(config, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad('\'output_config.format\' must be {"type": "json_schema", "schema": {...}}', "output_config")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


# ---- the reply ----

def event(body: dict) -> str:
    return f"event: {body['type']}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


def tool_use(call: dict) -> dict:
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call["name"],
            "input": call["arguments"]}


def stopped(result: GenerationResult) -> dict:
    """stop_reason and stop_sequence."""
    if result.finish_reason == "length":
        reason = "max_tokens"
    elif result.stop_sequence is not None:
        reason = "stop_sequence"
    elif any(c.get("name") for c in result.tool_calls):
        reason = "tool_use"
    else:
        reason = "end_turn"  # a cancelled reply too: Anthropic has no word for it (its client has gone)
    return {"stop_reason": reason, "stop_sequence": result.stop_sequence if reason == "stop_sequence" else None}


def usage(result: GenerationResult) -> dict:
    # Anthropic's input_tokens leaves out those read from the cache (the prompt is their sum)
    return {"input_tokens": result.prompt_tokens - result.cached_tokens, "output_tokens": result.generation_tokens,
            "cache_read_input_tokens": result.cached_tokens, "cache_creation_input_tokens": 0,
            "output_tokens_details": {"thinking_tokens": result.thinking_tokens}}
