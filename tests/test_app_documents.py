"""Documents in the app: text files and PDFs are read (a PDF written here by hand, its text known), a document's
text reaches the model ahead of the question (the reply is compared with ``stream_generate`` on the prompt
written out by hand), its token count is shown, later questions reuse its KV from the engine's prefix cache,
the prompt's reading shows progress, and what does not fit the context or the memory, what is not a document
and what was not uploaded are refused with a message, the session staying usable.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app_helpers import chat_app, collect, start_app  # noqa: E402
from mlx_llama4 import stream_generate  # noqa: E402
from mlx_llama4.app import chat, documents  # noqa: E402
from mlx_llama4.app.documents import check_document, check_fits, is_document, read_document  # noqa: E402
from mlx_llama4.app.handlers import NOT_ACCEPTED, NOT_SENT  # noqa: E402

GREEDY = dict(system="", temperature=0.0, top_p=1.0)
NOTES = "# Shapes\n\n" + "\n".join(f"- Shape {i} is a {c} circle." for i, c in enumerate(["red", "blue"] * 12))


def tiny_pdf(path: Path, lines: list[str]) -> Path:
    """A one-page PDF showing ``lines`` in Helvetica, written object by object (no PDF library involved)."""
    content = "BT /F1 12 Tf 14 TL 72 720 Td " + " ".join(f"({line}) '" for line in lines) + " ET"
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               "/Resources << /Font << /F1 5 0 R >> >> >>",
               f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)
    return path


@pytest.fixture(scope="module")
def server(app_model):
    holder, folder = app_model
    app, demo = start_app(holder, folder)
    yield app, demo.local_url
    demo.close()


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server[1], verbose=False)


def send(client, text, files=(), max_tokens=8):
    from gradio_client import handle_file

    return client.predict(message={"text": text, "files": [handle_file(str(f)) for f in files]},
                          max_tokens=max_tokens, api_name="/chat", **GREEDY)


# ---- reading documents -----------------------------------------------------------------------------------


def test_documents_are_read_and_what_is_not_one_is_refused(app_model, tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_bytes("\ufeffPlain text, with a BOM.\n".encode())
    (tmp_path / "b.md").write_text(NOTES)
    (tmp_path / "c.py").write_text("def f(x):\n    return x + 1\n")
    lines = ["Shapes report", "A red circle is left of a blue square."]
    tiny_pdf(tmp_path / "d.pdf", lines)
    assert read_document(str(tmp_path / "a.txt")) == "Plain text, with a BOM.\n"
    assert read_document(str(tmp_path / "b.md")) == NOTES
    assert read_document(str(tmp_path / "c.py")) == "def f(x):\n    return x + 1\n"
    assert read_document(str(tmp_path / "d.pdf")).split("\n") == lines
    assert [is_document(n) for n in ("x.TXT", "x.pdf", "x.png", "x.bin", "x")] == [True, True, False, False, False]

    (tmp_path / "binary.txt").write_bytes(b"ab\x00\x01cd")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "empty.md").write_text(" \n")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (tmp_path / "data.bin").write_bytes(bytes(range(256)))
    uploads = [tmp_path]
    assert "binary.txt: a binary file, not text" == check_document(str(tmp_path / "binary.txt"), uploads)
    assert "latin1.txt: not a UTF-8 text file" == check_document(str(tmp_path / "latin1.txt"), uploads)
    assert "empty.md: the document holds no text" == check_document(str(tmp_path / "empty.md"), uploads)
    assert "broken.pdf: not a readable PDF" in check_document(str(tmp_path / "broken.pdf"), uploads)
    assert "only documents uploaded" in check_document("/etc/hostname.txt", uploads)
    assert "only documents uploaded" in check_document(str(tmp_path / ".." / "x.txt"), uploads)

    app = chat_app(app_model, tmp_path, monkeypatch)
    for name, why in (("data.bin", "not a recognised image file, nor a document this app reads (.txt, .md, .py, "
                                    ".pdf"), ("binary.txt", "a binary file")):
        box, history = app.add_message({"text": "Read it", "files": [str(tmp_path / name)]}, [], chat.ChatSession())
        assert history[-1]["metadata"]["title"] == NOT_ACCEPTED and why in history[-1]["content"], history


def test_check_fits_counts_prompt_and_reply_against_context_and_memory(app_model):
    cfg = app_model[0].current.model.config.text
    context = cfg.max_position_embeddings
    plenty = 2**40
    assert check_fits(context - 100, 100, cfg, None, None, 4, plenty) is None
    assert f"more than this model's context of {context:,} tokens" in check_fits(context - 99, 100, cfg, None, None,
                                                                                  4, plenty)
    from mlx_llama4.long_context import kv_cache_bytes

    need = kv_cache_bytes(cfg, 1000, float_bytes=4)
    assert check_fits(900, 100, cfg, None, None, 4, int(need / 0.8) + 1) is None
    assert "KV cache would need about" in check_fits(900, 100, cfg, None, None, 4, int(need / 0.8) - 1)
    assert check_fits(900, 100, cfg, 4, 32, 4, int(need / 0.8) - 1) is None  # 4-bit KV takes far less


# ---- through the running app --------------------------------------------------------------------------------


def test_a_document_reaches_the_model_and_later_questions_reuse_its_cache(server, client, tmp_path):
    app, _ = server
    loaded = app.holder.current
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES)
    reply, stats = send(client, "Which shape is red?", [notes])
    prompt = [{"role": "user", "content": f"notes.md:\n\n{NOTES}\n\nWhich shape is red?"}]
    chunks = list(stream_generate(loaded.model, loaded.processor, prompt, max_tokens=8, temperature=0.0))
    assert reply == "".join(c.text for c in chunks) and stats["prompt_tokens"] == chunks[-1].prompt_tokens
    block = len(loaded.processor.tokenizer.encode(f"notes.md:\n\n{NOTES}", add_special_tokens=False))
    assert stats["documents"] == [["notes.md", block]] and block > 200

    _, later = send(client, "And which is blue?")
    assert later["cached_tokens"] >= stats["prompt_tokens"] > block  # the document was not read again
    assert later["documents"] == []  # the count is shown once, with the turn that brought the document


def test_a_document_beyond_the_context_is_refused_and_the_session_goes_on(server, client, tmp_path, engine_spy):
    app, _ = server
    context = app.holder.current.model.config.text.max_position_embeddings
    big = tmp_path / "big.txt"
    big.write_text(" ".join(str(i) for i in range(context)))
    reply, stats = send(client, "Summarise it.", [big])
    assert reply.startswith("⚠️") and f"more than this model's context of {context:,} tokens" in stats["error"]
    assert engine_spy.requests == []  # refused before anything was read
    reply, stats = send(client, "Hello?")
    assert not reply.startswith("⚠️") and stats["prompt_tokens"] > 0 and len(engine_spy.requests) == 1


def test_a_document_too_large_for_the_memory_is_refused(app_model, tmp_path, monkeypatch):
    app = chat_app(app_model, tmp_path, monkeypatch)
    monkeypatch.setattr(chat, "free_memory", lambda: 1024)  # 1 KiB free (the tiny model's KV is small)
    (tmp_path / "notes.md").write_text(NOTES)
    session = chat.ChatSession()
    _, history = app.add_message({"text": "Read it", "files": [str(tmp_path / "notes.md")]}, [], session)
    out = collect(app.respond(history, session, "", 0.0, 1.0, 64))[-1]
    assert out[-1]["metadata"]["title"] == NOT_SENT
    assert re.search(r"its KV cache would need about [\d.]+ MiB, and only 0.0 MiB of memory is free",
                     out[-1]["content"]), out[-1]["content"]


def test_a_document_is_counted_once_for_all_questions_about_it(app_model, tmp_path, monkeypatch):
    """Before each question the app checks the conversation's size and shows the new documents' counts; the
    document's tokens are counted once, not again for every later question (the engine tokenizes the prompt
    itself)."""
    app = chat_app(app_model, tmp_path, monkeypatch)
    doc = tmp_path / f"{uuid.uuid4().hex[:6]}.md"  # a new document: not counted before
    doc.write_text(NOTES)
    counted: list[str] = []
    count_tokens = documents.count_tokens

    def count(tokenizer, text):
        counted.append(text)
        return count_tokens(tokenizer, text)

    for module in (chat, documents):
        monkeypatch.setattr(module, "count_tokens", count)
    session = chat.ChatSession()
    _, history = app.add_message({"text": "Which shape is red?", "files": [str(doc)]}, [], session)
    first = collect(app.respond(history, session, "", 0.0, 1.0, 4))[-1]
    _, history = app.add_message({"text": "And which is blue?", "files": []}, first, session)
    second = collect(app.respond(history, session, "", 0.0, 1.0, 4))[-1]
    assert second[-1]["metadata"]["status"] == "done", second[-1]
    assert sum(NOTES in text for text in counted) == 1, counted  # the shown count: see the test above


def test_the_prompt_is_read_with_progress(app_model, tmp_path, monkeypatch):
    """While a long prompt is read, piece by piece, the pending note names the document and its tokens and
    counts the positions read; the engine's handle reports them as it goes."""
    from mlx_llama4.engine import Engine

    holder, _ = app_model
    app = chat_app(app_model, tmp_path, monkeypatch)
    engine = holder.current.engine
    seen: list[tuple[int, int]] = []
    prefill = Engine._prefill_piece

    def slow_piece(self, seq):
        time.sleep(0.05)
        prefill(self, seq)
        seen.append(seq.handle.progress)

    monkeypatch.setattr(Engine, "_prefill_piece", slow_piece)
    monkeypatch.setattr(chat, "HEARTBEAT", 0.01)
    monkeypatch.setattr(engine, "prefill_step", 32)
    doc = tmp_path / f"{uuid.uuid4().hex[:6]}.txt"  # a new document: nothing of it is in the prefix cache
    doc.write_text(NOTES.replace("circle", "square"))
    session = chat.ChatSession()
    _, history = app.add_message({"text": "Which shape is red?", "files": [str(doc)]}, [], session)
    frames = collect(app.respond(history, session, "", 0.0, 1.0, 4))
    total = int(re.search(r"prompt (\d+) tok", frames[-1][-1]["metadata"]["title"]).group(1))
    assert seen[-1] == (total, total) and [done for done, _ in seen] == sorted(done for done, _ in seen)
    statuses = [f[-1]["metadata"]["title"] for f in frames if f[-1].get("metadata", {}).get("status") == "pending"]
    counts = [tuple(int(n.replace(",", "")) for n in m.groups())
              for m in (re.search(r"([\d,]+) / ([\d,]+) tokens", s) for s in statuses) if m]
    assert any(0 < done < total for done, _ in counts) and all(t == total for _, t in counts), statuses
    assert all(f"{doc.name}: " in s for s in statuses[1:]), statuses


def test_no_route_reads_a_document_that_was_not_uploaded(server, tmp_path, monkeypatch):
    from gradio.utils import get_upload_folder
    from gradio_client import Client
    from gradio_client.client import Endpoint

    app, url = server
    secret = tmp_path / f"secret-{uuid.uuid4().hex}.txt"
    secret.write_text("the secret")
    foreign = {"path": str(secret), "meta": {"_type": "gradio.FileData"}, "orig_name": secret.name}
    monkeypatch.setattr(Endpoint, "_upload_file", lambda self, f, data_index: f)  # send the path as it is
    client = Client(url, verbose=False)
    message = {"text": "Read it", "files": [foreign]}
    for args in ((message, "", 0.0, 1.0, 8), (message, [])):
        with pytest.raises(Exception, match="only files uploaded"):
            client.predict(*args, api_name="/chat" if len(args) == 5 else "/add_message")
    assert not list(Path(get_upload_folder()).rglob(secret.name))
