"""`python -m workbench.serve [--config FILE|SOURCE] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--model-name NAME] [--compile]`"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

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
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind; the default keeps the server on this machine"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("WORKBENCH_API_KEY"),
        help="require `Authorization: Bearer KEY` (or set WORKBENCH_API_KEY)",
    )
    parser.add_argument("--model-name", default=None, help="the model id clients send and /v1/models lists")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body accepted (413 above)")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests decoded together in one batch")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode lone requests through the compiled step (the config's model.compile); on CPU the "
        "common length is compiled (once per model structure, then loaded from disk) before serving",
    )
    args = parser.parse_args(argv)

    session = workbench.load(args.config, **({"compile": True} if args.compile else {}))
    name = args.model_name or default_model_name(session)
    settings = ServerSettings(
        model_name=name,
        api_key=args.api_key,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_batch=args.max_batch,
    )
    app = create_app(session, settings, own_thread=False)
    for line in (
        f"Memory used: {session.memory().summary()} | device {session.loaded.device}",
        f"Serving model {name!r} at http://{args.host}:{args.port} (status page: /){' | API key required' if args.api_key else ''}",
        "OpenAI-compatible endpoint enabled: /v1/chat/completions",
    ):
        print(line, file=sys.stderr, flush=True)
    # HTTP on a thread, generation on this one: the thread that loaded the model runs its
    # kernels at full speed (GenerationQueue.run says why).
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    generation = app.state.generation

    def serve_http() -> None:
        try:
            server.run()
        finally:  # however uvicorn ends (shutdown, a port already in use), generation ends too
            generation.shutdown()

    def terminate(signum, frame):
        raise KeyboardInterrupt

    web = threading.Thread(target=serve_http, name="uvicorn", daemon=True)
    signal.signal(signal.SIGTERM, terminate)
    web.start()
    try:
        generation.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        web.join(timeout=30)
    if not server.started:
        sys.exit(1)  # uvicorn has logged why (e.g. the address is in use)


if __name__ == "__main__":
    main()
