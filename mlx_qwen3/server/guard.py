"""Who may drive the server: Host and Origin, as Ollama checks them."""

import ipaddress
import socket
from typing import Optional
from urllib.parse import urlsplit

from ..errors import show
from .messages import error_for
from .request import RequestError

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
            body = error_for(scope["path"], refused)  # in the shape the path's client reads
            return await JSONResponse(body, refused.status)(scope, receive, send)
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
