"""Who may call the server, and what a request may be. One ASGI middleware, in front of every
route, so no endpoint can forget a check.

The model (README, "Security"):
- Every server has a token: generated with `secrets` at start or read from `--token-file` (mode
  0600, at least 128 bits). Every `/api/` call needs it in the `X-Edge-Token` header (401 without
  it or with a wrong one), on loopback too: a loopback port is open to every user of the machine,
  and reports show the device's images. Like Jupyter, the server prints a URL with the token
  once; it travels in the `#fragment`, which a browser never sends to a server (so no log or
  Referer holds it), and the page keeps it in the tab's session storage.
- Nothing a tokenless request can read contains the token: the page and its static files are
  the same for everyone and hold no secret.
- A loopback bind refuses any `Host` other than its own address (DNS rebinding: a foreign name
  made to resolve to 127.0.0.1 would otherwise make a foreign page same-origin with this one).
- A request whose `Origin` is another site is refused on every state-changing call, and request
  bodies are capped while they stream (a client can lie in, or omit, Content-Length): uploads at
  `--max-upload-mib`, every other route at a few KiB, refused with 413 before the route runs.
- Every answer, the guard's own refusals included, carries the same security headers, and none
  may be stored by a cache (the page's static files are revalidated instead).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import secrets
import stat
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_m2kd.errors import UserError
from edge_m2kd.server.uploads import UploadLimits

TOKEN_HEADER = "x-edge-token"
SAFE_METHODS = ("GET", "HEAD")
MIN_TOKEN_BITS = 128
# Routes whose body is images; every other route takes at most a small JSON body.
UPLOAD_PATHS = ("/api/steps", "/api/predict")
SMALL_BODY_BYTES = 64 * 2**10
TOKEN_HINT = ("generate one with `python -c \"import secrets; print(secrets.token_urlsafe(32))\" > FILE && "
              "chmod 600 FILE`")
# The page loads only its own files; nothing may frame it (a framed Cancel button could be clicked
# by a user who thinks they are clicking something else).
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'none'; base-uri 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"), (b"content-security-policy", CSP.encode())]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def token_bits(token: str) -> float:
    """An estimate of the entropy of a token someone chose: its length times the bits of one
    character, log2 of the smallest usual alphabet holding all its characters (digits, hex,
    alphanumerics, base64, printable ASCII), but at most twice the token's own Shannon entropy
    per character. The cap is what catches repetition (`aaaaaaaaaaaaaaaa`: 0 bits, `abab...`: 2
    bits a character); the factor 2 covers how far the plug-in estimate falls short on a short
    random string, so a random token gets its full alphabet (32 hex characters: 128 bits)."""
    if not token:
        return 0.0
    chars = set(token)
    pool = next((len(alphabet) for alphabet in _ALPHABETS if chars <= alphabet), len(_ALPHABETS[-1]))
    n = len(token)
    shannon = -sum(k / n * math.log2(k / n) for k in Counter(token).values())
    return n * min(math.log2(pool), 2 * shannon)


_ALPHABETS = [set(a) for a in (
    string.digits, string.digits + "abcdef", string.digits + "ABCDEF", string.digits + string.ascii_lowercase,
    string.digits + string.ascii_uppercase, string.digits + string.ascii_letters,
    string.digits + string.ascii_letters + "-_", string.digits + string.ascii_letters + "+/=",
    string.digits + string.ascii_letters + string.punctuation,
)]


def read_token_file(path: Path) -> str:
    """The token in ``path``, refused (one line) if others could read the file or if it is
    guessable: under MIN_TOKEN_BITS by `token_bits`."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as e:
        raise UserError(f"cannot read the token file {str(path)!r} ({e.strerror}); check the path") from e
    if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH | stat.S_IWGRP | stat.S_IWOTH):
        raise UserError(f"the token file {str(path)!r} is open to group or others (mode {stat.S_IMODE(mode):04o}), "
                        f"so another user could take the token; run `chmod 600 {path}`")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise UserError(f"the token in {str(path)!r} must be printable ASCII without spaces; {TOKEN_HINT}")
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS:
        raise UserError(f"the token in {str(path)!r} has about {bits:.0f} bits of entropy, under {MIN_TOKEN_BITS}; "
                        f"{TOKEN_HINT}")
    return token


@dataclass(frozen=True)
class ServerSettings:
    workspace: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    limits: UploadLimits = field(default_factory=UploadLimits)
    # Sockets (connections.py): a socket must finish its request's headers within
    # header_timeout_s of connecting, an idle keep-alive one is closed after keep_alive_s, and
    # past max_connections open at once a request gets a 503. Far above what the page opens (a
    # browser keeps 6 per site), and under the 1024 file descriptors a board's shell allows.
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_connections: int = 512

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
        # Static files are the same for everyone and change only with the package: a browser may
        # keep them if it asks again first. Nothing else may be stored.
        cache = b"no-cache" if path.startswith("/static/") else b"no-store"
        refusal = self._refusal(headers, method, path)
        if refusal is not None:
            await _reply(send, *refusal, cache=cache)
            return
        limit = self.settings.limits.max_request_bytes if path in UPLOAD_PATHS else SMALL_BODY_BYTES
        too_large = (f"the request is larger than the limit of {_size(limit)} for {path}; upload fewer or smaller "
                     "images at a time" if path in UPLOAD_PATHS else
                     f"the request body is larger than the limit of {_size(limit)} for {path}; send a smaller body")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _reply(send, 413, too_large, cache=cache)
            return
        if path not in UPLOAD_PATHS:
            # A small body is read here, so an oversized one is a 413 before the route runs (a
            # route's own JSON parsing would answer 400, having buffered it all).
            body = await _read_small_body(receive, limit)
            if body is None:
                await _reply(send, 413, too_large, cache=cache)
                return
            receive = _replay(body, receive)
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
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                message = {**message, "headers": [*kept, *SECURITY_HEADERS, (b"cache-control", cache)]}
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await _reply(send, 413, too_large, cache=cache)

    def _refusal(self, headers: Headers, method: str, path: str) -> tuple[int, str] | None:
        s = self.settings
        host = headers.get("host", "")
        if s.loopback and host not in self.hosts:
            return 400, f"this server answers only as {sorted(self.hosts)[0]} (Host {host!r} refused)"
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and urlsplit(origin).netloc != host:
            return 403, f"a request from another site ({origin}) is refused"
        if not path.startswith("/api/"):
            return None  # the page and its static files hold no secret, on any bind
        given = headers.get(TOKEN_HEADER)
        if given is None:
            return 401, ("this call needs the server's token in the X-Edge-Token header: open the URL "
                         "`edge-m2kd serve` printed (http://.../#token=...), or use its --token-file")
        if not secrets.compare_digest(given.encode(), s.token.encode()):
            return 401, "wrong token; use the one `edge-m2kd serve` printed when it started (or its --token-file)"
        return None


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


async def _read_small_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` (the rest is not read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # the client left; the route sees an empty body
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect a streaming answer listens for

    return replay


async def _reply(send: Send, status: int, detail: str, cache: bytes = b"no-store") -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *SECURITY_HEADERS, (b"cache-control", cache)]})
    await send({"type": "http.response.body", "body": body})
