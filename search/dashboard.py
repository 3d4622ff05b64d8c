"""optuna-dashboard on a campaign's study: read-only unless asked, credentials masked.

``HostCheck`` answers 403 to a request whose ``Host`` header is not a name this dashboard is
served under, before any other layer sees it: a web page on another site can make a browser
send requests to a loopback port by rebinding its own domain name to 127.0.0.1 (DNS
rebinding), but the browser then sends that domain as ``Host``.

Two layers keep a read-only dashboard read-only, both through public interfaces:
``ReadOnlyApp`` answers every request that could change something (any method but GET,
HEAD and OPTIONS) with 403 and a JSON reason before optuna-dashboard sees it, and the
storage handed to optuna-dashboard is a ``search.public_storage.PublicStorage`` that refuses
writes and masks the storage URL in what it serves.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import wsgiref.simple_server
from collections.abc import Callable, Iterable
from typing import Any

import optuna

from search.public_storage import PublicStorage

LOOPBACK = ("127.0.0.1", "::1", "localhost")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
NO_AUTH_WARNING = ("warning: the dashboard has no authentication; anyone who can reach "
                   "{host}:{port} can read the study{edits}")


WILDCARDS = ("0.0.0.0", "::", "")


def _forbidden(start_response: Callable[..., Any], reason: str) -> list[bytes]:
    body = json.dumps({"reason": reason}).encode()
    start_response("403 Forbidden", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
    return [body]


def host_name(header: str) -> str:
    """The name part of a ``Host`` header, lower-case, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):                       # [::1]:8080
        return header[1:header.find("]")] if "]" in header else header
    if header.count(":") == 1:                       # name:port (a bare IPv6 literal has several)
        return header.split(":", 1)[0]
    return header


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_names(bound_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host names the dashboard answers to: loopback names, the bound host (this machine's
    name when bound to every interface) and ``extra`` (``--allowed-host``)."""
    names = {"localhost", "127.0.0.1", "::1", host_name(bound_host) if ":" not in bound_host
             else bound_host.strip("[]").lower()}
    if bound_host in WILDCARDS:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    names |= {host_name(h) for h in extra if h.strip()}
    return frozenset(names - {""})


class HostCheck:
    """WSGI middleware: a request whose ``Host`` is neither an allowed name nor an IP address
    gets 403 before the application runs.

    Only the name is compared, not the port: a rebinding page controls the port it asks for but
    not the name the browser sends, and an SSH tunnel (``ssh -L 9000:localhost:8080``) sends its
    own port. An IP literal is accepted because rebinding needs a domain name: a browser that
    sends an address reached the dashboard by that address, under that address's origin.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], names: Iterable[str]) -> None:
        self.app = app
        self.names = frozenset(names)

    def allows(self, header: str | None) -> bool:
        if not header:
            return False   # every browser sends Host; a request without one is not from a page
        name = host_name(header)
        return name in self.names or _is_ip(name)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_HOST")
        if self.allows(header):
            return self.app(environ, start_response)
        return _forbidden(start_response, f"Host {header!r} is not a name this dashboard is served under "
                                          "(a page on another site may be rebinding its name to this "
                                          "address): open it by its address, or restart it with "
                                          "`brmerge dashboard DIR --allowed-host NAME`")


class ReadOnlyApp:
    """WSGI middleware: requests other than GET/HEAD/OPTIONS get 403 with a JSON reason."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() in SAFE_METHODS:
            return self.app(environ, start_response)
        return _forbidden(start_response, "this dashboard is read-only: restart it with "
                                          "`brmerge dashboard DIR --allow-edits` to change studies")


def make_app(storage: optuna.storages.BaseStorage, *, host: str, allowed_hosts: Iterable[str] = (),
             allow_edits: bool = False) -> Callable[..., Iterable[bytes]]:
    """The dashboard's WSGI application on ``storage`` served on ``host`` (read-only unless
    ``allow_edits``; answering only requests for ``allowed_names(host, allowed_hosts)``)."""
    import optuna_dashboard  # seconds to import (scikit-learn)

    app = optuna_dashboard.wsgi(PublicStorage(storage, writable=allow_edits))
    return HostCheck(app if allow_edits else ReadOnlyApp(app), allowed_names(host, allowed_hosts))


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
