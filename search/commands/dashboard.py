"""``brmerge dashboard DIR [--host 127.0.0.1] [--port 8080] [--allowed-host NAME] [--allow-edits]``:
optuna-dashboard on the study, read-only unless --allow-edits, answering only requests whose
``Host`` is a name it is served under (see ``search.dashboard.HostCheck``)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HELP = "serve optuna-dashboard on a campaign's study (read-only, 127.0.0.1 unless told otherwise)"

# Loopback by default: the dashboard has no authentication.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080  # optuna-dashboard's own default
# what a Host header holds: a name or IPv4 address, or a bracketed IPv6 one, and maybe a port
HOST_NAME = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="campaign directory")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another host name the dashboard may be reached by (a reverse proxy, a DNS name "
                        "of this machine); repeatable. Loopback names, IP addresses and the --host name "
                        "are always allowed; requests for any other name get 403 (DNS rebinding)")
    p.add_argument("--allow-edits", action="store_true",
                   help="let the dashboard change the study (notes, tell, rename, delete); read-only by default")


def url(host: str, port: int, path: str = "") -> str:
    shown = f"[{host}]" if ":" in host else host  # IPv6 literals need brackets in a URL
    return f"http://{shown}:{port}{path}"


def run(args: argparse.Namespace) -> int:
    from search.dashboard import exposure_warning, make_app, make_server
    from search.errors import SearchError
    from search.storage import open_campaign_storage

    allow_edits = bool(getattr(args, "allow_edits", False))
    if not 0 < args.port < 65536:
        raise SearchError(f"--port {args.port} is not a TCP port: give one between 1 and 65535")
    allowed = getattr(args, "allowed_host", None) or []
    for name in allowed:
        if not HOST_NAME.fullmatch(name):
            raise SearchError(f"--allowed-host {name!r} is not a host name: give a name or address as a browser "
                              "sends it in Host (e.g. dash.example.org or dash.example.org:443), no scheme or path")
    campaign, storage, study_id = open_campaign_storage(args.dir)
    app = make_app(storage, host=args.host, allowed_hosts=allowed, allow_edits=allow_edits)
    server = make_server(app, args.host, args.port)
    print(f"optuna-dashboard: {url(args.host, args.port)}", flush=True)
    print(f"campaign {campaign.name}: {url(args.host, args.port, f'/dashboard/studies/{study_id}')}"
          + ("" if allow_edits else " (read-only; --allow-edits to change it)"), flush=True)
    warning = exposure_warning(args.host, args.port, allow_edits=allow_edits)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print("stop with Ctrl-C", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("dashboard stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
