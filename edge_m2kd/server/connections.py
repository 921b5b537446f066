"""How many sockets the server holds, and for how long, so that a few hundred idle sockets (a
scanner, a crashed client, or someone who wants the board to themselves) cannot lock its users out.

uvicorn's own limits do most of it: `limit_concurrency` (past it a request gets a 503, so the
tasks and buffers held stay bounded; set well above the idle sockets that could otherwise shut
the page out), `timeout_keep_alive` (an idle connection between two requests) and h11's cap on
the size of a request's headers. What uvicorn lacks is a timeout on a request's headers: it arms
its keep-alive timer only after it has answered, and any byte received cancels that timer, so a
socket that connects and never finishes its headers is held for ever (slowloris). `_protocol`
adds that one timer to uvicorn's h11 protocol: from connect (or from the end of the previous
answer) to the end of the headers, not extended by bytes that trickle in. A request's body is not
timed: a step's upload over a slow link may take minutes, and its size is capped anyway.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from edge_m2kd.server.security import ServerSettings

MAX_HEADER_BYTES = 16 * 2**10  # h11's default, stated: a request line and headers larger than this get a 400


def uvicorn_config(app: FastAPI, settings: ServerSettings, **overrides: Any) -> uvicorn.Config:
    import uvicorn

    options: dict[str, Any] = dict(
        host=settings.host, port=settings.port, log_level="warning", access_log=False,
        http=_protocol(settings.header_timeout_s), ws="none", lifespan="on",
        limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive_s,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)


def _protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        """uvicorn's h11 protocol with a deadline on each request's headers."""

        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # a pipelined request may already be in; otherwise uvicorn's keep-alive runs

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            # h11's IDLE: no complete request line and headers yet on this cycle.
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if not waiting:
                self._disarm()
            elif self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE:
                self.timeout_keep_alive_handler()  # uvicorn's own close of an idle connection

    return HeaderTimeoutH11
