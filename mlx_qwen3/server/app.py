"""The ASGI app: the routes, and OpenAI's response shapes (one JSON, or server-sent events)."""

import asyncio
import hmac
import html
import json
import os
import time
import uuid
from functools import lru_cache, partial
from pathlib import Path
from typing import Optional

from ..errors import UserError, show
from ..generate import GenerationResult
from ..options import CacheOptions, Drafting
from .engine import SHUTDOWN, CACHE_SLOTS, PARALLEL, Engine, Job
from .guard import Guard
from .request import RequestError, clip, prepare, serves

MAX_BODY = 4 * 2**20  # bytes of JSON a request may carry
BIG_BODY = 2**18  # bytes: a prompt this big tokenizes for a while; those take turns on all cores but one
PAGE = Path(__file__).with_name("chat.html")


def create_app(model, tokenizer, model_name: str, api_key: Optional[str] = None, max_body: int = MAX_BODY,
               cache_slots: int = CACHE_SLOTS, cache_bytes: Optional[int] = None, parallel: int = PARALLEL,
               host: str = "127.0.0.1", allow_origins=(), kv_bits=None, kv_start: int = 0, draft_model=None,
               prompt_lookup: bool = False, num_draft="auto"):
    """The ASGI app. `host` is the address the server is bound to (Host headers are checked against it);
    `allow_origins`: web origins (scheme://host[:port], or "*") whose pages may call the API; `kv_bits`
    ("auto", the default, 16, 8 or 4), `kv_start`: how a request's KV cache is held unless the request says
    (options.CacheOptions); `draft_model`, `prompt_lookup`, `num_draft`: speculative decoding (options.Drafting),
    unless the request says."""
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    CacheOptions(kv_bits, kv_start), Drafting(prompt_lookup, num_draft)  # checked before the engine starts
    # a request's own kv_bits, kv_start, prompt_lookup, num_draft come first
    defaults = {"kv_bits": kv_bits, "kv_start": kv_start, "prompt_lookup": prompt_lookup, "num_draft": num_draft}
    engine = Engine(model, tokenizer, cache_slots, cache_bytes, parallel, draft_model)
    created = int(time.time())
    guarded = {"nudged": 0, "closed": 0, "stopped": 0}  # what the loop guard did, over every reply (/health)

    @lru_cache(maxsize=1)
    def big_prompts():  # made on the event loop, where anyio wants it
        return anyio.CapacityLimiter(max(1, (os.cpu_count() or 2) - 1))

    def error(e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode("latin-1"), f"Bearer {api_key}".encode())

    def unauthorized() -> RequestError:
        return RequestError(401, "a valid 'Authorization: Bearer KEY' header is needed", None, "invalid_api_key")

    def stopping() -> RequestError:
        return RequestError(503, "the server is shutting down", None, "server_shutting_down")

    async def read_body(request: Request) -> bytes:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise RequestError(415, f"the body must be JSON, sent as 'Content-Type: application/json' (not "
                                    f"{show(kind, 60) if kind else 'none'})", None, "unsupported_media_type")
        too_big = RequestError(413, f"the body is over {max_body} bytes", None, "body_too_large")
        length = request.headers.get("content-length", "")
        if length.isascii() and length.isdigit() and int(length) > max_body:  # (uvicorn refuses other values)
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > max_body:
                raise too_big
        return b"".join(chunks)

    async def health(request):
        if not authorized(request):  # without the key: only that the server is up
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "model": model_name, "waiting": engine.waiting,
                             "requests": engine.running(), "cached_prompts": len(engine.pool),
                             "cached_bytes": engine.pool.nbytes, "loop_guard": guarded,
                             "decoding": engine.decoding()})

    async def models(request):
        if not authorized(request):
            return error(unauthorized())
        served = {"id": model_name, "object": "model", "created": created, "owned_by": "mlx-qwen3"}
        wanted = request.path_params.get("model_id")
        if wanted is None:
            return JSONResponse({"object": "list", "data": [served]})
        if not serves(model_name, wanted):
            return error(RequestError(404, f"the model {show(wanted, 60)} is not served here; this server has "
                                           f"'{model_name}'", "model", "model_not_found"))
        return JSONResponse(served)

    async def page(request):
        return HTMLResponse(PAGE.read_text().replace("{{MODEL}}", html.escape(model_name)))

    async def chat(request: Request):
        try:
            if not authorized(request):
                raise unauthorized()
            if engine.closing:
                raise stopping()
            raw = await read_body(request)
            # off the event loop: rendering and tokenizing a 4 MB prompt takes seconds
            limiter = big_prompts() if len(raw) > BIG_BODY else None
            prompt, stream, include_usage = await anyio.to_thread.run_sync(
                partial(prepare, raw, model, tokenizer, model_name, defaults), limiter=limiter)
            if engine.closing:
                raise stopping()
        except RequestError as e:
            return error(e)
        except ClientDisconnect:
            return error(RequestError(400, "the client went away", None, "client_disconnected"))

        job = Job(prompt, asyncio.get_running_loop())
        engine.submit(job)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            return _Stream(_sse(job, cid, now, model_name, include_usage, guarded), lambda: engine.release(job))
        try:
            return JSONResponse(await _complete(request, job, cid, now, model_name, guarded))
        except RequestError as e:
            return error(e)
        finally:
            engine.release(job)

    class _Stream(StreamingResponse):
        """Server-sent events; when the response ends, however it ends (even before its first chunk), its
        generation stops."""

        def __init__(self, events, release):
            super().__init__(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.release = release

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.release()

    async def http_error(request, exc):
        status = getattr(exc, "status_code", 404)
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "invalid_request")
        return JSONResponse(RequestError(status, f"{request.method} {clip(request.url.path, 100)}: {exc.detail}",
                                         None, code).body(), status_code=status, headers=getattr(exc, "headers", None))

    async def server_error(request, exc):  # a bug: logged with its traceback by uvicorn; the client gets JSON
        return error(RequestError(500, f"internal error: {type(exc).__name__}", None, "internal_error"))

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{model_id:path}", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error},
                    middleware=[Middleware(Guard, host=host, allow_origins=tuple(allow_origins))])
    app.router.redirect_slashes = False  # Guard serves /v1/models/ as /v1/models; no plain-text redirects
    app.state.engine = engine
    return app


async def _complete(request, job: Job, cid, now, model_name, guarded: dict) -> dict:
    """A whole reply as one chat.completion object; a client that leaves cancels it at once."""

    async def watch():  # the body has been read: what `receive` says next is that the client left
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # no way to tell: the generation runs to its end
            return
        job.cancel.set()

    watcher = asyncio.ensure_future(watch())
    result, failure = None, None
    try:
        while True:
            item = await job.events.get()
            if item is None:
                break
            if item is SHUTDOWN:
                raise RequestError(503, "the server is shutting down; the generation was cancelled", None,
                                   "server_shutting_down")
            if isinstance(item, Exception):
                failure = item
            elif item.type == "done":
                result = item
                _count(guarded, item)
    finally:
        watcher.cancel()
    if failure is not None or result is None:
        message = str(failure) if failure else "the generation was cancelled"
        raise RequestError(400 if isinstance(failure, UserError) else 500, message, None, "generation_failed")
    message = {"role": "assistant", "content": result.answer or None}
    if result.thinking:
        message["reasoning_content"] = message["reasoning"] = result.thinking
    calls = [c for c in result.tool_calls if c.get("name")]
    if calls:
        message["tool_calls"] = [_tool_call(c, i) for i, c in enumerate(calls)]
    bad = [c for c in result.tool_calls if not c.get("name")]
    if bad:  # a malformed call is reported in the content, not dropped
        message["content"] = (message["content"] or "") + "".join(f"\n[tool call error: {c['error']}]" for c in bad)
    return {
        "id": cid, "object": "chat.completion", "created": now, "model": model_name,
        "choices": [{"index": 0, "message": message, "finish_reason": _finish(result)}],
        "usage": _usage(result),
        "loop_guard": _loop_guard(result),
    }


async def _sse(job: Job, cid, now, model_name, include_usage, guarded: dict):
    def chunk(delta=None, finish=None, usage=None, loops=None):
        body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
        if usage:
            body["usage"] = usage
        if loops is not None:
            body["loop_guard"] = loops
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def failed(status, message, code):
        return f"data: {json.dumps(RequestError(status, message, None, code).body())}\n\n"

    tools = 0
    yield chunk({"role": "assistant", "content": ""})
    while True:
        item = await job.events.get()
        if item is None:
            break
        if item is SHUTDOWN:
            yield failed(503, "the server is shutting down; the generation was cancelled", "server_shutting_down")
            break
        if isinstance(item, Exception):
            yield failed(500, str(item), "generation_failed")
            continue
        if item.type == "thinking":
            yield chunk({"reasoning_content": item.text, "reasoning": item.text})
        elif item.type == "answer":
            yield chunk({"content": item.text})
        elif item.type == "tool_call":
            if item.tool_call.get("name"):
                yield chunk({"tool_calls": [_tool_call(item.tool_call, tools)]})
                tools += 1
            else:
                yield chunk({"content": f"\n[tool call error: {item.tool_call['error']}]"})
        elif item.type == "done":
            _count(guarded, item)
            yield chunk(finish=_finish(item), loops=_loop_guard(item))
            if include_usage:
                yield chunk(usage=_usage(item))
    yield "data: [DONE]\n\n"


def _usage(result: GenerationResult) -> dict:
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


def _loop_guard(result: GenerationResult) -> dict:
    """Ours, beside `usage`: what the loop guard did (GenerationResult.loops; empty when it did nothing)."""
    return {"loops": result.loops}


def _count(guarded: dict, result: GenerationResult):
    for loop in result.loops:
        guarded[loop["action"]] += 1


def _tool_call(call: dict, index: int) -> dict:
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def _finish(result: GenerationResult) -> str:
    if result.finish_reason == "stop" and any(c.get("name") for c in result.tool_calls):
        return "tool_calls"
    return result.finish_reason
