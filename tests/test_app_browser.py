"""End to end in headless Chromium: type, attach images (upload, paste, drop), send, watch the reply stream while
another tab's reply streams in the same batch, Stop, Clear, the layout and the glyphs the page shows.

Needs Debian's ``chromium`` (``scripts/ci_browser_deps.sh`` installs it and the DejaVu fonts; Playwright's own
browser download is not used) and skips without it; the ``playwright`` package comes with the test extra. The README
screenshot is made by ``scripts/screenshot_app.py``.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no Chromium at {CHROMIUM} (bash scripts/ci_browser_deps.sh installs Debian's chromium)",
                allow_module_level=True)
from app_helpers import start_app  # noqa: E402
from mlx_llama4.app.chat import Settings  # noqa: E402
from mlx_llama4.app.device import EngineOptions, ModelHolder  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402  (the test extra installs playwright)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
MAX_TOKENS = 60


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 1000})
        yield context
        context.close()


@pytest.fixture(scope="module")
def served(app_model):
    holder, folder = app_model
    app, demo = start_app(holder, folder, defaults=Settings(max_tokens=MAX_TOKENS))
    yield app, demo.local_url
    demo.close()


@pytest.fixture
def url(served):
    return served[1]


@pytest.fixture(scope="module")
def one_row(app_model):
    """The app around an engine with one row in its batch: a second reply waits in the engine's queue."""
    holder, folder = app_model
    one_row = ModelHolder(loader=lambda source: (holder.current.model, holder.current.processor),
                          engine=EngineOptions(max_batch=1))
    one_row.load(str(folder))
    app, demo = start_app(one_row, folder, defaults=Settings(max_tokens=MAX_TOKENS))
    yield app, demo.local_url
    demo.close()
    one_row.close()


REPLY = "#chatbot .message:not(.thought) > [data-testid=bot]"  # assistant replies, not the app's notes


def _bot_text(page) -> str:
    replies = page.locator(REPLY)
    return replies.last.inner_text() if replies.count() else ""


def _reply_longer_than(page, n: int, timeout: float = 30_000) -> None:
    """Wait until the last reply's text is longer than ``n`` characters."""
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


def _open_tabs(browser, url: str, n: int) -> list:
    """``n`` new tabs of the app, each loaded and ready for a message."""
    pages = [browser.new_page() for _ in range(n)]
    for page in pages:
        page.goto(url)
        page.locator("#message textarea").wait_for(timeout=30_000)
    return pages


def _send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")


def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_chat_in_the_browser(browser, served, tmp_path, engine_spy):
    app, url = served
    engine = app.holder.current.engine
    engine_spy.delay = 0.1  # a reply of MAX_TOKENS takes 6 s: long enough to do things while it streams
    page, other = browser.new_page(), browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    for p in (page, other):
        p.goto(url)
        p.locator("#message textarea").wait_for(timeout=30_000)
    box = page.locator("#message textarea")

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

    # Another browser session sends meanwhile: its reply streams at the same time, in the same batch.
    other.locator("#message textarea").fill("Hello from another tab")
    other.locator("#message textarea").press("Enter")
    _until(lambda: engine.stats()["running"] == 2, timeout=20)  # both replies are rows of one batch now
    _reply_longer_than(other, len(_bot_text(other).strip()))  # the other tab's reply streams,
    _reply_longer_than(page, len(_bot_text(page).strip()))  # and the first tab's reply still grows

    # Stop: the button swaps back to Send and the request leaves the engine's batch early.
    page.locator("#message button[aria-label='Stop']").click()
    page.locator("#message button[aria-label='Submit']").wait_for(timeout=20_000)
    _, first = engine_spy.requests[0]
    _until(lambda: engine_spy.final(first) is not None)
    assert first.cancelled and engine_spy.final(first).finish_reason == "cancelled"
    assert engine_spy.final(first).completion_tokens < MAX_TOKENS
    engine_spy.delay = 0.02  # nothing more to do while a reply streams
    stopped = _bot_text(page)
    time.sleep(1.0)
    assert stopped.strip() and _bot_text(page) == stopped  # the partial reply stays; nothing more arrives
    page.locator("#chatbot").get_by_text("■ Stopped", exact=True).wait_for(timeout=10_000)  # marked as cut

    # The other tab's reply runs to its end; its chat holds only its own conversation.
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
    assert len(engine_spy.requests) == 3
    assert engine_spy.final(engine_spy.requests[2][1]).finish_reason in ("stop", "length")
    assert not errors, errors

    page.screenshot(path=str(tmp_path / "app.png"))  # kept with the test's files, for a look after a failure

    # Retry answers the last turn again; Undo puts it back into the textbox; Clear empties the chat.
    page.locator("#chatbot button[aria-label='Retry']").last.click()
    _until(lambda: len(engine_spy.requests) == 4 and engine_spy.final(engine_spy.requests[3][1]) is not None,
           timeout=60)
    page.locator("#message button[aria-label='Submit']").wait_for(timeout=20_000)
    assert page.locator("#chatbot .message.user").count() == 2
    page.locator("#chatbot button[aria-label='Undo']").last.click()
    page.wait_for_function("document.querySelector('#message textarea').value === 'And this one?'",
                           timeout=10_000)
    assert page.locator("#chatbot .message.user").count() == 1
    page.locator("#chatbot button[aria-label='Clear']").click()
    page.wait_for_function("document.querySelectorAll('#chatbot .message').length === 0", timeout=10_000)

    page.close()


def test_clear_during_a_reply_clears(browser, url, engine_spy):
    """Clear while a reply streams: the chat empties and stays empty, and the next message starts afresh."""
    engine_spy.delay = 0.15  # a reply of MAX_TOKENS takes 9 s: on a loaded machine the click still lands in it
    page = browser.new_page()
    page.goto(url)
    box = page.locator("#message textarea")
    box.wait_for(timeout=30_000)
    for attempt in range(3):  # the reply's last updates race the click: try at a few moments
        box.fill(f"Tell me a story ({attempt})")
        box.press("Enter")
        _reply_longer_than(page, 20 + 40 * attempt)
        page.locator("#chatbot button[aria-label='Clear']").click()
        page.locator("#message button[aria-label='Submit']").wait_for(timeout=20_000)
        time.sleep(0.5)
        assert page.locator("#chatbot .message").count() == 0, page.locator("#chatbot").inner_text()
    assert all(handle.cancelled for _, handle in engine_spy.requests)
    box.fill("Hello")
    box.press("Enter")
    _reply_longer_than(page, 0)
    assert engine_spy.requests[-1][0] == [{"role": "user", "content": "Hello"}]
    page.locator("#message button[aria-label='Stop']").click()
    page.close()


def test_stop_while_waiting_leaves_a_note_and_retry(browser, one_row, engine_spy):
    """With the engine's one row taken, a second tab's reply waits in the engine's queue ("Reading the
    prompt…"); Stop then leaves a note, and Retry answers the message once there is room."""
    app, url = one_row
    engine = app.holder.current.engine
    engine_spy.delay = 0.1
    page, other = _open_tabs(browser, url, 2)
    _send(page, "A long one")
    _reply_longer_than(page, 0)
    _send(other, "Waiting")
    other.locator("#chatbot").get_by_text("Reading the prompt…").wait_for(timeout=20_000)
    _until(lambda: engine.stats()["queued"] == 1)  # in the engine, waiting for the row
    other.locator("#message button[aria-label='Stop']").click()
    other.locator("#chatbot").get_by_text("■ Stopped before the reply began").wait_for(timeout=20_000)
    _until(lambda: engine_spy.final(engine_spy.requests[1][1]) is not None)
    assert engine_spy.final(engine_spy.requests[1][1]).finish_reason == "cancelled"
    assert engine.stats()["queued"] == 0 and engine_spy.final(engine_spy.requests[1][1]).completion_tokens == 0
    page.locator("#message button[aria-label='Stop']").click()
    page.locator("#message button[aria-label='Submit']").wait_for(timeout=20_000)
    other.locator("#chatbot button[aria-label='Retry']").last.click()  # Retry answers the stopped message
    _reply_longer_than(other, 0)
    assert engine_spy.requests[-1][0] == [{"role": "user", "content": "Waiting"}]
    other.locator("#message button[aria-label='Stop']").click()
    other.locator("#message button[aria-label='Submit']").wait_for(timeout=20_000)
    page.close()
    other.close()


def test_closing_a_tab_cancels_its_reply(browser, one_row, engine_spy):
    """A closed tab's reply leaves the engine: a waiting one before it ever gets a row, a running one at once."""
    app, url = one_row
    engine = app.holder.current.engine
    engine_spy.delay = 0.2  # the running reply takes 12 s
    page, other = _open_tabs(browser, url, 2)
    _send(page, "A long one")
    _reply_longer_than(page, len(_bot_text(page).strip()))
    _send(other, "Waiting")
    _until(lambda: engine.stats()["queued"] == 1 and len(engine_spy.requests) == 2)  # the spy notes it after submit
    (_, running), (_, waiting) = engine_spy.requests
    other.close()
    _until(lambda: engine_spy.final(waiting) is not None)
    assert waiting.cancelled and engine_spy.final(waiting).completion_tokens == 0
    assert engine_spy.final(running) is None  # the other reply still has the row
    page.close()
    _until(lambda: engine_spy.final(running) is not None)
    assert running.cancelled and engine_spy.final(running).completion_tokens < MAX_TOKENS
    assert engine.stats()["running"] == 0


def test_corner_buttons_do_not_cover_the_chat(browser, url, engine_spy):
    """The chat's label and corner buttons sit above the scrolling conversation, even when it is scrolled."""
    page = browser.new_page()
    page.set_viewport_size({"width": 1280, "height": 700})
    page.goto(url)
    box = page.locator("#message textarea")
    box.wait_for(timeout=30_000)
    box.fill("A long reply, please")
    box.press("Enter")
    page.locator("#chatbot").get_by_text("peak memory").wait_for(timeout=60_000)
    page.evaluate("document.querySelector('#chatbot .bubble-wrap').scrollTop = 150")
    boxes = page.evaluate("""() => {
        const rect = sel => document.querySelector(sel).getBoundingClientRect().toJSON();
        return {buttons: rect('#chatbot .top-panel'), label: rect('#chatbot label'),
                chat: rect('#chatbot .bubble-wrap')}; }""")
    assert boxes["chat"]["top"] >= max(boxes["buttons"]["bottom"], boxes["label"]["bottom"]), boxes
    page.close()


def test_every_symbol_the_app_shows_has_a_font():
    """Each non-ASCII character in the app's sources (note titles, buttons, the stats line) is in an installed
    font; a character no font has shows as an empty box (CI installs only Debian's fonts-dejavu-core)."""
    if shutil.which("fc-list") is None:
        pytest.skip("no fc-list (fontconfig) to ask which fonts are installed")
    sources = Path(__file__).resolve().parents[1] / "app"
    symbols = sorted({c for f in sources.glob("*.py") for c in f.read_text(encoding="utf-8") if ord(c) > 127})
    missing = [c for c in symbols if not subprocess.run(
        ["fc-list", f":charset={ord(c):x}", "family"], capture_output=True, text=True).stdout.strip()]
    assert not missing, [f"{c} U+{ord(c):04X}" for c in missing]


def test_a_model_switch_elsewhere_shows_on_every_page(browser, served):
    app, url = served
    page = browser.new_page()
    page.goto(url)
    status, picker = page.locator("#model-status"), page.locator("#model-picker input")
    status.get_by_text("Loaded:").wait_for(timeout=30_000)
    loaded = picker.input_value()
    app.holder.loading = "another/model"  # what the page shows while another session's switch loads
    try:
        status.get_by_text("another/model").wait_for(timeout=10_000)
        assert picker.input_value() == "another/model"
    finally:
        app.holder.loading = None
    status.get_by_text("Loaded:").wait_for(timeout=10_000)
    page.wait_for_function("v => document.querySelector('#model-picker input').value === v", arg=loaded,
                           timeout=10_000)
    page.close()


def test_a_failed_switch_in_the_picker_keeps_the_model(browser, served, app_model):
    """Picking a model that cannot load tries it once, warns, and leaves the picker on the loaded model."""
    app, url = served
    _, folder = app_model
    broken = folder.parent / "broken-llama4"  # listed as a Llama 4 folder, but its weights are not readable
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text((folder / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    tries = []
    load = app.holder.load
    app.holder.load = lambda name, progress=None: tries.append(name) or load(name, progress)
    page = browser.new_page()
    try:
        page.goto(url)
        picker = page.locator("#model-picker input")
        page.locator("#model-status").get_by_text("Loaded:").wait_for(timeout=30_000)
        loaded = picker.input_value()
        picker.click()
        page.get_by_role("option", name="broken-llama4").click()
        page.get_by_text("Could not load").first.wait_for(timeout=30_000)
        time.sleep(1.0)
        assert tries == [str(broken)] and page.get_by_text("Could not load").count() == 1
        assert picker.input_value() == loaded and app.holder.current.name == str(folder)
        assert page.locator("#model-status").inner_text().startswith("Loaded:")
    finally:
        del app.holder.load
        page.close()
