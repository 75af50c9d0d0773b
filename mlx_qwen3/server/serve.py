"""Serving the app with uvicorn: JSON for malformed HTTP too, a clean stop on the first signal; the API key."""

import asyncio
import json
import os
import re
import sys
import time
from functools import lru_cache
from typing import Optional

from ..errors import UserError
from .app import create_app
from .engine import CACHE_SLOTS, PARALLEL, Engine
from .request import RequestError

SHUTDOWN_GRACE = 2.0  # seconds, after a SIGINT/SIGTERM, for clients to take their last answer
API_KEY_ENV = "MLX_QWEN3_API_KEY"


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


def main():
    import click

    from ..errors import run_cli

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--model", required=True, help="Model folder or Hugging Face Hub id.")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Only this machine, unless told. Requests must name this address (or localhost) in their "
                       "Host header; bound to 0.0.0.0 or ::, any Host is accepted.")
    @click.option("--port", type=int, default=8080, show_default=True)
    @click.option("--api-key", default=None,
                  help=f"Require 'Authorization: Bearer KEY' on /v1. Visible to `ps`: prefer --api-key-file or "
                       f"${API_KEY_ENV}. Precedence: --api-key, then --api-key-file, then ${API_KEY_ENV}.")
    @click.option("--api-key-file", default=None, metavar="FILE", help="Read the API key from the first line of FILE.")
    @click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
                  help="Let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API, with CORS "
                       "answers. Repeatable. Other pages are refused (403); the chat page at / always works.")
    @click.option("--parallel", type=click.IntRange(1), default=PARALLEL, show_default=True,
                  help="Requests generating at once (time-sliced); more wait in a queue. Lower it for big models "
                       "and long contexts: each holds its own KV cache.")
    @click.option("--prompt-cache", "cache_slots", type=click.IntRange(0), default=CACHE_SLOTS, show_default=True,
                  help="Finished prompts whose KV cache is kept for reuse.")
    @click.option("--prompt-cache-gb", type=click.FloatRange(0), default=None,
                  help="At most this many GiB for them (default: a quarter of the memory the weights leave free).")
    def cli(model, host, port, api_key, api_key_file, allow_origins, parallel, cache_slots, prompt_cache_gb):
        """An OpenAI-compatible server for one Qwen3 / Qwen3-MoE / QwQ model.

        The first Ctrl-C (or SIGTERM) cancels every generation, answers its client and exits 0."""
        try:
            import uvicorn  # noqa: F401
        except ImportError:
            raise UserError('the server needs its extra: pip install "mlx-qwen3[server]"') from None
        from ..load import load

        api_key = api_key_from(api_key, api_key_file)
        for origin in allow_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+/?", origin):
                raise UserError(f"--allow-origin {origin!r} is not an origin: give scheme://host[:port], "
                                "e.g. http://localhost:3000, or *")
        m, tokenizer = load(model)
        cache_bytes = None if prompt_cache_gb is None else int(prompt_cache_gb * 2**30)
        app = create_app(m, tokenizer, model, api_key, cache_slots=cache_slots, cache_bytes=cache_bytes,
                         parallel=parallel, host=host, allow_origins=allow_origins)
        print(f"serving {model} on http://{host}:{port} (chat page at /, API at /v1)", flush=True)
        make_server(app, host, port).run()
        if not app.state.engine.stop(timeout=2):  # a step that would not end (a long prefill): do not wait for it
            print("the generation thread did not stop in 2 s; exiting without it", file=sys.stderr, flush=True)
            os._exit(0)

    run_cli(cli)


if __name__ == "__main__":
    main()
