"""POST /v1/completions: OpenAI's legacy completions, a raw prompt continued as it is (no chat template, no
thinking or tool-call channels: the reply's text is every token's); one text_completion, or its chunks."""

from ..errors import show
from ..reply import GenerationResult
from .chat import sse
from .request import Call, RequestError, check_model, same_named, stop_strings, typed

MAX_TOKENS = 16  # OpenAI's default for a completion


class Completions:
    """OpenAI's completions."""

    prefix = "cmpl-"

    def parse(self, body: dict) -> Call:
        check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(422, "'prompt' must be a string (one prompt per request)", "prompt", "invalid_type")
        for key, allowed in (("n", 1), ("best_of", 1)):
            if typed(body, key, int) not in (None, allowed):
                raise RequestError(422, f"'{key}' must be 1 (one choice per request), not {show(body[key], 60)}",
                                   key, "out_of_range")
        if body.get("suffix"):
            raise RequestError(422, "'suffix' is not supported (no fill-in-the-middle): leave it out", "suffix",
                               "unsupported_parameter")
        echo = bool(typed(body, "echo", bool))
        opts, fields = same_named(body), {}
        opts["max_tokens"] = body["max_tokens"] if body.get("max_tokens") is not None else MAX_TOKENS
        stop = stop_strings(body.get("stop"))
        if stop is not None:
            opts["stop"] = stop
        logprobs = typed(body, "logprobs", int)
        if logprobs is not None:
            if echo:
                raise RequestError(422, "'echo' with 'logprobs' would need the prompt's log-probabilities, which are "
                                        "not computed: leave one out", "echo", "unsupported_parameter")
            opts["logprobs"] = logprobs
        include_usage = bool((typed(body, "stream_options", dict) or {}).get("include_usage"))
        return Call([], opts, fields, bool(typed(body, "stream", bool)), raw=prompt,
                    extra={"include_usage": include_usage, "echo": echo})

    def answer(self, result: GenerationResult, call: Call, meta) -> dict:
        text = (call.raw if call.extra["echo"] else "") + result.answer
        choice = {"index": 0, "text": text, "logprobs": _logprobs(result.logprobs, call), "finish_reason":
                  result.finish_reason}
        return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                "choices": [choice], "usage": _usage(result)}

    async def stream(self, items, call: Call, meta):
        def chunk(text="", finish=None, logprobs=None, usage=None):
            body = {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                    "choices": [] if usage else [{"index": 0, "text": text, "logprobs": logprobs,
                                                  "finish_reason": finish}]}
            if usage:
                body["usage"] = usage
            return sse(body)

        at = 0  # the text's offset, for logprobs' text_offset
        if call.extra["echo"]:
            yield chunk(call.raw)
        async for item in items:
            if isinstance(item, RequestError):
                yield sse(item.body())
            elif item.type == "answer":
                yield chunk(item.text, logprobs=_logprobs(item.logprobs or [], call, at))
                at += len(item.text)
            elif item.type == "done":
                yield chunk(finish=item.finish_reason)
                if call.extra["include_usage"]:
                    yield chunk(usage=_usage(item))
        yield "data: [DONE]\n\n"


def _logprobs(entries: list, call: Call, at: int = 0):
    """The completions API's older shape of the entries chat completions reports (None: not asked for); `at`:
    the text's offset of the first one."""
    if "logprobs" not in call.options:
        return None
    offsets = []
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generation_tokens,
            "total_tokens": result.prompt_tokens + result.generation_tokens}
