"""The Gradio chat app: history normalisation, model discovery, and the running app through gradio_client.

The app is launched in-process on 127.0.0.1 around a tiny random checkpoint with the real tokenizer; replies
are compared with ``stream_generate`` called directly (greedy), so the images and the history really reach
the model, and a follow-up is checked to feed only its new tokens (the images are not read again).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from mlx_llama4 import PromptCache, stream_generate  # noqa: E402
from mlx_llama4.app import chat  # noqa: E402
from mlx_llama4.app.device import DeviceWorker, ModelHolder  # noqa: E402
from mlx_llama4.app.history import (ends_with_user_turn, last_user_span, normalize_history,  # noqa: E402
                                    to_model_messages)
from mlx_llama4.app.models import DEMO, discover_models, is_llama4_folder  # noqa: E402
from mlx_llama4.app.handlers import AppConfig, ChatApp, note  # noqa: E402
from mlx_llama4.app.ui import build, launch  # noqa: E402
from real_vocab import build_checkpoint  # noqa: E402

GREEDY = dict(system="", temperature=0.0, top_p=1.0)


# ---- fixtures shared with test_app_browser.py -------------------------------------------------------------


@pytest.fixture(scope="session")
def app_model(tmp_path_factory):
    """A loaded tiny checkpoint in a ModelHolder (one device thread for the whole test session)."""
    folder = tmp_path_factory.mktemp("app-models") / "tiny-llama4"
    folder.mkdir()
    build_checkpoint(folder)
    holder = ModelHolder(DeviceWorker())
    holder.load(str(folder))
    return holder, folder


def start_app(holder: ModelHolder, folder: Path, **config) -> tuple[ChatApp, object]:
    """Launch the app in-process on 127.0.0.1 (a free port); returns the ChatApp and the Blocks."""
    app = ChatApp(holder, AppConfig(models_dirs=[folder.parent], include_hf_cache=False, **config))
    demo = launch(build(app), host="127.0.0.1", port=None, block=False)
    return app, demo


@pytest.fixture(scope="module")
def server(app_model):
    holder, folder = app_model
    app, demo = start_app(holder, folder, max_image_pixels=200_000)
    yield app, demo.local_url
    demo.close()


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server[1], verbose=False)


def picture(path: Path, w=110, h=50, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def expected_reply(holder, messages, max_tokens):
    """Greedy reply computed directly (on the device thread), and the prompt's token count."""
    loaded = holder.current

    def run():
        chunks = list(stream_generate(loaded.model, loaded.processor, messages, max_tokens=max_tokens,
                                      temperature=0.0, top_p=1.0))
        return "".join(c.text for c in chunks), chunks[-1].prompt_tokens

    return holder.worker.call(run)


def send(client, text, files=(), max_tokens=10):
    from gradio_client import handle_file

    job = client.submit(message={"text": text, "files": [handle_file(str(f)) for f in files]},
                        max_tokens=max_tokens, api_name="/chat", **GREEDY)
    reply, stats = job.result(timeout=120)
    return reply, stats, job.outputs()


# ---- history, discovery, stats ------------------------------------------------------------------------------


def test_history_shapes_normalise_alike(tmp_path):
    img = str(tmp_path / "a.png")
    browser = [  # what the Chatbot sends back from the browser
        {"role": "user", "metadata": None, "options": None, "content": [
            {"type": "file", "file": {"path": img, "url": "http://x/a.png", "meta": {"_type": "gradio.FileData"}},
             "alt_text": None},
            {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "metadata": None, "options": None, "content": [{"type": "text", "text": "A cat."}]},
        {"role": "assistant", "metadata": {"title": "⏱ stats"}, "options": None, "content": []},
        {"role": "user", "metadata": None, "options": None, "content": [{"type": "text", "text": "Sure?"}]},
    ]
    loose = [  # what handlers and gradio_client callers build
        {"role": "user", "content": {"path": img}},
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A cat."},
        note("⏱ stats"),
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": ["Sure?"]},
    ]
    hf = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]},
          {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"}]
    import gradio as gr

    objects = [gr.ChatMessage(role="user", content=[{"path": img}, "What is it?"]),
               gr.ChatMessage(role="assistant", content="A cat."),
               gr.ChatMessage(role="user", content="Sure?")]
    legacy = [[(img,), None], ["What is it?", "A cat."], ["Sure?", None]]
    for history in (browser, loose, hf, objects, legacy):
        turns = normalize_history(history)
        assert [(t.role, t.text, t.images) for t in turns] == [
            ("user", "What is it?", [img]), ("assistant", "A cat.", []), ("user", "Sure?", [])], history
        assert history is legacy or ends_with_user_turn(history)
    messages = to_model_messages(normalize_history(browser), system="Be brief.")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]
    assert not ends_with_user_turn(browser[:3]) and last_user_span(loose) == (5, 6)
    assert last_user_span(loose[:2]) == (0, 2) and last_user_span([]) is None


def test_discover_models(tmp_path):
    good = tmp_path / "models" / "scout-4bit"
    good.mkdir(parents=True)
    (good / "config.json").write_text(json.dumps({"model_type": "llama4"}))
    (good / "model.safetensors").write_bytes(b"")
    other = tmp_path / "models" / "llama3"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (other / "model.safetensors").write_bytes(b"")
    assert is_llama4_folder(good) and not is_llama4_folder(other) and not is_llama4_folder(tmp_path)
    choices = discover_models([tmp_path], current="some/repo", include_hf_cache=False)
    values = [v for _, v in choices]
    assert values[0] == DEMO and "some/repo" in values and str(good.resolve()) in values
    assert str(other.resolve()) not in values


def test_image_checks(tmp_path):
    uploads = [tmp_path]
    good = picture(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    big = picture(tmp_path / "big.png", 400, 300)
    assert chat.check_image(str(good), uploads) is None
    assert "not a recognised image" in chat.check_image(str(tmp_path / "bad.png"), uploads)
    assert "above the limit" in chat.check_image(str(big), uploads, max_pixels=100_000)
    assert "only images uploaded" in chat.check_image("/etc/hostname", uploads)
    assert "gone" in chat.check_image(str(tmp_path / "missing.png"), uploads)
    line = chat.format_stats(dict(prompt_tokens=30, prompt_tps=100.0, generation_tokens=5, generation_tps=20.0,
                                  time_to_first_token=0.25, peak_memory=1.5, finish_reason="length"))
    assert "first token 0.25 s" in line and "100.0 tok/s" in line and "1.50 GB" in line and "token limit" in line


# ---- the browser's handlers, called directly --------------------------------------------------------------


def test_ui_handlers_send_retry_undo(app_model, tmp_path, monkeypatch):
    holder, folder = app_model
    monkeypatch.setattr(chat, "upload_dirs", lambda: [tmp_path])
    from mlx_llama4.app import handlers

    monkeypatch.setattr(handlers, "upload_dirs", lambda: [tmp_path])
    app = ChatApp(holder, AppConfig(models_dirs=[folder.parent], include_hf_cache=False))
    session = chat.ChatSession()
    img = str(picture(tmp_path / "cat.png"))
    box, history = app.add_message({"text": "What is it?", "files": [img]}, [])
    assert history == [{"role": "user", "content": [{"path": img}, "What is it?"]}]
    frames = list(app.respond(history, session, "", 0.0, 1.0, 8))
    assert len(frames) > 2 and frames[0][-1]["metadata"]["status"] == "pending"  # "Reading the prompt…"
    final = frames[-1]
    reply, stats = final[-2], final[-1]
    want, _ = expected_reply(holder, to_model_messages(normalize_history(history)), 8)
    assert reply == {"role": "assistant", "content": want} and stats["metadata"]["title"].startswith("first token")

    _, retried = app.prepare_retry(final)
    assert retried == history
    box, undone = app.undo(final)
    assert undone == [] and box.value["text"] == "What is it?" and box.value["files"][0]["orig_name"] == "cat.png"

    (tmp_path / "bad.png").write_bytes(b"GIF89a broken")
    box, rejected = app.add_message({"text": "And this?", "files": [str(tmp_path / "bad.png")]}, final)
    assert rejected[-1]["metadata"]["title"] == "⚠️ Image not accepted" and "bad.png" in rejected[-1]["content"]
    assert list(app.respond(rejected, session, "", 0.0, 1.0, 8)) == [rejected]  # nothing to answer

    # An error from the processor (here: a conversation longer than the context) replaces the turn by a note.
    context = holder.current.model.config.text.max_position_embeddings
    try:
        holder.current.model.config.text.max_position_embeddings = 40
        long = final + [{"role": "user", "content": "more " * 40}]
        out = list(app.respond(long, session, "", 0.0, 1.0, 8))[-1]
    finally:
        holder.current.model.config.text.max_position_embeddings = context
    assert out[:-1] == final and out[-1]["metadata"]["title"] == "⚠️ Not sent"
    assert "context" in out[-1]["content"] and "more more" in out[-1]["content"]
    _, cleaned = app.finish(history + [note("Reading the prompt…", status="pending")])
    assert cleaned[-1]["metadata"] == {"title": "⏹ Stopped before the reply began", "status": "done"}


# ---- the running app through gradio_client ------------------------------------------------------------------


def test_streamed_text_reply(server, client, slow_generation):
    app, _ = server
    reply, stats, outputs = send(client, "Hello there!", max_tokens=12)
    want, prompt_tokens = expected_reply(app.holder, [{"role": "user", "content": "Hello there!"}], 12)
    partial = [text for text, _ in outputs if text]
    assert reply == want and len(set(partial)) >= 6  # streamed token by token, not one block
    assert all(want.startswith(text) for text in partial)
    assert stats["prompt_tokens"] == prompt_tokens and stats["generation_tokens"] == 12
    assert stats["time_to_first_token"] > 0 and stats["peak_memory"] > 0 and stats["generation_tps"] > 0


def test_image_then_follow_up_reuses_cache(server, client, tmp_path):
    app, _ = server
    img = picture(tmp_path / "red.png", 110, 50, seed=1)
    reply, stats, _ = send(client, "What is in this picture?", [img])
    turn1 = [{"role": "user", "content": [{"type": "image", "image": str(img)},
                                          {"type": "text", "text": "What is in this picture?"}]}]
    want, full = expected_reply(app.holder, turn1, 10)
    assert reply == want and stats["prompt_tokens"] == full

    follow, stats2, _ = send(client, "What colour was the picture I sent?")
    turn2 = turn1 + [{"role": "assistant", "content": reply},
                     {"role": "user", "content": "What colour was the picture I sent?"}]
    want2, full2 = expected_reply(app.holder, turn2, 10)
    assert follow == want2  # the earlier image is still part of the prompt
    new_tokens = full2 - full  # the reply and the new question
    assert stats2["prompt_tokens"] <= new_tokens + 2, (stats2, full, full2)  # the image was not fed again


def test_two_images_and_sessions_are_separate(server, client, tmp_path):
    from gradio_client import Client

    app, url = server
    a, b = picture(tmp_path / "a.png", 60, 60, seed=2), picture(tmp_path / "b.png", 120, 40, seed=3)
    reply, stats, _ = send(client, "Compare these two.", [a, b])
    messages = [{"role": "user", "content": [{"type": "image", "image": str(a)}, {"type": "image", "image": str(b)},
                                             {"type": "text", "text": "Compare these two."}]}]
    want, full = expected_reply(app.holder, messages, 10)
    assert reply == want and stats["prompt_tokens"] == full

    other = Client(url, verbose=False)  # another session: no history from the first
    reply2, stats2, _ = send(other, "Hi")
    want2, full2 = expected_reply(app.holder, [{"role": "user", "content": "Hi"}], 10)
    assert reply2 == want2 and stats2["prompt_tokens"] == full2
    client.predict(api_name="/clear")
    reply3, stats3, _ = send(client, "Hi")
    assert reply3 == want2 and stats3["prompt_tokens"] == full2  # cleared: a fresh conversation


def test_bad_and_oversized_images_are_messages(server, client, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    reply, stats, _ = send(client, "Look", [tmp_path / "broken.png"])
    assert reply.startswith("⚠️") and "broken.png" in reply and "error" in stats
    whole = picture(tmp_path / "whole.png", 200, 200).read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])  # a valid header, half the pixels
    reply, stats, _ = send(client, "Look", [tmp_path / "truncated.png"])
    assert reply.startswith("⚠️") and "truncated.png" in reply and "error" in stats
    assert "gradio" not in reply, reply  # the server's upload folder is not shown
    big = picture(tmp_path / "huge.png", 600, 400)  # 240,000 pixels; this server's limit is 200,000
    reply, stats, _ = send(client, "Look", [big])
    assert reply.startswith("⚠️") and "above the limit" in reply
    reply, stats, _ = send(client, "Still there?")  # the failed turns were not remembered
    assert not reply.startswith("⚠️") and stats["prompt_tokens"] > 0


@pytest.fixture
def slow_generation(monkeypatch):
    """Make each generated token take 50 ms; one record per generation: tokens, closed early or not, thread."""
    runs = []
    real = chat.stream_generate

    def slow(*args, **kwargs):
        run = {"tokens": 0, "closed": False, "finished": False, "thread": threading.current_thread().name}
        runs.append(run)
        inner = real(*args, **kwargs)
        try:
            for chunk in inner:
                run["tokens"] += 1
                time.sleep(0.05)
                yield chunk
            run["finished"] = True
        finally:
            inner.close()
            run["closed"] = True

    monkeypatch.setattr(chat, "stream_generate", slow)
    return runs


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_cancel_stops_generation_and_queue_shows_position(server, client, slow_generation):
    from gradio_client import Client
    from gradio_client.utils import Status

    app, url = server
    job = client.submit(message={"text": "Count to a thousand.", "files": []}, max_tokens=400, api_name="/chat",
                        **GREEDY)
    _wait(lambda: len(job.outputs()) >= 4)
    waiting = Client(url, verbose=False).submit(message={"text": "Hi", "files": []}, max_tokens=3,
                                                api_name="/chat", **GREEDY)
    _wait(lambda: waiting.status().code == Status.IN_QUEUE and waiting.status().rank is not None)
    assert waiting.status().rank == 0  # next in line, behind the running reply
    job.cancel()
    run = slow_generation[0]
    _wait(lambda: run["closed"])
    assert not run["finished"] and run["tokens"] < 100 and run["thread"] == "mlx-device"
    waiting.result(timeout=60)  # the queue moved on
    _wait(lambda: app.holder.worker.idle)
    reply, stats, _ = send(client, "Are you still there?", max_tokens=4)  # the cancelled turn's partial reply kept
    assert stats["generation_tokens"] == 4


def test_main_loads_then_launches(app_model, tmp_path, monkeypatch, capsys):
    from mlx_llama4.app import cli, ui
    from mlx_llama4.cli import main as top_main

    args = cli.parser().parse_args([])
    assert (args.model, args.host, args.port, args.share, args.max_file_size) == ("demo", "127.0.0.1", 7860, False,
                                                                                 "20mb")
    assert top_main(["app", "--model", str(tmp_path / "absent"), "--no-hf-cache"]) == 2
    assert "cannot load" in capsys.readouterr().err

    holder, folder = app_model
    launched = {}
    monkeypatch.setattr(cli, "make_app", lambda a: ChatApp(holder, AppConfig(models_dirs=a.models_dir)))
    monkeypatch.setattr(ui, "launch", lambda demo, **kw: launched.update(kw, demo=demo))
    assert top_main(["app", "--model", str(folder), "--port", "7999", "--host", "0.0.0.0", "--share"]) == 0
    assert launched["port"] == 7999 and launched["host"] == "0.0.0.0" and launched["share"] is True
    assert launched["max_file_size"] == "20mb" and launched["demo"].config["title"] == "Llama 4 · MLX"


def test_model_switch_shows_progress_and_drops_caches(app_model, tmp_path):
    real, folder = app_model
    loaded = real.current
    other = tmp_path / "other-llama4"
    other.mkdir()
    (other / "config.json").write_text("{}")
    calls = []
    holder = ModelHolder(real.worker, loader=lambda source: calls.append(source) or (loaded.model, loaded.processor))
    app = ChatApp(holder, AppConfig(models_dirs=[folder.parent], include_hf_cache=False))
    assert "No model loaded" in app.status()
    app.switch_model(str(folder), progress=lambda *a, **k: None)
    session = chat.ChatSession()
    holder.worker.call(session.prompt_cache, holder.current)
    steps = []
    status = app.switch_model(str(other), progress=lambda fraction, desc: steps.append((fraction, desc)))
    assert calls == [folder, other] and holder.current.name == str(other) and holder.current.generation == 2
    assert f"`{other}`" in status and "text and images" in status
    assert [f for f, _ in steps] == sorted(f for f, _ in steps) and steps[-1] == (1.0, f"Loaded {other}")
    assert session.cache is None  # the old model's caches were let go before the new one loaded
    choices = dict((v, label) for label, v in app.choices())
    assert str(other) in choices and str(folder.resolve()) in choices and DEMO in choices


def test_only_uploads_are_served_and_uploads_are_limited(server):
    import httpx

    app, url = server
    for path in ("/etc/hostname", str(Path(__file__).resolve())):
        response = httpx.get(f"{url.rstrip('/')}/gradio_api/file={path}")
        assert response.status_code in (403, 404), (path, response.status_code)
    config = httpx.get(f"{url.rstrip('/')}/config").json()
    assert config["max_file_size"] == 20 * 1024 * 1024


def test_prompt_cache_follows_the_model(app_model):
    holder, _ = app_model
    session = chat.ChatSession()
    cache = holder.worker.call(session.prompt_cache, holder.current)
    assert isinstance(cache, PromptCache) and holder.worker.call(session.prompt_cache, holder.current) is cache
    chat.release_all_caches()
    assert session.cache is None


def test_failed_switch_keeps_the_model(app_model, tmp_path):
    holder, folder = app_model
    app = ChatApp(holder, AppConfig(models_dirs=[folder.parent], include_hf_cache=False))
    status = app.switch_model(str(tmp_path / "nowhere"), progress=lambda *a, **k: None)
    assert status.startswith("❌ Could not load") and "not found" in status
    assert holder.current is not None and holder.current.name == str(folder)


def test_only_recent_sessions_keep_a_cache(app_model):
    holder, _ = app_model
    sessions = [chat.ChatSession() for _ in range(chat.MAX_CACHED_SESSIONS + 2)]
    for session in sessions:
        holder.worker.call(session.prompt_cache, holder.current)
    assert [s.cache is not None for s in sessions] == [False] * 2 + [True] * chat.MAX_CACHED_SESSIONS
