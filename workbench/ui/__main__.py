"""`python -m workbench.ui [--config FILE|SOURCE] [--host H] [--port P] [--share]`

`--host` and `--port` default to Gradio's own environment variables, GRADIO_SERVER_NAME and
GRADIO_SERVER_PORT (a Hugging Face Space sets GRADIO_SERVER_NAME=0.0.0.0, and a page bound to
127.0.0.1 inside its container never answers), then to 127.0.0.1:7860; flags win over both.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

import workbench
from workbench.ui.app import build_app
from workbench.ui.model_thread import ModelThread

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m workbench.ui", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    host = env.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    port_text = env.get("GRADIO_SERVER_PORT") or str(DEFAULT_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        parser.error(f"GRADIO_SERVER_PORT is {port_text!r}; it must be a port number from 1 to 65535")
    parser.add_argument("--config", default=None, help="config file or model source (default: the embedded model)")
    parser.add_argument(
        "--host",
        default=host,
        help=f"address to bind (default {host}: $GRADIO_SERVER_NAME, else {DEFAULT_HOST}, which keeps it on this machine)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(port_text),
        help=f"port (default {port_text}: $GRADIO_SERVER_PORT, else {DEFAULT_PORT})",
    )
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    session = workbench.load(args.config)
    label = Path(args.config).name if args.config else None
    # The page's model work runs here, on the thread that loaded the model (model_thread.py);
    # Gradio serves from its own threads.
    runner = ModelThread(own_thread=False)
    app = build_app(session, label=label, runner=runner).queue()
    app.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True)
    try:
        runner.run()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()


if __name__ == "__main__":
    main()
