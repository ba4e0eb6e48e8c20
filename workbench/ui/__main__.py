"""`python -m workbench.ui [--config FILE|SOURCE] [--host H] [--port P] [--share]`"""

from __future__ import annotations

import argparse
from pathlib import Path

import workbench
from workbench.ui.app import build_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.ui", description=__doc__)
    parser.add_argument("--config", default=None, help="config file or model source (default: the embedded model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1 keeps it on this machine)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    args = parser.parse_args(argv)
    session = workbench.load(args.config)
    label = Path(args.config).name if args.config else None
    build_app(session, label=label).queue().launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
