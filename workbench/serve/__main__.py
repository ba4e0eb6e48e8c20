"""`python -m workbench.serve [--config FILE|SOURCE] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--model-name NAME]`"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import psutil
import uvicorn

import workbench
from workbench.serve.app import ServerSettings, create_app
from workbench.session import Session


def default_model_name(session: Session) -> str:
    source = session.loaded.source
    if session.loaded.kind in ("embedded", "tiny"):
        return source.split(":", 1)[1] if session.loaded.kind == "embedded" else source.replace(":", "-")
    if session.loaded.kind == "local":
        return Path(source).expanduser().resolve().name
    return source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.serve", description=__doc__)
    parser.add_argument("--config", default=None, help="config file or model source (default: the embedded model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; the default keeps the server on this machine")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("WORKBENCH_API_KEY"), help="require `Authorization: Bearer KEY` (or set WORKBENCH_API_KEY)")
    parser.add_argument("--model-name", default=None, help="the model id clients send and /v1/models lists")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body accepted (413 above)")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests decoded together in one batch")
    args = parser.parse_args(argv)

    session = workbench.load(args.config)
    name = args.model_name or default_model_name(session)
    settings = ServerSettings(model_name=name, api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_batch=args.max_batch)
    app = create_app(session, settings)
    rss = psutil.Process().memory_info().rss
    for line in (
        f"Memory used: {rss / 1e9:.2f} GB (process resident) | weights {session.loaded.weight_bytes / 1e9:.2f} GB | device {session.loaded.device}",
        f"Serving model {name!r} at http://{args.host}:{args.port} (status page: /){' | API key required' if args.api_key else ''}",
        "OpenAI-compatible endpoint enabled: /v1/chat/completions",
    ):
        print(line, file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
