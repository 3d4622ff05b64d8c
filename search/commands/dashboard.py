"""``brmerge dashboard DIR [--host 127.0.0.1] [--port 8080] [--allow-edits]``: optuna-dashboard
on the study, read-only unless --allow-edits."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "serve optuna-dashboard on a campaign's study (read-only, 127.0.0.1 unless told otherwise)"

# Loopback by default: the dashboard has no authentication.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080  # optuna-dashboard's own default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="campaign directory")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT})")
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
    campaign, storage, study_id = open_campaign_storage(args.dir)
    app = make_app(storage, allow_edits=allow_edits)
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
