"""Listening sockets and the WSGI handler shared by the gateway and the model server.

Every listener gets TCP_NODELAY: on loopback a small v2 call against gevent's WSGIServer
takes 44 ms without it (Nagle's algorithm meeting delayed ACKs) and 0.33 ms with it
(DESIGN.md, measured here). Linux copies the option to accepted sockets.
"""

from __future__ import annotations

import logging
import socket as stdlib_socket
from typing import Any

from gevent import Timeout, socket
from gevent.pywsgi import MAX_REQUEST_LINE, WSGIHandler

__all__ = ["BODY_READ_KEY", "REQUEST_HEAD_TIMEOUT_S", "QuietHandler", "bound_port", "create_listener"]

# Apps set environ[BODY_READ_KEY] = True once they have read the whole request body. An error
# answered before that carries "Connection: close", and the handler then closes the connection
# instead of reading (and waiting for) the rest of a body nobody wants: a 2 GB upload refused
# with 413, or a slow-loris body cut off with 408, costs nothing more.
BODY_READ_KEY = "chaoqing.body_read"

DEFAULT_BACKLOG = 2048

# A connection must deliver each request's line and headers within this long, the idle time
# of a kept-alive connection included; then it is closed (408 when a request had begun).
# pywsgi itself waits for ever, so a client trickling its headers a byte at a time (slow
# loris), or merely holding connections open, would keep server connection slots for good.
# Longer than the 60 s idle timeout of common load balancers, so that they close first.
REQUEST_HEAD_TIMEOUT_S = 75.0
_REQUEST_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

_log = logging.getLogger("chaoqing.http")


def create_listener(host: str, port: int, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A bound, listening TCP socket with SO_REUSEADDR and TCP_NODELAY; port 0 picks a free port.

    Raises OSError when the address cannot be bound.
    """
    family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
    listener = socket.socket(family, stdlib_socket.SOCK_STREAM)
    try:
        listener.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        listener.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        listener.bind((host, port))
        listener.listen(backlog)
    except BaseException:
        listener.close()
        raise
    return listener


def bound_port(listener: Any) -> int:
    """The port a listener is bound to (useful after binding port 0)."""
    return int(listener.getsockname()[1])


class QuietHandler(WSGIHandler):  # type: ignore[misc]
    """pywsgi handler that logs requests at DEBUG and client errors as one line, not tracebacks.

    gevent's own handler writes an access line per request to stderr; services log their
    own structured line instead. Server faults still reach the server's ``error_log``.
    """

    request_head_timeout_s = REQUEST_HEAD_TIMEOUT_S
    _head_timer: Timeout | None = None
    wsgi_input: object | None  # pywsgi's: the request body's Input, None before one is read

    def read_requestline(self) -> str:
        timer = Timeout(self.request_head_timeout_s)
        timer.start()
        try:
            line: str = super().read_requestline()
        except Timeout as exc:
            timer.close()
            if exc is not timer:
                raise
            return ""  # nothing arrived in time: pywsgi closes the connection
        except BaseException:
            timer.close()
            raise
        if line and len(line) < MAX_REQUEST_LINE:
            self._head_timer = timer  # read_request goes on under the same limit
        else:
            timer.close()
        return line

    def read_request(self, raw_requestline: str) -> Any:
        timer, self._head_timer = self._head_timer, None
        try:
            return super().read_request(raw_requestline)
        except Timeout as exc:
            if exc is not timer:
                raise
            raise _SlowRequestHead(f"no complete request head within {self.request_head_timeout_s:g} s") from None
        finally:
            if timer is not None:
                timer.close()

    def run_application(self) -> None:
        try:
            super().run_application()
        finally:
            if self.close_connection and self.wsgi_input is not None:
                self.wsgi_input = _UNREAD_INPUT

    def log_request(self) -> None:
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s", self.format_request())

    def _handle_client_error(self, ex: BaseException) -> Any:
        _log.info("client error from %s: %s", self.client_address, ex)
        if isinstance(ex, _SlowRequestHead):
            self.close_connection = True
            return ("408", _REQUEST_TIMEOUT_RESPONSE)
        return super()._handle_client_error(ex)


class _SlowRequestHead(ValueError):
    """The request line arrived but the headers did not, in time (a ValueError: pywsgi hands
    it to _handle_client_error)."""


class _UnreadInput:
    """Stands in for a request body the app chose not to read: nothing to discard."""

    def _discard(self) -> None:
        pass


_UNREAD_INPUT = _UnreadInput()
