"""POST /v1/chat/completions: OpenAI's chat request into a Call; a reply as one chat.completion, or as
chat.completion.chunk server-sent events."""

import json
import uuid

from ..errors import show
from ..reply import GenerationResult
from .request import (Call, RequestError, call_errors, check_model, parse_messages, reasoning_effort, same_named,
                      stop_strings, typed)


class Chat:
    """OpenAI's chat completions."""

    prefix = "chatcmpl-"

    def parse(self, body: dict) -> Call:
        check_model(body)
        messages = parse_messages(body.get("messages"))
        if typed(body, "n", int) not in (None, 1):
            raise RequestError(422, f"'n' must be 1 (one choice per request), not {show(body['n'], 60)}", "n",
                               "out_of_range")
        opts, fields = same_named(body), {}
        for key in ("max_completion_tokens", "max_tokens"):
            if body.get(key) is not None:
                opts["max_tokens"], fields["max_tokens"] = body[key], key
                break
        stop = stop_strings(body.get("stop"))
        if stop is not None:
            opts["stop"] = stop
        for key in ("tools", "tool_choice", "response_format"):
            if body.get(key) is not None:
                opts[key] = body[key]
        if typed(body, "logprobs", bool):
            opts["logprobs"] = typed(body, "top_logprobs", int) or 0
            fields["logprobs"] = "top_logprobs"
        reasoning_effort(body.get("reasoning_effort"), opts, fields, "reasoning_effort")
        kwargs = body.get("chat_template_kwargs")
        if isinstance(kwargs, dict):
            kwargs = dict(kwargs)
            if "enable_thinking" in kwargs:
                opts["enable_thinking"] = kwargs.pop("enable_thinking")
                fields["enable_thinking"] = "chat_template_kwargs"
        if kwargs is not None:
            opts["chat_template_kwargs"] = kwargs
        stream = bool(typed(body, "stream", bool))
        include_usage = bool((typed(body, "stream_options", dict) or {}).get("include_usage"))
        return Call(messages, opts, fields, stream, extra={"include_usage": include_usage})

    def answer(self, result: GenerationResult, call: Call, meta) -> dict:
        # (blanks the grammar allowed before a forced call are no content)
        text = (result.answer if result.answer.strip() else "") + call_errors(result.tool_calls)
        message = {"role": "assistant", "content": text or None}
        if result.thinking:
            message["reasoning_content"] = message["reasoning"] = result.thinking
        calls = [c for c in result.tool_calls if c.get("name")]
        if calls:
            message["tool_calls"] = [tool_call(c, i) for i, c in enumerate(calls)]
        choice = {"index": 0, "message": message, "finish_reason": finish_reason(result)}
        if "logprobs" in call.options:
            choice["logprobs"] = {"content": result.logprobs}
        return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
                "choices": [choice], "usage": usage(result), "loop_guard": {"loops": result.loops}}

    async def stream(self, items, call: Call, meta):
        def chunk(delta=None, finish=None, usage=None, loops=None, logprobs=None):
            body = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                    "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
            if logprobs is not None:
                body["choices"][0]["logprobs"] = {"content": logprobs}
            if usage:
                body["usage"] = usage
            if loops is not None:
                body["loop_guard"] = loops
            return sse(body)

        tools, logprobs = 0, "logprobs" in call.options
        yield chunk({"role": "assistant", "content": ""})
        async for item in items:
            if isinstance(item, RequestError):
                yield sse(item.body())
            elif item.type == "thinking":
                yield chunk({"reasoning_content": item.text, "reasoning": item.text})
            elif item.type == "answer":
                yield chunk({"content": item.text}, logprobs=item.logprobs if logprobs else None)
            elif item.type == "tool_call":
                if item.tool_call.get("name"):
                    yield chunk({"tool_calls": [tool_call(item.tool_call, tools)]})
                    tools += 1
                else:
                    yield chunk({"content": call_errors([item.tool_call])})
            elif item.type == "done":
                yield chunk(finish=finish_reason(item), loops={"loops": item.loops})
                if call.extra["include_usage"]:
                    yield chunk(usage=usage(item))
        yield "data: [DONE]\n\n"


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage(result: GenerationResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.generation_tokens,
        "total_tokens": result.prompt_tokens + result.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": result.thinking_tokens},
        # ours: the YaRN factor the context was rotated with (1: plain RoPE), and the one of a cached
        # conversation it outgrew and processed again (null: none)
        "rope": {"factor": result.rope_factor, "rescaled_from": result.rescaled_from},
    }


def tool_call(call: dict, index: int) -> dict:
    return {"index": index, "id": call_id(), "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finish_reason(result: GenerationResult) -> str:
    if result.finish_reason == "stop" and any(c.get("name") for c in result.tool_calls):
        return "tool_calls"
    return result.finish_reason
