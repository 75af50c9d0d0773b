"""An OpenAI-compatible local server on top of the generator: /v1/models, /v1/chat/completions
(server-sent events or one JSON), /health, and a chat page at /.

One model, one worker thread: up to 8 requests (--parallel) run time-sliced (one step each in turn),
the rest wait in a queue; each starts from the cached prompt that shares the longest prefix with it. The
cached prompts are bounded in number and in bytes (a 32k-token QwQ-32B prompt holds 8.6 GB).
"""

import asyncio
import hmac
import html
import json
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from .errors import UserError
from .generate import (GenerationOptions, GenerationResult, common_prefix, context_window, recommended_working_set,
                       render_prompt, rewind, run, to_messages)
from .models.base import make_cache, weight_bytes
from .thinking import thinking_wanted

MAX_BODY = 4 * 2**20  # bytes of JSON a request may carry
CACHE_SLOTS = 4  # finished requests' caches kept for reuse
PARALLEL = 8  # requests generating at once, time-sliced; each holds its own KV cache
PAGE = Path(__file__).with_name("chat.html")


def default_cache_bytes(model) -> int:
    """A quarter of the memory the weights leave free: the GPU's recommended working set on a Mac,
    physical memory elsewhere."""
    total = recommended_working_set() or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(0, total - weight_bytes(model)) // 4


class RequestError(Exception):
    """A bad request: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---- the request: checked once, into messages and GenerationOptions ----

def _field(body: dict, key: str, kinds, lo=None, hi=None, lo_open=False):
    value = body.get(key)
    if value is None:
        return None
    wanted = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):  # True is an int too
        names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
                 dict: "an object"}
        kind = "a number" if float in wanted else names[wanted[0]]
        raise RequestError(422, f"'{key}' must be {kind}", key, "invalid_type")
    if lo is not None and (value < lo or (lo_open and value == lo)) or hi is not None and value > hi:
        span = f"{'(' if lo_open else '['}{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RequestError(422, f"'{key}' must be in {span}, not {value}", key, "out_of_range")
    return value


def _text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise RequestError(422, f"{where}: only text content parts are supported", where, "unsupported_content")
        return "".join(p["text"] for p in content)
    raise RequestError(422, f"{where}: content must be a string or a list of text parts", where, "invalid_type")


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
            if not isinstance(m["tool_calls"], list):
                raise RequestError(422, f"{where}.tool_calls must be an array", where, "invalid_type")
            msg["tool_calls"] = m["tool_calls"]
        out.append(msg)
    return out


def serves(served: str, wanted: str) -> bool:
    """Whether a request's `model` names the served one: as given to --model, or its last path part."""
    return wanted in (served, served.rstrip("/").split("/")[-1])


def parse_request(body, served: str) -> tuple:
    """-> (messages, GenerationOptions keywords, stream, include_usage)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object", None, "invalid_body")
    model = _field(body, "model", str)
    if model is not None and not serves(served, model):
        raise RequestError(404, f"the model '{model}' is not served here; this server has '{served}'", "model",
                           "model_not_found")
    messages = parse_messages(body.get("messages"))
    if _field(body, "n", int, 1, 1) not in (None, 1):
        raise RequestError(422, "'n' must be 1", "n", "unsupported")
    opts = {
        "temperature": _field(body, "temperature", (int, float), 0, 2),
        "top_p": _field(body, "top_p", (int, float), 0, 1, lo_open=True),
        "top_k": _field(body, "top_k", int, 0),
        "min_p": _field(body, "min_p", (int, float), 0, 1),
        "presence_penalty": _field(body, "presence_penalty", (int, float), -2, 2),
        "frequency_penalty": _field(body, "frequency_penalty", (int, float), -2, 2),
        "repetition_penalty": _field(body, "repetition_penalty", (int, float), 0, lo_open=True),
        "seed": _field(body, "seed", int),
        "max_tokens": _field(body, "max_completion_tokens", int, 1) or _field(body, "max_tokens", int, 1),
        "thinking_budget": _field(body, "thinking_budget", int, 0),
    }
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise RequestError(422, "'stop' must be a string or an array of at most 4 strings", "stop", "invalid_type")
        opts["stop"] = tuple(stop)
    tools = _field(body, "tools", list)
    if tools is not None and body.get("tool_choice") != "none":
        if not all(isinstance(t, dict) for t in tools):
            raise RequestError(422, "'tools' must be an array of objects", "tools", "invalid_type")
        opts["tools"] = tools
    kwargs = _field(body, "chat_template_kwargs", dict) or {}
    if "enable_thinking" in kwargs:
        if not isinstance(kwargs["enable_thinking"], bool):
            raise RequestError(422, "'chat_template_kwargs.enable_thinking' must be a boolean",
                               "chat_template_kwargs", "invalid_type")
        opts["enable_thinking"] = kwargs.pop("enable_thinking")
    opts["chat_template_kwargs"] = kwargs
    stream = bool(_field(body, "stream", bool))
    include_usage = bool((_field(body, "stream_options", dict) or {}).get("include_usage"))
    return messages, {k: v for k, v in opts.items() if v is not None}, stream, include_usage


# ---- the engine: one worker thread, a queue, a few cached prompts ----

class Job:
    def __init__(self, ids: list, opts: GenerationOptions, thinking: bool, loop):
        self.ids, self.opts, self.thinking, self.loop = ids, opts, thinking, loop
        self.events = asyncio.Queue()
        self.reused = 0

    def put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # its event loop has closed (the server is stopping): nobody is listening
            self.opts.cancel.set()


class Engine:
    """Runs the jobs on one worker thread, time-sliced: each round, every active job (up to
    `max_active`) advances by one step of its own generator and its own KV cache, so a new request
    starts at once instead of waiting for the ones before it. Outputs never mix: each job has its
    own queue. Finished caches go back to a small pool, keyed by the tokens they hold: the newest
    `cache_slots` of them that fit in `cache_bytes` together."""

    def __init__(self, model, tokenizer, cache_slots: int = CACHE_SLOTS, cache_bytes: Optional[int] = None,
                 max_active: int = PARALLEL):
        self.model, self.tokenizer = model, tokenizer
        self.jobs = queue.Queue()
        self.cached = []  # [(token ids in the cache, cache)], most recent last
        self.slots, self.max_active = cache_slots, max_active
        self.cache_bytes = default_cache_bytes(model) if cache_bytes is None else cache_bytes
        self.active = 0
        threading.Thread(target=self._work, daemon=True, name="mlx-qwen3-generation").start()

    def submit(self, job: Job):
        self.jobs.put(job)

    @property
    def waiting(self) -> int:
        return self.jobs.qsize() + self.active

    def _take_cache(self, ids: list):
        """-> (a cache for `ids`, the tokens it already holds). A request that continues a cached one
        takes that cache over; one that only shares a prefix gets a copy of it, so that the cached
        conversation stays whole for its own next turn."""
        shared = [common_prefix(cached, ids) for cached, _ in self.cached]
        best = max(range(len(shared)), key=shared.__getitem__, default=None)
        common = 0 if best is None else min(shared[best], len(ids) - 1)
        if common <= 0:
            return make_cache(self.model), []
        cached, cache = self.cached[best]
        if common == len(cached):
            self.cached.pop(best)
            return cache, rewind(cache, cached, ids)
        return [c.copy(common) for c in cache], cached[:common]

    def _keep(self, ids: list, cache: list):
        # an entry whose tokens all begin the new one's is covered by it
        self.cached = [(c_ids, c) for c_ids, c in self.cached if common_prefix(c_ids, ids) < len(c_ids)]
        self.cached.append((ids, cache))
        while self.cached and (len(self.cached) > self.slots or self.cached_bytes > self.cache_bytes):
            self.cached.pop(0)

    @property
    def cached_bytes(self) -> int:
        return sum(c.nbytes for _, cache in list(self.cached) for c in cache)

    def _admit(self, active: list):
        """Start the waiting jobs there is room for; block only when there is nothing else to do."""
        while len(active) < self.max_active:
            try:
                job = self.jobs.get(block=not active)
            except queue.Empty:
                return
            if job.opts.cancel.is_set():  # the client left while it waited
                job.put(None)
                continue
            try:
                cache, fed = self._take_cache(job.ids)
                job.reused = len(fed)
                steps = run(self.model, self.tokenizer, job.ids, cache, job.opts, job.thinking, fed=fed)
            except Exception as e:  # reported to that request; the worker goes on
                job.put(e)
                job.put(None)
                continue
            active.append((job, steps, cache, fed))

    def _work(self):
        active = []
        while True:
            self._admit(active)
            self.active = len(active)
            for entry in list(active):
                job, steps, cache, fed = entry
                try:
                    job.put(next(steps))
                    continue
                except StopIteration:  # done or cancelled: the cache holds exactly `fed`, worth keeping
                    self._keep(fed, cache)
                except Exception as e:  # reported to that request; the others go on
                    job.put(e)
                active.remove(entry)
                job.put(None)
            self.active = len(active)


# ---- OpenAI's response shapes ----

def _usage(result: GenerationResult, reused: int) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.generation_tokens,
        "total_tokens": result.prompt_tokens + result.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": reused},
        "completion_tokens_details": {"reasoning_tokens": result.thinking_tokens},
    }


def _tool_call(call: dict, index: int) -> dict:
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def _finish(result: GenerationResult) -> str:
    if result.finish_reason == "stop" and any(c.get("name") for c in result.tool_calls):
        return "tool_calls"
    return result.finish_reason


# ---- the app ----

def create_app(model, tokenizer, model_name: str, api_key: Optional[str] = None, max_body: int = MAX_BODY,
               cache_slots: int = CACHE_SLOTS, cache_bytes: Optional[int] = None, parallel: int = PARALLEL):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    engine = Engine(model, tokenizer, cache_slots, cache_bytes, parallel)
    window = context_window(model)
    created = int(time.time())

    def error(e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    def unauthorized() -> RequestError:
        return RequestError(401, "a valid 'Authorization: Bearer KEY' header is needed", None, "invalid_api_key")

    async def read_json(request: Request):
        if int(request.headers.get("content-length") or 0) > max_body:
            raise RequestError(413, f"the body is over {max_body} bytes", None, "body_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body:
                raise RequestError(413, f"the body is over {max_body} bytes", None, "body_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_name, "waiting": engine.waiting,
                             "cached_prompts": len(engine.cached), "cached_bytes": engine.cached_bytes})

    async def models(request):
        if not authorized(request):
            return error(unauthorized())
        served = {"id": model_name, "object": "model", "created": created, "owned_by": "mlx-qwen3"}
        wanted = request.path_params.get("model_id")
        if wanted is None:
            return JSONResponse({"object": "list", "data": [served]})
        if not serves(model_name, wanted):
            return error(RequestError(404, f"the model '{wanted}' is not served here; this server has '{model_name}'",
                                      "model", "model_not_found"))
        return JSONResponse(served)

    async def page(request):
        return HTMLResponse(PAGE.read_text().replace("{{MODEL}}", html.escape(model_name)))

    async def chat(request: Request):
        try:
            if not authorized(request):
                raise unauthorized()
            messages, options, stream, include_usage = parse_request(await read_json(request), model_name)
            opts = GenerationOptions.from_kwargs(cancel=threading.Event(), **options)
            messages = to_messages(messages, opts.system)
            ids = render_prompt(tokenizer, messages, opts)
            if len(ids) >= window:
                raise RequestError(400, f"the prompt is {len(ids)} tokens; the context window is {window}",
                                   "messages", "context_length_exceeded")
        except UserError as e:
            return error(RequestError(422, str(e), None, "invalid_value"))
        except RequestError as e:
            return error(e)
        except ClientDisconnect:
            return error(RequestError(400, "the client went away", None, "client_disconnected"))

        job = Job(ids, opts, thinking_wanted(messages, opts.enable_thinking), asyncio.get_running_loop())
        engine.submit(job)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            return StreamingResponse(_sse(job, cid, now, model_name, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(await _complete(request, job, cid, now, model_name))
        except RequestError as e:
            return error(e)

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        return error(RequestError(status, f"{request.method} {request.url.path}: {exc.detail}", None,
                                  "not_found" if status == 404 else "method_not_allowed"))

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{model_id:path}", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    app.state.engine = engine
    return app


async def _complete(request, job: Job, cid, now, model_name) -> dict:
    """A whole reply as one chat.completion object; a client that leaves cancels it."""
    result, failure = None, None
    while True:
        try:
            item = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.opts.cancel.set()
            continue
        if item is None:
            break
        if isinstance(item, Exception):
            failure = item
        elif item.type == "done":
            result = item
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
        "usage": _usage(result, job.reused),
    }


async def _sse(job: Job, cid, now, model_name, include_usage):
    def chunk(delta=None, finish=None, usage=None):
        body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    tools = 0
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            item = await job.events.get()
            if item is None:
                break
            if isinstance(item, Exception):
                error = RequestError(500, str(item), None, "generation_failed").body()
                yield f"data: {json.dumps(error)}\n\n"
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
                yield chunk(finish=_finish(item))
                if include_usage:
                    yield chunk(usage=_usage(item, job.reused))
        yield "data: [DONE]\n\n"
    finally:  # the client left, or the reply is complete: either way the slot is free
        job.opts.cancel.set()


def main():
    import click

    from .errors import run_cli

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--model", required=True, help="Model folder or Hugging Face Hub id.")
    @click.option("--host", default="127.0.0.1", show_default=True, help="Only this machine, unless told.")
    @click.option("--port", type=int, default=8080, show_default=True)
    @click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1.")
    @click.option("--parallel", type=click.IntRange(1), default=PARALLEL, show_default=True,
                  help="Requests generating at once (time-sliced); more wait in a queue. Lower it for big models "
                       "and long contexts: each holds its own KV cache.")
    @click.option("--prompt-cache", "cache_slots", type=click.IntRange(0), default=CACHE_SLOTS, show_default=True,
                  help="Finished prompts whose KV cache is kept for reuse.")
    @click.option("--prompt-cache-gb", type=click.FloatRange(0), default=None,
                  help="At most this many GiB for them (default: a quarter of the memory the weights leave free).")
    def cli(model, host, port, api_key, parallel, cache_slots, prompt_cache_gb):
        """An OpenAI-compatible server for one Qwen3 / Qwen3-MoE / QwQ model."""
        try:
            import uvicorn
        except ImportError:
            raise UserError('the server needs its extra: pip install "mlx-qwen3[server]"') from None
        from .load import load

        m, tokenizer = load(model)
        cache_bytes = None if prompt_cache_gb is None else int(prompt_cache_gb * 2**30)
        app = create_app(m, tokenizer, model, api_key, cache_slots=cache_slots, cache_bytes=cache_bytes,
                         parallel=parallel)
        print(f"serving {model} on http://{host}:{port} (chat page at /, API at /v1)")
        uvicorn.run(app, host=host, port=port, log_level="warning")

    run_cli(cli)


if __name__ == "__main__":
    main()
