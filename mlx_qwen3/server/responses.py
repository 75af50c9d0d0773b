"""POST /v1/responses: OpenAI's Responses API. Input items (and, with previous_response_id, a stored earlier
conversation) into a Call; a reply as one Response object, or as its server-sent events."""

import json
import threading
import uuid
from collections import OrderedDict

from ..errors import show
from ..reply import GenerationResult
from .request import Call, RequestError, call_errors, check_model, reasoning_effort, same_named, text_of, typed

STORED = 256  # responses kept with their conversations (in memory, the least recently used dropped first)
STORED_CHARS = 2**26  # and their text at most (each counted whole, though a chain's shares its earlier turns)
TEXT_PARTS = ("input_text", "output_text", "text")
STATUS = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}


class Responses:
    """OpenAI's Responses API, with the stored responses (the last STORED) and their conversations, for
    previous_response_id and GET / DELETE /v1/responses/{id}."""

    prefix = "resp_"

    def __init__(self, stored: int = STORED, stored_chars: int = STORED_CHARS):
        self.stored, self.stored_chars, self.chars = stored, stored_chars, 0
        self.kept, self.lock = OrderedDict(), threading.Lock()  # id -> (response, conversation, characters)

    def parse(self, body: dict) -> Call:
        check_model(body)
        for key in ("background", "conversation"):
            if body.get(key):
                raise RequestError(400, f"'{key}' is not supported here; continue a conversation with "
                                        "'previous_response_id' or by sending its items in 'input'", key, "unsupported")
        earlier = self.earlier(typed(body, "previous_response_id", str))
        raw = body.get("input")
        items = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise RequestError(422, "'input' must be a string or an array of items", "input", "invalid_type")
        conversation = earlier + to_messages(items)
        if len(conversation) == len(earlier):
            raise RequestError(400, "'input' is empty; send a string or at least one message item", "input",
                               "empty_input")
        instructions = typed(body, "instructions", str)
        messages = ([{"role": "system", "content": instructions}] if instructions else []) + conversation

        opts, fields = same_named(body), {}
        if body.get("max_output_tokens") is not None:
            opts["max_tokens"], fields["max_tokens"] = body["max_output_tokens"], "max_output_tokens"
        tools, namespaces = to_tools(body.get("tools"))
        if tools is not None:
            opts["tools"] = tools
        choice = body.get("tool_choice")
        if choice is not None:
            opts["tool_choice"] = to_tool_choice(choice)
        fmt = (typed(body, "text", dict) or {}).get("format")
        if fmt is not None:
            opts["response_format"], fields["response_format"] = to_format(fmt), "text.format"
        effort = (typed(body, "reasoning", dict) or {}).get("effort")
        reasoning_effort(effort, opts, fields, "reasoning.effort")
        metadata = typed(body, "metadata", dict) or {}
        if len(metadata) > 16 or not all(isinstance(v, str) for v in metadata.values()):
            raise RequestError(422, "'metadata' must be an object of at most 16 string values", "metadata",
                               "invalid_type")
        stream, store = bool(typed(body, "stream", bool)), typed(body, "store", bool) is not False
        echo = {"instructions": instructions, "metadata": metadata, "tools": body.get("tools") or [],
                "tool_choice": choice if choice is not None else "auto",
                "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
                "temperature": body.get("temperature"), "top_p": body.get("top_p"),
                "max_output_tokens": body.get("max_output_tokens"),
                "previous_response_id": body.get("previous_response_id"),
                "reasoning": {"effort": effort, "summary": None}, "text": {"format": fmt or {"type": "text"}},
                "store": store, "truncation": "disabled"}
        return Call(messages, opts, fields, stream,
                    extra={"conversation": conversation, "store": store, "echo": echo, "namespaces": namespaces})

    def earlier(self, response_id) -> list:
        """The conversation a stored response ended (its input and its output), to go on from."""
        if response_id is None:
            return []
        return list(self.stored_one(response_id, "previous_response_id")[1])

    def retrieve(self, response_id: str) -> dict:
        """GET /v1/responses/{id}: the response as it was answered."""
        return self.stored_one(response_id)[0]

    def delete(self, response_id: str) -> dict:
        """DELETE /v1/responses/{id}: it, and its conversation, are forgotten."""
        with self.lock:
            if response_id not in self.kept:
                raise self.missing(response_id)
            self.chars -= self.kept.pop(response_id)[2]
        return {"id": response_id, "object": "response", "deleted": True}

    def stored_one(self, response_id: str, param=None) -> tuple:
        with self.lock:
            if response_id not in self.kept:
                raise self.missing(response_id, param)
            self.kept.move_to_end(response_id)
            return self.kept[response_id]

    def missing(self, response_id: str, param=None) -> RequestError:
        return RequestError(404, f"no stored response has the id {show(response_id, 60)}; the last {self.stored} "
                                 "responses are kept, in memory, unless sent with store false", param,
                            "previous_response_not_found" if param else "not_found")

    def keep(self, call: Call, response: dict):
        if not call.extra["store"]:
            return
        messages = call.extra["conversation"] + to_messages(response["output"])
        size = sum(map(chars, messages)) + len(json.dumps(response))
        with self.lock:
            self.kept[response["id"]], self.chars = (response, messages, size), self.chars + size
            while len(self.kept) > self.stored or (self.chars > self.stored_chars and len(self.kept) > 1):
                self.chars -= self.kept.popitem(last=False)[1][2]

    def response(self, call: Call, meta, status: str, output: list, result=None, error=None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": meta.id, "object": "response", "created_at": meta.created, "status": status,
                "model": meta.model, "output": output, "error": error, "incomplete_details": incomplete,
                "usage": usage(result) if result is not None else None, **call.extra["echo"]}

    def answer(self, result: GenerationResult, call: Call, meta) -> dict:
        status = STATUS[result.finish_reason]
        output = [reasoning_item(result.thinking, "completed")] if result.thinking else []
        text = result.answer + call_errors(result.tool_calls)
        if text.strip():  # (blanks the grammar allowed before a forced call are no message)
            output.append(message_item(text, "completed"))
        output += [call_item(c, "completed", call.extra["namespaces"]) for c in result.tool_calls if c.get("name")]
        if output and output[-1]["type"] != "function_call" and status != "completed":  # as a stream ends it
            output[-1]["status"] = "incomplete"
        response = self.response(call, meta, status, output, result)
        self.keep(call, response)
        return response

    async def stream(self, items, call: Call, meta):
        out = _Events(call.extra["namespaces"])
        yield out.event("response.created", response=self.response(call, meta, "in_progress", []))
        yield out.event("response.in_progress", response=self.response(call, meta, "in_progress", []))
        async for item in items:
            if isinstance(item, RequestError):
                yield out.event("error", code=item.code, message=item.message, param=item.param)
                # the response's error code is one of OpenAI's few; the error event above has ours
                failure = {"code": "server_error" if item.status >= 500 else "invalid_prompt", "message": item.message}
                yield out.event("response.failed", response=self.response(call, meta, "failed", out.output,
                                                                          error=failure))
                return
            if item.type == "thinking":
                chunks = out.text("reasoning", item.text)
            elif item.type == "answer":
                chunks = out.text("message", item.text)
            elif item.type == "tool_call" and item.tool_call.get("name"):
                chunks = out.call(item.tool_call)
            elif item.type == "tool_call":
                chunks = out.text("message", call_errors([item.tool_call]))
            else:  # done
                status = STATUS[item.finish_reason]
                chunks = out.close(status)
                response = self.response(call, meta, status, out.output, item)
                self.keep(call, response)
                kind = "response.completed" if status == "completed" else "response.incomplete"
                chunks.append(out.event(kind, response=response))
            for chunk in chunks:
                yield chunk


class _Events:
    """A streamed response's output items as they open, grow and close; each step returns its events."""

    DELTA = {"reasoning": "response.reasoning_text", "message": "response.output_text"}

    def __init__(self, namespaces: dict):
        self.namespaces = namespaces  # a namespaced tool's name -> its namespace, which its calls name
        self.seq, self.output, self.open = 0, [], None  # open: the reasoning or message item text goes to

    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def added(self, item: dict) -> list:
        """An item announced: a text item empty, then its one part (which grows)."""
        self.output.append(item)
        index = len(self.output) - 1
        if "content" not in item:
            return [self.event("response.output_item.added", output_index=index, item=item)]
        return [self.event("response.output_item.added", output_index=index, item={**item, "content": []}),
                self.event("response.content_part.added", **self.where(), part=item["content"][0])]

    def where(self) -> dict:
        return {"item_id": self.output[-1]["id"], "output_index": len(self.output) - 1, "content_index": 0}

    def text(self, kind: str, text: str) -> list:
        if not text:
            return []
        events = self.close() if self.open is not None and self.open["type"] != kind else []
        if self.open is None:
            self.open = reasoning_item("", "in_progress") if kind == "reasoning" else message_item("", "in_progress")
            events += self.added(self.open)
        self.open["content"][0]["text"] += text
        logprobs = {"logprobs": []} if kind == "message" else {}
        return events + [self.event(f"{self.DELTA[kind]}.delta", **self.where(), delta=text, **logprobs)]

    def call(self, call: dict) -> list:
        events = self.close()
        item = call_item(call, "in_progress", self.namespaces)
        arguments, item["arguments"] = item["arguments"], ""
        events += self.added(item)
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        item["arguments"], item["status"] = arguments, "completed"
        return events + [self.event("response.function_call_arguments.delta", **where, delta=arguments),
                         self.event("response.function_call_arguments.done", **where, name=item["name"],
                                    arguments=arguments),
                         self.event("response.output_item.done", output_index=where["output_index"], item=item)]

    def close(self, status: str = "completed") -> list:
        """Ends the open item, if any: "completed" when the reply went on past it, else the reply's status."""
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = "completed" if status == "completed" else "incomplete"
        part = item["content"][0]
        done = {"text": part["text"], "logprobs": []} if item["type"] == "message" else {"text": part["text"]}
        kind = "reasoning" if item["type"] == "reasoning" else "message"
        return [self.event(f"{self.DELTA[kind]}.done", **self.where(), **done),
                self.event("response.content_part.done", **self.where(), part=part),
                self.event("response.output_item.done", output_index=len(self.output) - 1, item=item)]


# ---- the request's shapes into ours ----

def to_messages(items: list) -> list:
    """Input items (also our own output items, when a response is stored) as chat messages: reasoning, an
    assistant message and function calls that follow one another make one assistant turn."""
    out, turn = [], None  # turn: the assistant message the next reasoning, text or call joins
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(422, f"{where} must be an object (a message or a function_call, "
                                    "function_call_output or reasoning item)", "input", "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(422, f"{where} needs a role of user, system, developer or assistant", "input",
                                   "invalid_role")
            text = text_of(item.get("content"), where, "input", TEXT_PARTS)
            if role != "assistant":
                out.append({"role": "system" if role == "developer" else role, "content": text})
                turn = None
                continue
            if turn is None or turn["content"] or turn.get("tool_calls"):
                turn = {"role": "assistant", "content": ""}
                out.append(turn)
            turn["content"] = text
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                      for p in parts):
                raise RequestError(422, f"{where}: a reasoning item's content and summary are arrays of "
                                        "{\"type\", \"text\"} parts", "input", "invalid_type")
            turn = {"role": "assistant", "content": "", "reasoning_content": "\n\n".join(p["text"] for p in parts)}
            out.append(turn)
        elif kind == "function_call":
            name, arguments, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
            if not (isinstance(name, str) and name and isinstance(arguments, str) and isinstance(call_id, str)):
                raise RequestError(422, f"{where}: a function_call item needs 'call_id', 'name' and 'arguments' "
                                        "(a JSON string)", "input", "invalid_tool_call")
            if turn is None:
                turn = {"role": "assistant", "content": ""}
                out.append(turn)
            turn.setdefault("tool_calls", []).append(
                {"type": "function", "id": call_id, "function": {"name": name, "arguments": arguments}})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise RequestError(422, f"{where}: a function_call_output item needs the 'call_id' of its call",
                                   "input", "invalid_tool_call")
            output = text_of(item.get("output"), where, "input", TEXT_PARTS)
            out.append({"role": "tool", "content": output, "tool_call_id": item["call_id"]})
            turn = None
        else:
            raise RequestError(422, f"{where}: items of type {show(kind, 60)} are not supported; send message, "
                                    "function_call, function_call_output or reasoning items", "input",
                               "unsupported_item")
    return out


def chars(message: dict) -> int:
    calls = message.get("tool_calls")
    return len(message["content"]) + len(message.get("reasoning_content", "")) + (len(json.dumps(calls)) if calls else 0)


def to_tools(tools) -> tuple:
    """Responses' tools -> (the chat form's function tools or None, {a namespaced function's name: its namespace}).
    Function tools ({"type", "name", "description", "parameters", "strict"}) are offered, those of a namespace
    ({"type": "namespace", "name", "tools"}, as Codex groups some) too; tools of other kinds (OpenAI's hosted
    web_search, file_search..., and custom or local_shell tools, whose calls are not function calls) are left out
    of the prompt: the model never calls them, and the request is served with the rest."""
    if tools is None:
        return None, {}
    if not isinstance(tools, list):
        raise RequestError(422, "'tools' must be an array of tools", "tools", "invalid_type")
    out, namespaces = [], {}
    for j, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "namespace":
            members = tool.get("tools")
            if not isinstance(tool.get("name"), str) or not isinstance(members, list):
                raise RequestError(422, f"tools[{j}]: a namespace needs a 'name' and its 'tools'", "tools",
                                   "invalid_tool")
            functions = [_function(m, f"tools[{j}].tools[{k}]") for k, m in enumerate(members)
                         if isinstance(m, dict) and m.get("type") == "function"]
            namespaces.update((f["function"]["name"], tool["name"]) for f in functions)
            out += functions
        elif kind == "function":
            out.append(_function(tool, f"tools[{j}]"))
        elif not isinstance(kind, str):
            raise RequestError(422, f"tools[{j}] needs a 'type'", "tools", "invalid_tool")
    names = [f["function"]["name"] for f in out]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise RequestError(400, f"two tools are named {show(twice, 60)}; each tool's name must be its own", "tools",
                           "invalid_tool")
    return out or None, namespaces  # (none left: no tools)


def _function(tool: dict, where: str) -> dict:
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise RequestError(422, f"{where} needs a 'name'", "tools", "invalid_tool")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": function}


def to_tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if isinstance(choice, dict):
        raise RequestError(400, f"'tool_choice' may name a function ({{\"type\": \"function\", \"name\": ...}}), not "
                                f"a {show(choice.get('type'), 60)}", "tool_choice", "unsupported_tool_choice")
    return choice  # a string: the generator checks it


def to_format(fmt):
    """text.format ({"type": "json_schema", "name", "schema", "strict"}) as a chat response_format."""
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return fmt  # text, json_object, or something the generator refuses


# ---- our reply in the Responses' shapes ----

def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def reasoning_item(text: str, status: str) -> dict:
    return {"type": "reasoning", "id": new_id("rs_"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def message_item(text: str, status: str) -> dict:
    return {"type": "message", "id": new_id("msg_"), "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(call: dict, status: str, namespaces: dict) -> dict:
    item = {"type": "function_call", "id": new_id("fc_"), "call_id": new_id("call_"), "name": call["name"],
            "arguments": json.dumps(call["arguments"], ensure_ascii=False), "status": status}
    if call["name"] in namespaces:
        item["namespace"] = namespaces[call["name"]]
    return item


def usage(result: GenerationResult) -> dict:
    # cache_write_tokens: the prompt tokens read now, which the server's prompt cache keeps for the next turn
    written = result.prompt_tokens - result.cached_tokens
    return {"input_tokens": result.prompt_tokens,
            "input_tokens_details": {"cached_tokens": result.cached_tokens, "cache_write_tokens": written},
            "output_tokens": result.generation_tokens,
            "output_tokens_details": {"reasoning_tokens": result.thinking_tokens},
            "total_tokens": result.prompt_tokens + result.generation_tokens}
