"""Who may call the server, and what a request may be. One ASGI middleware, in front of every
route, so no endpoint can forget a check.

The model (README, "Security"):
- Every server has a token: generated with `secrets` at start (printed) or read from
  `--token-file`. It travels in the `X-Edge-Token` header, never in a URL (URLs end up in logs
  and browser history).
- On a loopback bind, reading (`GET`) needs no token, but any other method does. A page of
  another site can make a browser send a form POST to 127.0.0.1, but it cannot add a custom
  header (that needs a CORS preflight this server never grants) and cannot read the page that
  holds the token (the same-origin policy). So only the page this server served can start a
  step, cancel it or upload. The token is embedded in that page for this reason.
- A loopback bind also refuses any `Host` other than its own address (DNS rebinding: a foreign
  name made to resolve to 127.0.0.1 would otherwise make a foreign page same-origin with this one,
  able to read the embedded token).
- On any other address every `/api/` call needs the token (401 without it or with a wrong one),
  and the page does not embed it: the user brings it (the URL printed at start carries it in the
  `#fragment`, which a browser never sends to a server).
- A request whose `Origin` is another site is refused on every state-changing call, and request
  bodies are capped while they stream (a client can lie in, or omit, Content-Length).
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_m2kd.errors import UserError
from edge_m2kd.server.uploads import UploadLimits

TOKEN_HEADER = "x-edge-token"
SAFE_METHODS = ("GET", "HEAD")
MIN_TOKEN_LENGTH = 16
# The page loads only its own files; nothing may frame it (a framed Cancel button could be clicked
# by a user who thinks they are clicking something else).
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'none'; base-uri 'none'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def read_token_file(path: Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read the token file {str(path)!r} ({e.strerror}); check the path") from e
    if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or not token.isprintable() or " " in token:
        raise UserError(f"the token in {str(path)!r} must be at least {MIN_TOKEN_LENGTH} printable ASCII characters "
                        "without spaces; generate one with `python -c \"import secrets; print(secrets.token_urlsafe(24))\"`")
    return token


@dataclass(frozen=True)
class ServerSettings:
    workspace: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    limits: UploadLimits = field(default_factory=UploadLimits)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def allowed_hosts(self) -> set[str]:
        """Host headers a loopback bind answers (the browser omits the default port)."""
        names = {"127.0.0.1", "localhost", "[::1]"}
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            names.add(self.host if ":" not in self.host else f"[{self.host.strip('[]')}]")
        return {f"{n}:{self.port}" for n in names} | (names if self.port == 80 else set())


class _BodyTooLarge(Exception):
    pass


class Guard:
    """Host check, token check, body cap and response headers, for every HTTP request."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.hosts = settings.allowed_hosts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        refusal = self._refusal(headers, method, path)
        if refusal is not None:
            await _reply(send, *refusal)
            return
        limit = self.settings.limits.max_request_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _reply(send, 413, f"the request is larger than the limit of {limit / 2**20:.0f} MiB; upload fewer "
                                    "or smaller images at a time")
            return
        received = 0
        started = False

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                         (b"x-frame-options", b"DENY"), (b"content-security-policy", CSP.encode())]
                if path.startswith("/api/"):
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await _reply(send, 413, f"the request is larger than the limit of {limit / 2**20:.0f} MiB")

    def _refusal(self, headers: Headers, method: str, path: str) -> tuple[int, str] | None:
        s = self.settings
        host = headers.get("host", "")
        if s.loopback and host not in self.hosts:
            return 400, f"this server answers only as {sorted(self.hosts)[0]} (Host {host!r} refused)"
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and urlsplit(origin).netloc != host:
            return 403, f"a request from another site ({origin}) is refused"
        if not path.startswith("/api/"):
            return None  # the page and its static files hold no secret (the loopback page's token aside)
        given = headers.get(TOKEN_HEADER)
        needed = not s.loopback or method not in SAFE_METHODS
        if given is None and not needed:
            return None
        if given is None:
            return 401, ("this call needs the server's token in the X-Edge-Token header (printed when "
                         "`edge-m2kd serve` started)")
        if not secrets.compare_digest(given.encode(), s.token.encode()):
            return 401, "wrong token; use the one `edge-m2kd serve` printed when it started (or its --token-file)"
        return None


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})
