"""The ASGI app: the routes, and OpenAI's response shapes (one JSON, or server-sent events)."""

import asyncio
import base64
import hashlib
import hmac
import html
import os
import re
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Optional

from ..errors import UserError, show
from ..generate import GenerationResult, Prompt
from ..options import CacheOptions, Drafting
from .engine import SHUTDOWN, CACHE_SLOTS, PARALLEL, Engine, Job
from .guard import Guard
from .chat import Chat
from .completions import Completions
from .messages import Messages, error_for
from .request import RequestError, clip, prepare
from .responses import Responses

MAX_BODY = 4 * 2**20  # bytes of JSON a request may carry
BIG_BODY = 2**18  # bytes: a prompt this big tokenizes for a while; those take turns on all cores but one
PAGE = Path(__file__).with_name("chat.html")
# seconds a stream may go without a byte before a keep-alive is sent: a long prompt is read, or a tool call written,
# in silence, and clients and proxies give up on a quiet stream (Claude Code after five minutes)
KEEPALIVE = 10.0
PING = ": keep-alive\n\n"  # an SSE comment: every client skips it (Anthropic's API sends a ping event instead)


def create_app(model, tokenizer, model_name: str, api_key: Optional[str] = None, max_body: int = MAX_BODY,
               cache_slots: int = CACHE_SLOTS, cache_bytes: Optional[int] = None, parallel: int = PARALLEL,
               host: str = "127.0.0.1", allow_origins=(), kv_bits=None, kv_start: int = 0, draft_model=None,
               prompt_lookup: bool = False, num_draft="auto", served_names=()):
    """The ASGI app. `host` is the address the server is bound to (Host headers are checked against it);
    `allow_origins`: web origins (scheme://host[:port], or "*") whose pages may call the API; `kv_bits`
    ("auto", the default, 16, 8 or 4), `kv_start`: how a request's KV cache is held unless the request says
    (options.CacheOptions); `draft_model`, `prompt_lookup`, `num_draft`: speculative decoding (options.Drafting),
    unless the request says. A request is served whatever `model` it names (there is one); its answer names
    `model_name`. `served_names`: more ids /v1/models lists for it (--served-model-name)."""
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    CacheOptions(kv_bits, kv_start), Drafting(prompt_lookup, num_draft)  # checked before the engine starts
    if api_key is not None and not api_key:
        raise UserError("the API key is empty; give a key, or None for none")
    # a request's own kv_bits, kv_start, prompt_lookup, num_draft come first
    defaults = {"kv_bits": kv_bits, "kv_start": kv_start, "prompt_lookup": prompt_lookup, "num_draft": num_draft}
    engine = Engine(model, tokenizer, cache_slots, cache_bytes, parallel, draft_model)
    created = int(time.time())
    names = [model_name] + [n for n in dict.fromkeys(served_names) if n != model_name]
    guarded = {"nudged": 0, "closed": 0, "stopped": 0}  # what the loop guard did, over every reply (/health)

    @lru_cache(maxsize=1)
    def big_prompts():  # made on the event loop, where anyio wants it
        return anyio.CapacityLimiter(max(1, (os.cpu_count() or 2) - 1))

    def error(request, e: RequestError):
        return JSONResponse(error_for(request.url.path, e), status_code=e.status)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        bearer = request.headers.get("authorization", "").encode("latin-1")
        key = request.headers.get("x-api-key", "").encode("latin-1")  # Anthropic's clients send it so
        return (hmac.compare_digest(bearer, f"Bearer {api_key}".encode())
                | hmac.compare_digest(key, api_key.encode()))

    def unauthorized() -> RequestError:
        return RequestError(401, "a valid 'Authorization: Bearer KEY' (or 'x-api-key: KEY') header is needed", None,
                            "invalid_api_key")

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
            return error(request, unauthorized())
        served = [{"id": name, "object": "model", "created": created, "owned_by": "mlx-qwen3"} for name in names]
        wanted = request.path_params.get("model_id")
        if wanted is None:
            return JSONResponse({"object": "list", "data": served})
        for entry in served:
            if wanted in (entry["id"], entry["id"].rstrip("/").split("/")[-1]):
                return JSONResponse(entry)
        return error(request, RequestError(404, f"the model {show(wanted, 60)} is not served here; this server "
                                                f"has '{model_name}'", "model", "model_not_found"))

    responses = Responses()

    async def stored_response(request):
        if not authorized(request):
            return error(request, unauthorized())
        response_id = request.path_params["response_id"]
        try:
            if request.method == "DELETE":
                return JSONResponse(responses.delete(response_id))
            return JSONResponse(responses.retrieve(response_id))
        except RequestError as e:
            return error(request, e)

    chat_page = PAGE.read_text().replace("{{MODEL}}", html.escape(model_name))
    page_headers = page_policy(chat_page)

    async def page(request):
        return HTMLResponse(chat_page, headers=page_headers)

    def endpoint(api, count: bool = False):
        """The route for one API (chat.py, completions.py, responses.py, messages.py): its request parsed and
        prepared off the event loop, a job for the engine, its reply as one JSON or as server-sent events.
        `count`: the request is only counted ({"input_tokens": N}, the tokens its prompt would be)."""

        async def handle(request: Request):
            try:
                if not authorized(request):
                    raise unauthorized()
                if engine.closing:
                    raise stopping()
                raw = await read_body(request)
                # off the event loop: rendering and tokenizing a 4 MB prompt takes seconds
                limiter = big_prompts() if len(raw) > BIG_BODY else None
                call, prompt = await anyio.to_thread.run_sync(
                    partial(prepare, raw, api, model, tokenizer, defaults), limiter=limiter)
                if engine.closing:
                    raise stopping()
            except RequestError as e:
                return error(request, e)
            except ClientDisconnect:
                return error(request, RequestError(400, "the client went away", None, "client_disconnected"))
            if count:
                return JSONResponse({"input_tokens": len(prompt.ids)})

            job = Job(prompt, asyncio.get_running_loop())
            engine.submit(job)
            meta = Meta(f"{api.prefix}{uuid.uuid4().hex}", int(time.time()), model_name, prompt)
            if call.stream:
                events = keepalive(api.stream(_items(job, guarded), call, meta), getattr(api, "ping", PING), KEEPALIVE)
                return _Stream(events, lambda: engine.release(job))
            try:
                return JSONResponse(api.answer(await _result(request, job, guarded), call, meta))
            except RequestError as e:
                return error(request, e)
            finally:
                engine.release(job)

        return handle

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
        e = RequestError(status, f"{request.method} {clip(request.url.path, 100)}: {exc.detail}", None, code)
        return JSONResponse(error_for(request.url.path, e), status_code=status, headers=getattr(exc, "headers", None))

    async def server_error(request, exc):  # a bug: logged with its traceback by uvicorn; the client gets JSON
        return error(request, RequestError(500, f"internal error: {type(exc).__name__}", None, "internal_error"))

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{model_id:path}", models),
        Route("/v1/chat/completions", endpoint(Chat()), methods=["POST"]),
        Route("/v1/completions", endpoint(Completions()), methods=["POST"]),
        Route("/v1/responses", endpoint(responses), methods=["POST"]),
        Route("/v1/responses/{response_id}", stored_response, methods=["GET", "DELETE"]),
        Route("/v1/messages", endpoint(Messages()), methods=["POST"]),
        Route("/v1/messages/count_tokens", endpoint(Messages(), count=True), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error},
                    middleware=[Middleware(Guard, host=host, allow_origins=tuple(allow_origins))])
    app.router.redirect_slashes = False  # Guard serves /v1/models/ as /v1/models; no plain-text redirects
    app.state.engine = engine
    return app


def page_policy(page: str) -> dict:
    """The chat page's headers: a Content-Security-Policy that runs its own script and style (by their hashes) and
    nothing else, talks to this server only (its icon is an empty data: URL) and cannot be framed; HTML in a reply
    that the renderer ever let through would still run nothing and load nothing."""

    def digest(tag):
        body, = re.findall(f"<{tag}>(.*?)</{tag}>", page, re.S)
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    policy = (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; connect-src 'self'; "
              "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclass(frozen=True)
class Meta:
    """What an API's answer says of itself: its id, when it was made, the model, the prompt it answers."""

    id: str
    created: int
    model: str
    prompt: Prompt


async def keepalive(chunks, ping: str, every: float):
    """`chunks` (an async generator), with `ping` sent whenever `every` seconds pass without one."""
    pending = asyncio.ensure_future(chunks.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield ping
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            yield chunk
            pending = asyncio.ensure_future(chunks.__anext__())
    finally:  # the client left, or the stream ended: the generator is closed, not left running
        if not pending.done():
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration):
                pass
        await chunks.aclose()


async def _items(job: Job, guarded: dict):
    """A job's events, then its GenerationResult (type "done"); a failure as a RequestError in their place."""
    while True:
        item = await job.events.get()
        if item is None:
            return
        if item is SHUTDOWN:
            yield RequestError(503, "the server is shutting down; the generation was cancelled", None,
                               "server_shutting_down")
            return
        if isinstance(item, Exception):
            yield RequestError(400 if isinstance(item, UserError) else 500, str(item), None, "generation_failed")
            continue
        if item.type == "done":
            for loop in item.loops:
                guarded[loop["action"]] += 1
        yield item


async def _result(request, job: Job, guarded: dict) -> GenerationResult:
    """A whole reply's result; a client that leaves cancels it at once."""

    async def watch():  # the body has been read: what `receive` says next is that the client left
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # no way to tell: the generation runs to its end
            return
        job.cancel.set()

    watcher = asyncio.ensure_future(watch())
    result = failure = None
    try:
        async for item in _items(job, guarded):
            if isinstance(item, RequestError):
                failure = failure or item
            elif item.type == "done":
                result = item
    finally:
        watcher.cancel()
    if failure is not None:
        raise failure
    if result is None:
        raise RequestError(500, "the generation was cancelled", None, "generation_failed")
    return result
