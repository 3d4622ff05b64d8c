"""``brmerge dashboard DIR [--host 127.0.0.1] [--port 8080]``: optuna-dashboard on the study."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "serve optuna-dashboard on a campaign's study (127.0.0.1 unless --host says otherwise)"

# Loopback by default: the dashboard can edit and delete studies and has no authentication.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080  # optuna-dashboard's own default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="campaign directory")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT})")


def url(host: str, port: int, path: str = "") -> str:
    shown = f"[{host}]" if ":" in host else host  # IPv6 literals need brackets in a URL
    return f"http://{shown}:{port}{path}"


def run(args: argparse.Namespace) -> int:
    from search.status import open_storage

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port: give one between 1 and 65535")
    campaign, storage, study_id = open_storage(args.dir)
    import optuna_dashboard  # seconds to import (scikit-learn): only once the study is known to exist

    print(f"optuna-dashboard: {url(args.host, args.port)}", flush=True)
    print(f"campaign {campaign.name}: {url(args.host, args.port, f'/dashboard/studies/{study_id}')}",
          flush=True)
    print("stop with Ctrl-C", flush=True)
    try:
        optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    except OSError as exc:
        raise OSError(f"cannot serve on {args.host}:{args.port} ({exc.strerror or exc}): "
                      "pass another --port, or stop what uses this one") from None
    except KeyboardInterrupt:
        print("dashboard stopped", file=sys.stderr)
    return 0
