"""Make the README's screenshot of the chat app (docs/app.png): a greeting, then a question about a picture.

    python scripts/screenshot_app.py [--model demo] [--out docs/app.png]

Runs the app in this process on 127.0.0.1 with greedy decoding and drives it with headless Chromium
(Debian's ``/usr/bin/chromium``, or ``--chromium``; ``bash scripts/ci_browser_deps.sh`` installs it and the
``playwright`` package). The picture is one of the demo model's training scenes (``training/shapes.py``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="model to chat with (default: the bundled demo model)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "app.png", help="where to save the screenshot")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium to drive")
    args = p.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    from mlx_llama4.app.chat import Settings
    from mlx_llama4.app.device import ModelHolder
    from mlx_llama4.app.handlers import AppConfig, ChatApp
    from mlx_llama4.app.ui import build, launch

    sys.path.insert(0, str(ROOT / "training"))
    import shapes

    holder = ModelHolder()
    holder.load(args.model)
    app = ChatApp(holder, AppConfig(models_dirs=[], include_hf_cache=False,
                                    defaults=Settings(temperature=0.0, max_tokens=64)))
    demo = launch(build(app), host="127.0.0.1", port=None, block=False)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        picture = Path(tmp) / "shapes.png"
        shapes.random_scene(random.Random(7), count=2).image.save(picture)
        browser = playwright.chromium.launch_persistent_context(
            str(Path(tmp) / "profile"), executable_path=args.chromium, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900})
        page = browser.new_page()
        page.goto(demo.local_url)
        box = page.locator("#message textarea")
        box.wait_for(timeout=30_000)
        for turn, (question, files) in enumerate([("Hello!", []), ("How many shapes are there?", [picture])]):
            box.fill(question)
            if files:
                page.set_input_files("#message input[type=file]", [str(f) for f in files])
                page.wait_for_function(f"document.querySelectorAll('#message img').length >= {len(files)}",
                                       timeout=20_000)
            box.press("Enter")
            page.locator("#chatbot").get_by_text("peak memory").nth(turn).wait_for(timeout=120_000)
            page.locator("#message button[aria-label='Submit']").wait_for(timeout=20_000)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        browser.close()
    demo.close()
    holder.close()
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
