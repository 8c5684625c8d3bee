"""End to end in headless Chromium: type, attach images (upload, paste, drop), send, watch the reply stream, Stop.

Needs Debian's ``chromium`` and the ``playwright`` Python package (``scripts/ci_browser_deps.sh`` installs
both; Playwright's own browser download is not used) and skips without them. The README screenshot is
refreshed on demand: ``MLX_LLAMA4_SCREENSHOT=docs/app.png pytest tests/test_app_browser.py -k readme``
(with the demo model, or the model named by ``MLX_LLAMA4_APP_MODEL``).
"""

from __future__ import annotations

import base64
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no Chromium at {CHROMIUM} (bash scripts/ci_browser_deps.sh installs Debian's chromium)",
                allow_module_level=True)
pytest.importorskip("playwright.sync_api",
                    reason="the playwright package is not installed (bash scripts/ci_browser_deps.sh installs it)")

from mlx_llama4.app.chat import Settings  # noqa: E402
from mlx_llama4.app.device import DeviceWorker, ModelHolder  # noqa: E402
from test_app import app_model, slow_generation, start_app  # noqa: E402,F401  (fixtures)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
MAX_TOKENS = 60


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 1000})
        yield context
        context.close()


@pytest.fixture(scope="module")
def url(app_model):  # noqa: F811
    holder, folder = app_model
    _, demo = start_app(holder, folder, defaults=Settings(max_tokens=MAX_TOKENS))
    yield demo.local_url
    demo.close()


REPLY = "#chatbot .message:not(.thought) > [data-testid=bot]"  # assistant replies, not the app's notes


def _bot_text(page) -> str:
    replies = page.locator(REPLY)
    return replies.last.inner_text() if replies.count() else ""


def _reply_longer_than(page, n: int, timeout: float = 30_000) -> None:
    page.wait_for_function(
        "([sel, n]) => { const r = document.querySelectorAll(sel);"
        " return r.length > 0 && r[r.length - 1].innerText.trim().length > n; }",
        arg=[REPLY, n], timeout=timeout)


def _attach_by_event(page, kind: str, path: Path) -> None:
    """Paste or drop ``path`` onto the textbox the way a browser does (a synthetic event with the file)."""
    data = base64.b64encode(path.read_bytes()).decode()
    page.evaluate(
        """([kind, name, data]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            const box = document.querySelector("#message textarea");
            const event = kind === "paste"
                ? new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true})
                : new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true});
            box.dispatchEvent(event);
        }""",
        [kind, path.name, data])


def drawing(path: Path, w: int, h: int, seed: int) -> Path:
    """A simple picture (shapes on a plain background) that reads well in a screenshot."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(150, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = int(rng.integers(0, w * 2 // 3)), int(rng.integers(0, h * 2 // 3))
        size = int(rng.integers(min(w, h) // 5, min(w, h) // 2))
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + size, y + size], fill=colour)
    image.save(path)
    return path


def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_chat_in_the_browser(browser, url, tmp_path, slow_generation):  # noqa: F811
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    box = page.locator("#message textarea")
    box.wait_for(timeout=30_000)

    # Type, attach one image with the upload button and one by pasting, send.
    box.fill("What is in these pictures?")
    page.set_input_files("#message input[type=file]", str(drawing(tmp_path / "upload.png", 300, 200, seed=5)))
    _attach_by_event(page, "paste", drawing(tmp_path / "pasted.png", 160, 160, seed=6))
    page.wait_for_function("document.querySelectorAll('#message img').length >= 2", timeout=20_000)
    box.press("Enter")

    # The user's message shows both thumbnails; the reply streams in.
    page.wait_for_function("document.querySelectorAll('#chatbot .message.user img').length >= 2",
                           timeout=20_000)
    _reply_longer_than(page, 0)
    _reply_longer_than(page, len(_bot_text(page).strip()))  # ...and keeps growing

    # Another browser session sends meanwhile: it waits in the queue, with its position shown.
    other = browser.new_page()
    other.goto(url)
    other.locator("#message textarea").fill("Hello from another tab")
    other.locator("#message textarea").press("Enter")
    other.get_by_text(re.compile(r"queue: 1/\d+")).wait_for(timeout=20_000)

    # Stop: the button swaps back to Send and the generator on the device is closed early.
    page.locator("#message button[aria-label='Stop']").click()
    page.locator("#message button[aria-label='Submit']").wait_for(timeout=20_000)
    first = slow_generation[0]
    _until(lambda: first["closed"])
    assert not first["finished"] and first["tokens"] < MAX_TOKENS
    stopped = _bot_text(page)
    time.sleep(1.0)
    assert stopped.strip() and _bot_text(page) == stopped  # the partial reply stays; nothing more arrives

    # The other tab's turn comes; its chat holds only its own conversation.
    other.locator("#chatbot").get_by_text("peak memory").wait_for(timeout=60_000)
    assert "pictures" not in other.locator("#chatbot").inner_text()
    other.close()

    # A follow-up with an image dropped onto the textbox runs to the end, with its stats line.
    box.fill("And this one?")
    _attach_by_event(page, "drop", drawing(tmp_path / "dropped.png", 120, 90, seed=7))
    page.wait_for_function("document.querySelectorAll('#message img').length >= 1", timeout=20_000)
    box.press("Enter")
    page.wait_for_function("document.querySelectorAll('#chatbot .message.user img').length >= 3",
                           timeout=20_000)
    page.locator("#chatbot").get_by_text("peak memory").wait_for(timeout=60_000)
    assert len(slow_generation) == 3 and slow_generation[2]["finished"]
    assert not errors, errors

    page.screenshot(path=str(tmp_path / "app.png"))  # kept with the test's files, for a look after a failure

    # Retry answers the last turn again; Undo puts it back into the textbox; Clear empties the chat.
    page.locator("#chatbot button[aria-label='Retry']").last.click()
    _until(lambda: len(slow_generation) == 4 and slow_generation[3]["finished"], timeout=60)
    page.locator("#message button[aria-label='Submit']").wait_for(timeout=20_000)
    assert page.locator("#chatbot .message.user").count() == 2
    page.locator("#chatbot button[aria-label='Undo']").last.click()
    page.wait_for_function("document.querySelector('#message textarea').value === 'And this one?'",
                           timeout=10_000)
    assert page.locator("#chatbot .message.user").count() == 1
    page.locator("#chatbot button[aria-label='Clear']").click()
    page.wait_for_function("document.querySelectorAll('#chatbot .message').length === 0", timeout=10_000)

    page.close()


def _scene(path: Path, seed: int, count: int = 2) -> Path:
    """A picture like those the demo model was trained on (training/shapes.py), else a drawing."""
    try:
        import random
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
        import shapes

        shapes.random_scene(random.Random(seed), count=count).image.save(path)
        return path
    except (ImportError, AttributeError, TypeError):
        return drawing(path, 240, 120, seed)


@pytest.mark.skipif(not os.environ.get("MLX_LLAMA4_SCREENSHOT"), reason="set MLX_LLAMA4_SCREENSHOT=docs/app.png "
                    "(and MLX_LLAMA4_APP_MODEL, default demo) to refresh the README screenshot")
def test_readme_screenshot(browser, app_model, tmp_path):  # noqa: F811
    """A greeting, then a question about a picture of shapes, with the demo model."""
    name = os.environ.get("MLX_LLAMA4_APP_MODEL", "demo")
    holder = ModelHolder(DeviceWorker())
    holder.load(name)
    _, demo = start_app(holder, app_model[1], defaults=Settings(temperature=0.0, max_tokens=64))
    try:
        page = browser.new_page()
        page.set_viewport_size({"width": 1280, "height": 820})
        page.goto(demo.local_url)
        box = page.locator("#message textarea")
        box.wait_for(timeout=30_000)
        turns = [("Hello!", []), ("How many shapes are there?", [_scene(tmp_path / "shapes.png", 7)])]
        for turn, (question, files) in enumerate(turns):
            box.fill(question)
            if files:
                page.set_input_files("#message input[type=file]", [str(f) for f in files])
                page.wait_for_function(f"document.querySelectorAll('#message img').length >= {len(files)}",
                                       timeout=20_000)
            box.press("Enter")
            page.locator("#chatbot").get_by_text("peak memory").nth(turn).wait_for(timeout=120_000)
            page.locator("#message button[aria-label='Submit']").wait_for(timeout=20_000)
        target = Path(os.environ["MLX_LLAMA4_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target))
        page.close()
    finally:
        demo.close()
