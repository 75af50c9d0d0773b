"""Serving the app with uvicorn: JSON for malformed HTTP too, a clean stop on the first signal; the API key."""

import asyncio
import json
import os
import time
from functools import lru_cache
from typing import Optional

from ..errors import UserError
from .engine import Engine
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
