"""optuna-dashboard on a campaign's study: read-only unless asked, credentials masked.

Two layers keep a read-only dashboard read-only, both through public interfaces:
``ReadOnlyApp`` answers every request that could change something (any method but GET,
HEAD and OPTIONS) with 403 and a JSON reason before optuna-dashboard sees it, and the
storage handed to optuna-dashboard is a ``search.public_storage.PublicStorage`` that refuses
writes and masks the storage URL in what it serves.
"""

from __future__ import annotations

import json
import wsgiref.simple_server
from collections.abc import Callable, Iterable
from typing import Any

import optuna

from search.public_storage import PublicStorage

LOOPBACK = ("127.0.0.1", "::1", "localhost")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
NO_AUTH_WARNING = ("warning: the dashboard has no authentication; anyone who can reach "
                   "{host}:{port} can read the study{edits}")


class ReadOnlyApp:
    """WSGI middleware: requests other than GET/HEAD/OPTIONS get 403 with a JSON reason."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() in SAFE_METHODS:
            return self.app(environ, start_response)
        body = json.dumps({"reason": "this dashboard is read-only: restart it with "
                                     "`brmerge dashboard DIR --allow-edits` to change studies"}).encode()
        start_response("403 Forbidden", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(body)))])
        return [body]


def make_app(storage: optuna.storages.BaseStorage, *, allow_edits: bool = False) -> Callable[..., Iterable[bytes]]:
    """The dashboard's WSGI application on ``storage`` (read-only unless ``allow_edits``)."""
    import optuna_dashboard  # seconds to import (scikit-learn)

    app = optuna_dashboard.wsgi(PublicStorage(storage, writable=allow_edits))
    return app if allow_edits else ReadOnlyApp(app)


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise
        pass


class ServeError(OSError):
    """The dashboard cannot listen on host:port. An ``OSError`` whose ``filename`` is the
    address, so the command line prints it as one line; ``str()`` is the message with its fix."""

    def __str__(self) -> str:
        return str(self.strerror)


def make_server(app: Callable[..., Iterable[bytes]], host: str, port: int) -> wsgiref.simple_server.WSGIServer:
    """A WSGI server bound to host:port (``ServeError`` when the port is taken)."""
    server_class = wsgiref.simple_server.WSGIServer
    if ":" in host:  # an IPv6 literal
        import socket

        class V6(wsgiref.simple_server.WSGIServer):
            address_family = socket.AF_INET6

        server_class = V6
    try:
        return wsgiref.simple_server.make_server(host, port, app, server_class=server_class,
                                                 handler_class=_QuietHandler)
    except OSError as exc:
        raise ServeError(exc.errno, f"cannot serve on {host}:{port} ({exc.strerror or exc}): pass another "
                         "--port, or stop what uses this one", f"{host}:{port}") from None


def exposure_warning(host: str, port: int, *, allow_edits: bool) -> str | None:
    """The warning to print when the dashboard listens beyond this machine (None on loopback)."""
    if host in LOOPBACK or host.startswith("127."):
        return None
    return NO_AUTH_WARNING.format(host=host, port=port,
                                  edits=" and change or delete it (--allow-edits)" if allow_edits else "")
