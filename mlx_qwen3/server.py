"""An OpenAI-compatible local server on top of the generator: /v1/models, /v1/chat/completions
(server-sent events or one JSON), /health, and a chat page at /.

One model, one worker thread: up to 8 requests (--parallel) run time-sliced (one step each in turn),
the rest wait in a queue; each starts from the cached prompt that shares the longest prefix with it. The
cached prompts are bounded in number and in bytes (a 32k-token QwQ-32B prompt holds 8.6 GB).

Under bad input and faults: whatever a request holds, the answer is a 2xx or a 4xx with OpenAI's error
JSON, decided before a stream starts; a client that leaves cancels its generation; the first SIGINT or
SIGTERM cancels every generation, answers every client and exits 0; only this machine's addresses
(Host) and pages (Origin) may drive it, unless --allow-origin says otherwise.
"""

import asyncio
import hmac
import html
import ipaddress
import json
import os
import queue
import re
import socket
import threading
import time
import uuid
from functools import lru_cache, partial
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from .errors import UserError, show
from .generate import (RESERVED_TEMPLATE_ARGS, GenerationOptions, GenerationResult, check_ids, common_prefix,
                       context_window, recommended_working_set, render_prompt, rewind, run, to_messages)
from .models.base import make_cache, weight_bytes
from .thinking import thinking_wanted

MAX_BODY = 4 * 2**20  # bytes of JSON a request may carry
MAX_DEPTH = 100  # levels of nesting a request's JSON may have (the template's tojson recurses, as do we)
MAX_STOP = 1000  # characters in one stop string (every token is checked against each of its prefixes)
CACHE_SLOTS = 4  # finished requests' caches kept for reuse
PARALLEL = 8  # requests generating at once, time-sliced; each holds its own KV cache
BIG_BODY = 2**18  # bytes: a prompt this big tokenizes for a while; those take turns on all cores but one
SHUTDOWN_GRACE = 2.0  # seconds, after a SIGINT/SIGTERM, for clients to take their last answer
API_KEY_ENV = "MLX_QWEN3_API_KEY"
PAGE = Path(__file__).with_name("chat.html")
_SHUTDOWN = object()  # put in a job's events when the server stops: its client gets a 503 / an error chunk
_SURROGATE = re.compile("[\ud800-\udfff]")


def default_cache_bytes(model) -> int:
    """A quarter of the memory the weights leave free: the GPU's recommended working set on a Mac,
    physical memory elsewhere."""
    total = recommended_working_set() or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(0, total - weight_bytes(model)) // 4


class RequestError(Exception):
    """A bad request: the HTTP status and OpenAI's error object."""

    KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.KINDS.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


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
    above = lo is None or (value > lo if lo_open else value >= lo)
    if not (above and (hi is None or value <= hi)):  # written so that NaN fails
        span = f"{'(' if lo_open else '['}{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RequestError(422, f"'{key}' must be in {span}, not {show(value, 60)}", key, "out_of_range")
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


def parse_request(body, served: str) -> tuple:
    """-> (messages, GenerationOptions keywords, stream, include_usage). The ranges are GenerationOptions'
    (so that every refusal names its field); `body` has been through check_json."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object", None, "invalid_body")
    model = _field(body, "model", str)
    if model is not None and not serves(served, model):
        raise RequestError(404, f"the model {show(model, 60)} is not served here; this server has '{served}'", "model",
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
        "repetition_penalty": _field(body, "repetition_penalty", (int, float), 0.01, 10),
        "seed": _field(body, "seed", int, 0, 2**64 - 1),
        "max_tokens": _field(body, "max_completion_tokens", int, 1) or _field(body, "max_tokens", int, 1),
        "thinking_budget": _field(body, "thinking_budget", int, 0),
    }
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise RequestError(422, "'stop' must be a string or an array of at most 4 strings", "stop", "invalid_type")
        if any(len(s) > MAX_STOP for s in stop):
            raise RequestError(422, f"a stop string may have at most {MAX_STOP} characters", "stop", "out_of_range")
        opts["stop"] = tuple(stop)
    tools = _field(body, "tools", list)
    if tools is not None and body.get("tool_choice") != "none":
        if not all(isinstance(t, dict) for t in tools):
            raise RequestError(422, "'tools' must be an array of objects", "tools", "invalid_type")
        opts["tools"] = tools
    kwargs = dict(_field(body, "chat_template_kwargs", dict) or {})
    taken = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_ARGS)
    if taken:
        raise RequestError(422, f"'chat_template_kwargs' may not set {', '.join(map(repr, taken))}: the template gets "
                                "it from the request itself", "chat_template_kwargs", "reserved_template_argument")
    if "enable_thinking" in kwargs:
        if not isinstance(kwargs["enable_thinking"], bool):
            raise RequestError(422, "'chat_template_kwargs.enable_thinking' must be a boolean",
                               "chat_template_kwargs", "invalid_type")
        opts["enable_thinking"] = kwargs.pop("enable_thinking")
    opts["chat_template_kwargs"] = kwargs
    stream = bool(_field(body, "stream", bool))
    include_usage = bool((_field(body, "stream_options", dict) or {}).get("include_usage"))
    return messages, {k: v for k, v in opts.items() if v is not None}, stream, include_usage


def _too_long(n: int, window: int) -> RequestError:
    return RequestError(400, f"the prompt is {n} tokens; the context window is {window}", "messages",
                        "context_length_exceeded")


def prepare(raw: bytes, model, tokenizer, served: str) -> tuple:
    """A request's body -> (prompt ids, GenerationOptions, thinking, stream, include_usage), or a
    RequestError: everything that can be known before generating is checked here, the prompt rendered and
    tokenized included. Slow for big prompts: run it off the event loop."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError, and integers over 4,300 digits
        raise RequestError(400, f"the body is not valid JSON: {_clip(str(e))}", None,
                           "invalid_json") from None
    if isinstance(body, dict):
        check_json(body)
    messages, options, stream, include_usage = parse_request(body, served)
    window = context_window(model)
    try:
        opts = GenerationOptions.from_kwargs(cancel=threading.Event(), **options)
        messages = to_messages(messages, opts.system)
        ids = render_prompt(tokenizer, messages, opts)
        check_ids(model, ids)
    except UserError as e:  # a template that fails on this request's content comes as one too
        raise RequestError(422, str(e), None, "invalid_value") from None
    if len(ids) >= window:
        raise _too_long(len(ids), window)
    return ids, opts, thinking_wanted(messages, opts.enable_thinking), stream, include_usage


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
        self.live = set()  # jobs whose client waits for them; touched on the event loop only
        self.closing = False
        self.thread = threading.Thread(target=self._work, daemon=True, name="mlx-qwen3-generation")
        self.thread.start()

    def submit(self, job: Job):
        self.live.add(job)
        self.jobs.put(job)

    def release(self, job: Job):
        """Its client has its answer, or has left: stop it if it still runs."""
        job.opts.cancel.set()
        self.live.discard(job)

    def close(self):
        """Cancel every running and queued generation and tell its client at once (not after the worker's
        current step: a long prompt's prefill may take a while). Called on the event loop."""
        if self.closing:
            return
        self.closing = True
        for job in list(self.live):
            job.opts.cancel.set()
            job.events.put_nowait(_SHUTDOWN)
        self.jobs.put(None)  # wakes the worker if it waits for work; it drains the queue and ends

    def stop(self, timeout: float) -> bool:
        """After close(): whether the worker thread ended within `timeout` seconds."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

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
                job = self.jobs.get(block=not active and not self.closing)
            except queue.Empty:
                return
            if job is None:  # close() woke us
                continue
            if job.opts.cancel.is_set():  # the client left while it waited, or the server is stopping
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
        while not (self.closing and not active and self.jobs.empty()):
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


# ---- who may drive the server: Host and Origin, as Ollama checks them ----

def _split_host(value: str):
    """A Host header ("name", "name:port", "[v6]:port") -> (name, port or None), lowercased; None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name, port = value, None
    if port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    return name.rstrip("."), int(port) if port else None


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class Guard:
    """ASGI middleware: refuses (403) a Host that is not an address of this server, so that a web page
    cannot reach it through DNS rebinding, and an Origin that is neither this server's own page nor one
    given with --allow-origin, so that a page the user visits cannot drive it; answers CORS for the
    allowed origins. A path with a trailing slash is served as the path without it.

    Bound to all interfaces (0.0.0.0, ::), any Host is accepted (the names the machine is reached by are
    not known), but a browser's Origin must still be the server's own page reached by an IP address,
    localhost or this machine's host name: a rebinding attacker's page carries its own name."""

    METHODS = "GET, POST, OPTIONS"

    def __init__(self, app, host: str = "127.0.0.1", allow_origins=()):
        self.app = app
        bound = (_split_host(host if ":" not in host or host.startswith("[") else f"[{host}]") or ("", None))[0]
        self.any_host = bound in ("", "0.0.0.0", "::")
        self.names = {"localhost", bound} - {""}
        if self.any_host:
            machine = socket.gethostname().lower().rstrip(".")
            self.names |= {machine, machine.split(".")[0] + ".local"}
        self.any_origin = "*" in allow_origins
        self.origins = {o.strip().rstrip("/").lower() for o in allow_origins if o != "*"}

    def trusted(self, name: str) -> bool:
        """A name a DNS-rebinding page cannot stand behind."""
        ip = _ip(name)
        if ip is not None:
            return ip.is_loopback or self.any_host or name in self.names
        return name in self.names

    def refusal(self, scope, headers) -> Optional[RequestError]:
        hosts = headers.getlist("host")
        for host in hosts:
            parsed = _split_host(host)
            if parsed is None or not (self.any_host or self.trusted(parsed[0])):
                return RequestError(403, f"the Host header {show(host, 60)} is not an address of this server (start it "
                                         "with --host to serve another)", None, "host_not_allowed")
        origin = headers.get("origin")
        if origin is None or self.cross_origin_allowed(origin) or self.same_origin(origin, scope, hosts):
            return None
        return RequestError(403, f"requests from the web page at {show(origin, 60)} are not allowed (allow them with "
                                 "--allow-origin)", None, "origin_not_allowed")

    def cross_origin_allowed(self, origin: str) -> bool:
        return self.any_origin or origin.strip().rstrip("/").lower() in self.origins

    def same_origin(self, origin: str, scope, hosts: list) -> bool:
        """The server's own page (the chat page at /): the Origin is the address the request went to."""
        try:
            parts = urlsplit(origin.strip().lower())
            port = parts.port
        except ValueError:
            return False
        scheme = scope.get("scheme", "http")
        default = {"http": 80, "https": 443}.get(scheme)
        if parts.scheme != scheme or not parts.hostname or len(hosts) != 1 or not self.trusted(parts.hostname):
            return False
        host = _split_host(hosts[0])
        return host is not None and (parts.hostname, port or default) == (host[0], host[1] or default)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse, Response

        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
        headers = Headers(scope=scope)
        refused = self.refusal(scope, headers)
        if refused is not None:
            return await JSONResponse(refused.body(), refused.status)(scope, receive, send)
        origin = headers.get("origin")
        if origin is None or not self.cross_origin_allowed(origin):
            return await self.app(scope, receive, send)
        cors = {"Access-Control-Allow-Origin": "*" if self.any_origin else origin, "Vary": "Origin"}
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:  # a preflight
            asked = headers.get("access-control-request-headers", "")
            allowed = ", ".join(dict.fromkeys(["Authorization", "Content-Type"] +
                                              [h.strip() for h in asked.split(",") if h.strip()]))
            cors |= {"Access-Control-Allow-Methods": self.METHODS, "Access-Control-Allow-Headers": allowed,
                     "Access-Control-Max-Age": "600"}
            return await Response(status_code=204, headers=cors)(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []),
                                                 *((k.lower().encode(), v.encode("latin-1")) for k, v in cors.items())])
            await send(message)

        await self.app(scope, receive, send_with_cors)


# ---- the app ----

def create_app(model, tokenizer, model_name: str, api_key: Optional[str] = None, max_body: int = MAX_BODY,
               cache_slots: int = CACHE_SLOTS, cache_bytes: Optional[int] = None, parallel: int = PARALLEL,
               host: str = "127.0.0.1", allow_origins=()):
    """The ASGI app. `host` is the address the server is bound to (Host headers are checked against it);
    `allow_origins`: web origins (scheme://host[:port], or "*") whose pages may call the API."""
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    engine = Engine(model, tokenizer, cache_slots, cache_bytes, parallel)
    created = int(time.time())

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
                             "cached_prompts": len(engine.cached), "cached_bytes": engine.cached_bytes})

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
            ids, opts, thinking, stream, include_usage = await anyio.to_thread.run_sync(
                partial(prepare, raw, model, tokenizer, model_name), limiter=limiter)
            if engine.closing:
                raise stopping()
        except RequestError as e:
            return error(e)
        except ClientDisconnect:
            return error(RequestError(400, "the client went away", None, "client_disconnected"))

        job = Job(ids, opts, thinking, asyncio.get_running_loop())
        engine.submit(job)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            return _Stream(_sse(job, cid, now, model_name, include_usage), lambda: engine.release(job))
        try:
            return JSONResponse(await _complete(request, job, cid, now, model_name))
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
        return JSONResponse(RequestError(status, f"{request.method} {_clip(request.url.path, 100)}: {exc.detail}",
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


async def _complete(request, job: Job, cid, now, model_name) -> dict:
    """A whole reply as one chat.completion object; a client that leaves cancels it at once."""

    async def watch():  # the body has been read: what `receive` says next is that the client left
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # no way to tell: the generation runs to its end
            return
        job.opts.cancel.set()

    watcher = asyncio.ensure_future(watch())
    result, failure = None, None
    try:
        while True:
            item = await job.events.get()
            if item is None:
                break
            if item is _SHUTDOWN:
                raise RequestError(503, "the server is shutting down; the generation was cancelled", None,
                                   "server_shutting_down")
            if isinstance(item, Exception):
                failure = item
            elif item.type == "done":
                result = item
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
        "usage": _usage(result, job.reused),
    }


async def _sse(job: Job, cid, now, model_name, include_usage):
    def chunk(delta=None, finish=None, usage=None):
        body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def failed(status, message, code):
        return f"data: {json.dumps(RequestError(status, message, None, code).body())}\n\n"

    tools = 0
    yield chunk({"role": "assistant", "content": ""})
    while True:
        item = await job.events.get()
        if item is None:
            break
        if item is _SHUTDOWN:
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
            yield chunk(finish=_finish(item))
            if include_usage:
                yield chunk(usage=_usage(item, job.reused))
    yield "data: [DONE]\n\n"


# ---- serving: uvicorn, with JSON for malformed HTTP and a clean stop on the first signal ----

@lru_cache(maxsize=1)
def _uvicorn_classes():
    import h11
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        """uvicorn's HTTP/1.1, answering requests it cannot parse (a junk Content-Length, a bad request line)
        with OpenAI's error JSON instead of plain text."""

        def send_400_response(self, msg: str):
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                # the app is still at this request (answering early, or waiting for the body): from now on
                # it hears that the client left, and what it sends goes nowhere
                cycle.disconnected = True
                cycle.message_event.set()
                if cycle.response_started:
                    self.transport.close()
                    return
            body = json.dumps(RequestError(400, f"malformed HTTP request: {msg}", None, "invalid_http").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            try:
                for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # a response had already begun: all we can do is close
                pass
            self.transport.close()

        def eof_received(self):
            # The client stopped sending before the end of the body its Content-Length promised: h11 calls
            # that an error, which gets its 400 before the connection closes.
            if self.cycle is not None and self.cycle.more_body and not self.cycle.response_complete:
                self.conn.receive_data(b"")
                self.handle_events()

    class Server(uvicorn.Server):
        """The first SIGINT or SIGTERM stops it: every generation cancelled, every client answered (a 503, or
        an error chunk in its stream), then exit. A second one exits at once."""

        def __init__(self, config, engine: Engine):
            super().__init__(config)
            self.engine = engine

        def handle_exit(self, sig, frame):
            if self.should_exit:
                os.write(2, b"error: stopped at once (a second signal); clients may not have been answered\n")
                os._exit(128 + sig)
            self.should_exit = True  # not recorded in _captured_signals: uvicorn would raise it again at the end

        async def shutdown(self, sockets=None):
            self.engine.close()
            for server in getattr(self, "servers", []):
                server.close()
            for connection in list(self.server_state.connections):
                connection.shutdown()  # idle ones close now, busy ones once their answer is out
            deadline = time.monotonic() + SHUTDOWN_GRACE
            while self.server_state.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            for connection in list(self.server_state.connections):  # e.g. a body that never comes
                connection.transport.close()
            await super().shutdown(sockets)

    return Protocol, Server


def make_server(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning"):
    """A uvicorn.Server for create_app's `app`: malformed HTTP gets JSON errors too, and the first
    SIGINT/SIGTERM cancels every generation, answers every client and returns from run()."""
    import uvicorn

    protocol, server = _uvicorn_classes()
    return server(uvicorn.Config(app, host=host, port=port, http=protocol, log_level=log_level), app.state.engine)


def api_key_from(given: Optional[str], key_file: Optional[str], environ=os.environ) -> Optional[str]:
    """The API key: --api-key, else the first line of --api-key-file, else $MLX_QWEN3_API_KEY; None: none."""
    if given is not None:
        if not given.strip():
            raise UserError("--api-key is empty; give the key, or leave the option out")
        return given
    if key_file is not None:
        try:
            with open(key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--api-key-file {key_file} cannot be read: {getattr(e, 'strerror', None) or e}") from None
        if not key:
            raise UserError(f"--api-key-file {key_file} has no key on its first line")
        return key
    return environ.get(API_KEY_ENV, "").strip() or None


if __name__ == "__main__":  # python -m mlx_qwen3.server is `mlx-qwen3 serve`
    from .cli import main
    main("serve")
