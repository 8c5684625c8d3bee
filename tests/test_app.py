"""The Gradio chat app: history normalisation, model discovery, and the running app through gradio_client.

The app is launched in-process on 127.0.0.1 around a tiny random checkpoint with the real tokenizer; replies
come from the batching engine and are compared with ``stream_generate`` called directly (greedy, one
sequence), so the images and the history really reach the model; a follow-up is checked to reuse the
conversation's KV from the engine's prefix cache, two sessions' replies to run in one batch, and Stop to free
the reply's row.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app_helpers import chat_app, collect, picture, start_app, wait_until  # noqa: E402
from mlx_llama4 import stream_generate  # noqa: E402
from mlx_llama4.app import chat  # noqa: E402
from mlx_llama4.app.device import EngineOptions, ModelHolder  # noqa: E402
from mlx_llama4.app.history import (ends_with_user_turn, last_user_span, normalize_history,  # noqa: E402
                                    to_model_messages)
from mlx_llama4.app.models import DEMO, discover_models, is_llama4_folder  # noqa: E402
from mlx_llama4.app.handlers import (NOT_SENT, STOPPED, STOPPED_EARLY, AppConfig, ChatApp,  # noqa: E402
                                     note)

GREEDY = dict(system="", temperature=0.0, top_p=1.0)


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


def expected_reply(holder, messages, max_tokens):
    """Greedy reply computed directly (one sequence, no engine), and the prompt's token count."""
    loaded = holder.current
    chunks = list(stream_generate(loaded.model, loaded.processor, messages, max_tokens=max_tokens,
                                  temperature=0.0, top_p=1.0))
    return "".join(c.text for c in chunks), chunks[-1].prompt_tokens


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
        note("stats"),
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
    for decode in (True, False):  # the limit is this app's flag, whichever check finds it
        message = chat.check_image(str(big), uploads, max_pixels=100_000, decode=decode)
        assert "above this app's limit of 100,000 pixels (--max-image-pixels)" in message, message
    assert "only images uploaded" in chat.check_image("/etc/hostname", uploads)
    assert "only images uploaded" in chat.check_image(str(tmp_path / ".." / "elsewhere.png"), uploads)
    assert "gone" in chat.check_image(str(tmp_path / "missing.png"), uploads)
    line = chat.format_stats(dict(prompt_tokens=30, cached_tokens=24, generation_tokens=5, generation_tps=20.0,
                                  time_to_first_token=0.25, peak_memory=1.5, finish_reason="length",
                                  model="/models/scout-4bit"))
    assert line.startswith("scout-4bit · first token 0.25 s") and "prompt 30 tok (24 cached)" in line
    assert "20.0 tok/s" in line and "1.50 GB" in line and "token limit" in line


# ---- the browser's handlers, called directly --------------------------------------------------------------


def test_ui_handlers_send_retry_undo(app_model, tmp_path, monkeypatch):
    holder, _ = app_model
    app = chat_app(app_model, tmp_path, monkeypatch)
    session = chat.ChatSession()
    img = str(picture(tmp_path / "cat.png"))
    box, history = app.add_message({"text": "What is it?", "files": [img]}, [], session)
    assert history == [{"role": "user", "content": [{"path": img}, "What is it?"]}]
    frames = collect(app.respond(history, session, "", 0.0, 1.0, 8))
    assert len(frames) > 2 and frames[0][-1]["metadata"]["status"] == "pending"  # "Reading the prompt…"
    final = frames[-1]
    reply, stats = final[-2], final[-1]
    want, _ = expected_reply(holder, to_model_messages(normalize_history(history)), 8)
    assert reply == {"role": "assistant", "content": want} and "first token" in stats["metadata"]["title"]
    assert app.finish(final, session)[1] == final  # a finished reply gets no note

    _, retried = app.prepare_retry(final, session)
    assert retried == history
    box, undone = app.undo(final)
    assert undone == [] and box.value["text"] == "What is it?" and box.value["files"][0]["orig_name"] == "cat.png"

    (tmp_path / "bad.png").write_bytes(b"GIF89a broken")
    box, rejected = app.add_message({"text": "And this?", "files": [str(tmp_path / "bad.png")]}, final, session)
    assert rejected[-1]["metadata"]["title"] == "⚠️ File not accepted" and "bad.png" in rejected[-1]["content"]
    assert collect(app.respond(rejected, session, "", 0.0, 1.0, 8)) == [rejected]  # nothing to answer
    assert app.prepare_retry(rejected, session)[1] == rejected  # Retry does not answer the turn before again
    assert app.undo(rejected)[1] == final  # Undo takes back the note only; the draft is still in the textbox


def test_a_message_not_sent_goes_back_to_the_textbox(app_model, tmp_path, monkeypatch):
    """An error before the reply begins (here: a conversation longer than the context) removes the turn,
    puts it back into the textbox with its files, and Retry then does not answer the turn before."""
    holder, _ = app_model
    app = chat_app(app_model, tmp_path, monkeypatch)
    session = chat.ChatSession()
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    img = str(picture(tmp_path / "dog.png"))
    _, history = app.add_message({"text": "more " * 40, "files": [img]}, earlier, session)
    context = holder.current.model.config.text.max_position_embeddings
    try:
        holder.current.model.config.text.max_position_embeddings = 40
        out = collect(app.respond(history, session, "", 0.0, 1.0, 8))[-1]
    finally:
        holder.current.model.config.text.max_position_embeddings = context
    assert out[:-1] == earlier and out[-1]["metadata"]["title"] == NOT_SENT and "context" in out[-1]["content"]
    box, shown = app.finish(out, session)
    args = box.constructor_args
    assert shown == out and args["value"] == {"text": ("more " * 40).strip(), "files": [img]}
    assert args["interactive"] is True and session.unsent is None
    assert app.prepare_retry(shown, session)[1] == shown
    assert "value" not in app.finish(shown, session)[0].constructor_args  # the next finish leaves it alone


def test_finish_says_how_a_reply_ended(app_model, tmp_path, monkeypatch):
    app = chat_app(app_model, tmp_path, monkeypatch)
    session = chat.ChatSession()
    asked = [{"role": "user", "content": "Count to ten."}]
    partial = asked + [{"role": "assistant", "content": "One, two,"}]
    _, stopped = app.finish(partial, session)  # Stop while the reply streamed: it has no stats line
    assert stopped == partial + [note(STOPPED, status="done")]
    _, queued = app.finish(asked, session)  # Stop while waiting in the queue: the reply never began
    assert queued == asked + [note(STOPPED_EARLY, status="done")]
    _, reading = app.finish(asked + [note("Reading the prompt…", status="pending")], session)
    assert reading == queued
    assert app.prepare_retry(queued, session)[1] == asked  # and Retry answers it

    app.clear(session)  # Clear during a reply: whatever the reply streamed meanwhile, the chat ends empty
    box, cleared = app.finish(partial, session)
    assert cleared == [] and box.constructor_args["interactive"] is True
    app.add_message({"text": "Hi", "files": []}, [], session)  # the next message is a new turn
    assert app.finish(partial, session)[1] == stopped


# ---- the running app through gradio_client ------------------------------------------------------------------


def test_streamed_text_reply(server, client, engine_spy):
    app, _ = server
    reply, stats, outputs = send(client, "Hello there!", max_tokens=12)
    want, prompt_tokens = expected_reply(app.holder, [{"role": "user", "content": "Hello there!"}], 12)
    partial = [text for text, _ in outputs if text]
    assert reply == want and len(set(partial)) >= 6  # streamed token by token, not one block
    assert all(want.startswith(text) for text in partial)
    assert stats["prompt_tokens"] == prompt_tokens and stats["generation_tokens"] == 12
    assert stats["model"] == app.holder.current.name  # which model answered
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
    assert follow == want2 and stats2["prompt_tokens"] == full2  # the earlier image is still part of the prompt
    assert stats["prompt_tokens"] <= stats2["cached_tokens"] < full2, (stats, stats2)  # the whole first turn,
    # image included, came from the engine's prefix cache (its reply too, as far as it was computed)


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
    assert reply.startswith("⚠️") and "above this app's limit" in reply and "--max-image-pixels" in reply
    reply, stats, _ = send(client, "Still there?")  # the failed turns were not remembered
    assert not reply.startswith("⚠️") and stats["prompt_tokens"] > 0


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _start_chat(url, text, max_tokens=400):
    from gradio_client import Client

    return Client(url, verbose=False).submit(message={"text": text, "files": []}, max_tokens=max_tokens,
                                             api_name="/chat", **GREEDY)


def test_two_sessions_are_answered_together_in_one_batch(server, engine_spy):
    """Two browser sessions' replies are generated at the same time, as two rows of the engine's batch; then
    Stop in each frees its row."""
    app, url = server
    engine = app.holder.current.engine
    jobs = [_start_chat(url, "Count to a thousand."), _start_chat(url, "Name every colour.")]
    wait_until(lambda: engine.stats()["running"] == 2 and all(len(job.outputs()) >= 2 for job in jobs))
    first = [len(job.outputs()) for job in jobs]
    wait_until(lambda: all(len(job.outputs()) > n + 3 for job, n in zip(jobs, first)))  # both still stream
    assert engine.stats()["running"] == 2
    for job in jobs:
        job.cancel()
    wait_until(lambda: engine.stats()["running"] == 0 and len(engine_spy.finals) == 2)
    assert [engine_spy.final(h).finish_reason for _, h in engine_spy.requests] == ["cancelled", "cancelled"]


def test_stop_frees_the_row(server, client, engine_spy):
    app, url = server
    engine = app.holder.current.engine
    job = client.submit(message={"text": "Count to a thousand.", "files": []}, max_tokens=400, api_name="/chat",
                        **GREEDY)
    wait_until(lambda: len(job.outputs()) >= 4)
    assert engine.stats()["running"] == 1
    job.cancel()
    (_, handle), = engine_spy.requests
    wait_until(lambda: engine_spy.final(handle) is not None)
    assert handle.cancelled and engine_spy.final(handle).finish_reason == "cancelled"
    assert engine_spy.final(handle).completion_tokens < 100 and engine.stats()["running"] == 0
    reply, stats, _ = send(client, "Are you still there?", max_tokens=4)  # the cancelled turn's partial reply kept
    assert stats["generation_tokens"] == 4


def test_a_full_engine_says_busy(app_model, tmp_path, monkeypatch, engine_spy):
    """With no place left in the engine (one row, no queue, taken), a message gets a "busy" note and goes
    back into the textbox; the note names no exception."""
    real, folder = app_model
    holder = ModelHolder(loader=lambda source: (real.current.model, real.current.processor),
                         engine=EngineOptions(max_batch=1, max_queue=0))
    holder.load(str(folder))
    try:
        app = ChatApp(holder, AppConfig(models_dirs=[folder.parent], include_hf_cache=False))
        monkeypatch.setattr(chat, "upload_dirs", lambda: [tmp_path])
        taken = holder.current.engine.submit("Keep talking.", max_tokens=400)
        session = chat.ChatSession()
        history = [{"role": "user", "content": "Hello?"}]
        out = collect(app.respond(history, session, "", 0.0, 1.0, 8))[-1]
        assert out[-1]["metadata"]["title"] == NOT_SENT and chat.BUSY in out[-1]["content"]
        assert "Error" not in out[-1]["content"] and "Traceback" not in out[-1]["content"]
        assert app.finish(out, session)[0].constructor_args["value"] == {"text": "Hello?", "files": []}
        taken.cancel()
    finally:
        holder.close()


def test_main_checks_the_address_then_loads_then_launches(app_model, tmp_path, monkeypatch, capsys):
    import socket

    from mlx_llama4.app import cli, device, ui
    from mlx_llama4.cli import main as top_main

    args = cli.parser().parse_args([])
    assert (args.model, args.host, args.port, args.share, args.max_file_size) == ("demo", "127.0.0.1", 7860, False,
                                                                                 "20mb")
    assert (args.kv_bits, args.kv_group_size) == (None, None)  # no KV quantization; the group size automatic
    assert top_main(["app", "--model", str(tmp_path / "absent"), "--no-hf-cache", "--port", "7998"]) == 2
    assert "cannot load" in capsys.readouterr().err

    loads = []
    monkeypatch.setattr(device, "_locate", lambda name, report: loads.append(name))
    with socket.socket() as taken:  # a busy port, and an address that is not this machine's: one line each,
        taken.bind(("127.0.0.1", 0))  # before any model is loaded
        taken.listen()
        busy = taken.getsockname()[1]
        for flags in (["--port", str(busy)], ["--host", "192.0.2.1"], ["--host", "no-such-host.invalid"]):
            assert top_main(["app", "--no-hf-cache"] + flags) == 2, flags
            err = capsys.readouterr().err
            assert err.startswith("mlx-llama4 app: error: cannot listen on ") and err.count("\n") == 1, err
    assert loads == []
    monkeypatch.undo()

    options = cli.make_app(cli.parser().parse_args(["--max-batch", "3", "--kv-bits", "8", "--kv-group-size",
                                                     "32"])).holder.engine_options
    assert options == EngineOptions(max_batch=3, kv_bits=8, kv_group_size=32)  # what each model's engine gets
    assert cli.parser().parse_args([]).max_batch == 8

    holder, folder = app_model
    launched = {}
    monkeypatch.setattr(cli, "make_app", lambda a: ChatApp(holder, AppConfig(models_dirs=a.models_dir)))
    monkeypatch.setattr(ui, "launch", lambda demo, **kw: launched.update(kw, demo=demo))
    assert top_main(["app", "--model", str(folder), "--port", "7999", "--host", "0.0.0.0", "--share",
                     "--kv-bits", "8", "--max-batch", "2"]) == 0
    assert launched["port"] == 7999 and launched["host"] == "0.0.0.0" and launched["share"] is True
    assert launched["max_file_size"] == "20mb" and launched["demo"].config["title"] == "Llama 4 · MLX"


def test_launch_names_our_share_flag(app_model, monkeypatch, capsys):
    """Gradio's start-up lines name ``launch(share=True)``; the app prints its address and ``--share``."""
    import gradio as gr

    from mlx_llama4.app.ui import build, launch

    holder, folder = app_model
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    demo = launch(build(ChatApp(holder, AppConfig(models_dirs=[folder.parent], include_hf_cache=False))),
                  port=None, block=True)
    try:
        out = capsys.readouterr()
        assert "share=True" not in out.out + out.err
        assert f"Running on {demo.local_url} (--share also publishes a public link)" in out.err
    finally:
        demo.close()


def test_engine_options_reach_the_engine(tmp_path, monkeypatch):
    """--max-batch and the KV quantization flags start each loaded model's engine; the automatic group size
    is one the model's head size allows, and one it does not allow fails the load with a clear message."""
    from real_vocab import build_checkpoint

    folder = tmp_path / "head-32"
    folder.mkdir()
    build_checkpoint(folder, dict(head_dim=32))  # the test model's head size 8 cannot be quantized
    holder = ModelHolder(engine=EngineOptions(max_batch=3, kv_bits=8))
    holder.load(str(folder))
    try:
        engine = holder.current.engine
        assert (engine.max_batch, engine.kv_bits, engine.kv_group_size) == (3, 8, 32)  # 64 does not divide 32
        monkeypatch.setattr(chat, "upload_dirs", lambda: [tmp_path])
        app = ChatApp(holder, AppConfig(models_dirs=[tmp_path], include_hf_cache=False))
        final = collect(app.respond([{"role": "user", "content": "Hi"}], chat.ChatSession(), "", 0.0, 1.0, 3))[-1]
        assert "first token" in final[-1]["metadata"]["title"]  # a quantized batch answers
    finally:
        holder.close()
    holder = ModelHolder(engine=EngineOptions(kv_bits=4, kv_group_size=64))
    with pytest.raises(ValueError, match="kv_group_size 64 does not fit this model's head size 32"):
        holder.load(str(folder))
    assert holder.current is None


def test_special_tokens_are_not_shown(app_model, tmp_path, monkeypatch):
    """A sampled special token (``<|reserved_special_token_303|>``) is not part of the reply's text.

    The engine's token choice is replaced by fixed tokens; the text comes from the engine's own
    detokenizing, which leaves special tokens out.
    """
    import mlx.core as mx

    from mlx_llama4.engine.sampling import RowSampler

    holder, _ = app_model
    tokenizer = holder.current.processor.tokenizer
    special = tokenizer.convert_tokens_to_ids("<|reserved_special_token_303|>")
    tokens = tokenizer.encode("Hello", add_special_tokens=False) + [special] + tokenizer.encode(
        " there", add_special_tokens=False)
    fixed = iter(tokens)
    monkeypatch.setattr(RowSampler, "_draw", lambda self, logprobs, entropy: mx.array([next(fixed)]))
    app = chat_app(app_model, tmp_path, monkeypatch)
    final = collect(app.respond([{"role": "user", "content": "Hi"}], chat.ChatSession(), "", 0.0, 1.0,
                                len(tokens)))[-1]
    assert final[-2]["content"].replace(" ", "") == "Hellothere", final[-2]
    assert "<|" not in json.dumps(final)


def _other_model(tmp_path, folder) -> Path:
    """Another name for the test checkpoint: a valid model folder that the holder has not loaded."""
    other = tmp_path / "other-llama4"
    other.symlink_to(folder, target_is_directory=True)
    return other


def test_model_switch_loads_next_to_the_current_one_when_both_fit(app_model, tmp_path, monkeypatch, engine_spy):
    """The new model loads (on a thread of its own) while the current one answers; then the old engine is
    closed, and a reply it was still writing ends with a note that says why."""
    import threading

    from mlx_llama4.app import device

    real, folder = app_model
    loaded = real.current
    other = _other_model(tmp_path, folder)
    calls = []

    def loader(source):
        calls.append((source, holder.current.name if holder.current else None, threading.current_thread().name))
        return loaded.model, loaded.processor

    holder = ModelHolder(loader=loader)
    app = chat_app(app_model, tmp_path, monkeypatch)
    app.holder = holder
    assert "No model loaded" in app.status()
    app.switch_model(str(folder), progress=lambda *a, **k: None)
    old_engine = holder.current.engine
    frames, api_frames, session = [], [], chat.ChatSession()
    replying = [threading.Thread(target=collect, args=(app.respond(
                    [{"role": "user", "content": "Count to a thousand."}], chat.ChatSession(), "", 0.0, 1.0, 400),
                    frames)),
                threading.Thread(target=collect, args=(app.api_chat("Go on.", "", 0.0, 1.0, 400, session), api_frames))]
    for thread in replying:
        thread.start()
    wait_until(lambda: frames and frames[-1][-1]["content"] and not frames[-1][-1].get("metadata")  # they write
               and api_frames and api_frames[-1][0])
    monkeypatch.setattr(device, "memory_bytes", lambda: 1 << 50)
    steps = []
    picker, status = app.switch_model(str(other), progress=lambda fraction, desc: steps.append((fraction, desc)))
    for thread in replying:
        thread.join(timeout=30)
    try:
        assert calls == [(folder, None, "mlx-load"), (other, str(folder), "mlx-load")]  # side by side
        assert holder.current.name == str(other) and holder.current.engine is not old_engine
        assert f"`{other}`" in status and "text and images" in status
        assert picker.constructor_args["value"] == str(other)
        assert [f for f, _ in steps] == sorted(f for f, _ in steps) and steps[-1] == (1.0, f"Loaded {other}")
        cut = frames[-1]
        assert cut[-2]["role"] == "assistant" and cut[-2]["content"]  # what the old model wrote stays,
        assert cut[-1]["metadata"]["title"] == STOPPED and f"switched to {other}" in cut[-1]["content"]  # marked
        text, why = api_frames[-1]  # the API says so too, and the session keeps what was said
        assert text and f"switched to {other}" in why["stopped"] and session.api_history[-1]["content"] == text
        with pytest.raises(RuntimeError, match="closed"):
            old_engine.submit("Hi")
        choices = dict((v, label) for label, v in app.choices())
        assert str(other) in choices and str(folder.resolve()) in choices and DEMO in choices
    finally:
        holder.close()


def test_failed_switch_keeps_the_model_and_the_picker_shows_it(app_model, tmp_path, monkeypatch):
    """A wrong name, folder or config fails before anything is unloaded; a load that fails later keeps the
    current model when both fit, and loads it again when the current one had to make room."""
    from mlx_llama4.app import device

    real, folder = app_model
    loaded = real.current
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] = "big"
    (bad_config / "config.json").write_text(json.dumps(config))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folder / "config.json").read_text())
    broken = _other_model(tmp_path, folder)
    names = []

    def loader(source):
        names.append(holder.current.name if holder.current else None)
        if Path(source) == broken:
            raise ValueError("broken.safetensors: cannot read tensor data")
        return loaded.model, loaded.processor

    holder = ModelHolder(loader=loader)
    holder.load(str(folder))
    app = ChatApp(holder, AppConfig(models_dirs=[folder.parent], include_hf_cache=False))
    want = f"**Loaded:** `{folder}` (text and images)"
    for name, problem in [(tmp_path / "nowhere", "not found"), (bad_config, "hidden_size"),
                          (no_weights, "safetensors"), (broken, "cannot read tensor data")]:
        for room in (1 << 50, 0):  # both models fit in memory, or not
            monkeypatch.setattr(device, "memory_bytes", lambda: room)
            names.clear()
            with pytest.warns(UserWarning, match=problem):
                picker, status = app.switch_model(str(name), progress=lambda *a, **k: None)
            assert status == want and picker.constructor_args["value"] == str(folder), (name, room)
            if name != broken:
                assert names == [], (name, room)  # refused before anything was unloaded or loaded
            else:  # loaded next to the current model; or after unloading it, and then the current one again
                assert names == ([str(folder)] if room else [None, None]), room
    assert holder.current.name == str(folder)
    holder.close()


def test_every_session_sees_the_model_that_answers(server, app_model):
    """The model is one for the process: a page's timer brings its picker and status line up to date, and
    each reply's stats line names the model that wrote it."""
    import gradio as gr

    app, _ = server
    _, folder = app_model
    shown = app.status()
    assert app.follow_model(shown) == (gr.skip(), gr.skip())  # nothing changed: nothing is sent
    app.holder.loading = "some/other-model"
    try:
        picker, status = app.follow_model(shown)
        assert status.startswith("**Loading** `some/other-model`") and f"`{folder}` answers" in status
        assert picker.constructor_args["value"] == "some/other-model"
        assert "some/other-model" in [v for _, v in picker.constructor_args["choices"]]
    finally:
        app.holder.loading = None
    picker, status = app.follow_model(status)
    assert status == shown and picker.constructor_args["value"] == str(folder)


def test_only_uploads_are_served_and_uploads_are_limited(server):
    import httpx

    app, url = server
    for path in ("/etc/hostname", str(Path(__file__).resolve())):
        response = httpx.get(f"{url.rstrip('/')}/gradio_api/file={path}")
        assert response.status_code in (403, 404), (path, response.status_code)
    config = httpx.get(f"{url.rstrip('/')}/config").json()
    assert config["max_file_size"] == 20 * 1024 * 1024


def _refused_route_values(component: dict, foreign: dict) -> list:
    """Values that name the file ``foreign`` as an input of ``component``'s type would carry it."""
    kind = component["type"]
    if kind == "multimodaltextbox":
        return [{"text": "Look", "files": [foreign]}, {"text": "Look", "files": [{"path": foreign["path"]}]}]
    if kind == "chatbot":
        embedded = {"type": "component", "component": "image", "value": {"path": foreign["path"]},
                    "constructor_args": {}, "props": {}}
        return [[{"role": "user", "content": [{"type": "file", "file": foreign}, {"type": "text", "text": "Hi"}]}],
                [{"role": "user", "content": [embedded, {"type": "text", "text": "Hi"}]}]]
    return [foreign]


def _plain_value(component: dict):
    """A harmless value for an input of ``component``'s type."""
    kind = component["type"]
    if kind == "multimodaltextbox":
        return {"text": "Hi", "files": []}
    if kind == "chatbot":
        return [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    return component.get("props", {}).get("value")


def test_no_route_reads_or_serves_a_file_that_was_not_uploaded(server, tmp_path, monkeypatch, caplog, capfd):
    """Every route the app exposes (documented or not), called through gradio_client with a server path
    where a file belongs, is refused before Gradio copies the file into its cache; nothing is served."""
    import httpx
    from gradio.utils import get_upload_folder
    from gradio_client import Client
    from gradio_client.client import Endpoint

    app, url = server
    secret = picture(tmp_path / f"secret-{uuid.uuid4().hex}.png", 40, 30, seed=9)  # an image, in the temp folder
    foreign = {"path": str(secret), "meta": {"_type": "gradio.FileData"}, "orig_name": secret.name}
    monkeypatch.setattr(Endpoint, "_upload_file", lambda self, f, data_index: f)  # send the path as it is
    client = Client(url, verbose=False)
    config = httpx.get(f"{url.rstrip('/')}/config").json()
    components = {c["id"]: c for c in config["components"]}
    attacked, accepted, reasons = [], [], []
    for dep in config["dependencies"]:
        inputs = [components[i] for i in dep["inputs"] if components[i]["type"] != "state"]
        if not inputs:
            continue  # nothing a caller can send (Stop, Rescan, the page load, the cancel events)
        for slot, component in enumerate(inputs):
            for bad in _refused_route_values(component, foreign):
                args = [bad if i == slot else _plain_value(c) for i, c in enumerate(inputs)]
                attacked.append(dep["api_name"])
                try:
                    accepted.append((dep["api_name"], client.submit(*args, fn_index=dep["id"]).result(timeout=60)))
                except Exception as e:
                    reasons.append(str(e))
    assert {"add_message", "respond", "retry", "finish", "prepare_retry", "finish_retry", "undo", "chat",
            "load_model", "follow_model"} <= set(attacked)
    assert not list(Path(get_upload_folder()).rglob(secret.name))  # never copied into Gradio's cache
    response = httpx.get(f"{url.rstrip('/')}/gradio_api/file={secret}")
    assert response.status_code in (403, 404)
    assert accepted == []  # every call was refused, by the app's own check,
    assert all(re.search("only files uploaded|only text and uploaded files", r) for r in reasons), reasons
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused a call to /")]
    assert len(refusals) == len(attacked)  # with one line in the log each
    assert "Traceback" not in capfd.readouterr().err


def test_chat_takes_a_plain_string_and_refuses_other_shapes_in_one_line(server, client, caplog, capfd):
    app, _ = server
    reply, stats = client.predict("Hello there!", max_tokens=6, api_name="/chat", **GREEDY)
    want, prompt_tokens = expected_reply(app.holder, [{"role": "user", "content": "Hello there!"}], 6)
    assert reply == want and stats["prompt_tokens"] == prompt_tokens
    client.predict(api_name="/clear")
    capfd.readouterr()
    for message in (123, {"files": []}):
        with pytest.raises(Exception, match="validation error"):
            client.predict(message, "", 0.0, 1.0, 6, api_name="/chat")
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused a call to /chat:")]
    assert len(refusals) == 2 and all("\n" not in r for r in refusals), refusals
    assert "Traceback" not in capfd.readouterr().err
