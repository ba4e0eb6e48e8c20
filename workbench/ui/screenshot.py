"""`python -m workbench.ui.screenshot --out docs/ui.png`: the README's picture of the page.

Launches the real app, sends a real message from headless Chromium, waits for the
streamed answer to finish, and saves the window as a PNG (palette-reduced, so the file
stays small enough to commit).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import workbench
from workbench.ui import browser
from workbench.ui.app import build_app


def shrink(path: Path) -> None:
    """256-colour PNG: a UI has few colours, and this cuts the file several times."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.ui.screenshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/ui.png"))
    parser.add_argument("--config", default=None, help="config file or model source (default: the embedded model)")
    parser.add_argument("--message", default="Give me three short tips for saving phone battery.")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="typed into the page; 0 makes the picture reproducible"
    )
    parser.add_argument("--max-tokens", type=int, default=120, help="typed into the page")
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--height", type=int, default=1300, help="tall enough for the whole model panel")
    args = parser.parse_args(argv)

    session = workbench.load(args.config, quiet=True)
    app = build_app(session, label=Path(args.config).name if args.config else None)
    url = browser.launch(app)
    driver = browser.chrome(args.width, args.height)
    try:
        browser.open_page(driver, url)
        browser.set_number(driver, "temperature", args.temperature)
        browser.set_number(driver, "max_tokens", args.max_tokens)
        answers = browser.send_and_wait(driver, args.message)
        browser.screenshot(driver, args.out)
        stats = browser.stats_text(driver)
    finally:
        driver.quit()
        app.close()
    shrink(args.out)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KiB | answer streamed in {len(answers)} updates | {stats}")


if __name__ == "__main__":
    main()
