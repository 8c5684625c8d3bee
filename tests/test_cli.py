"""The ``mlx-llama4`` command (generate, chat) on the bundled demo model: output, flags, chat commands, exit codes
(0 success, 2 usage or input error, 1 unexpected failure, 130 Ctrl-C), ``python -m mlx_llama4``, a gated Hub repo."""

import io
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import mlx_llama4
from mlx_llama4 import cli
from mlx_llama4.cli import main


def _reply(out: str) -> str:
    return out.split("\n[prompt: ", 1)[0]


@pytest.fixture
def spy(monkeypatch):
    """Record the messages of every ``stream_generate`` call and whether its stream was closed."""
    calls = []
    real = mlx_llama4.stream_generate

    def stream(model, processor, messages, **kw):
        call = dict(messages=messages if isinstance(messages, str) else [dict(m) for m in messages], closed=False)
        calls.append(call)
        inner = real(model, processor, messages, **kw)
        try:
            yield from inner
        except GeneratorExit:
            call["closed"] = True
            raise

    monkeypatch.setattr(mlx_llama4, "stream_generate", stream)
    return calls


def test_generate_prints_the_reply_and_stats(tmp_path, capsys):
    img = tmp_path / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 110, 3), dtype=np.uint8)).save(img)
    assert main(["generate", "--prompt", "What is this?", "--image", str(img), "-m", "5", "--temp", "0"]) == 0
    out = capsys.readouterr().out
    assert "[prompt: " in out and "generation: 5 tokens" in out and "peak memory" in out


def test_kv_bits_work_on_the_default_model(capsys):
    assert main(["generate", "--prompt", "Hello!", "--kv-bits", "4", "-m", "4", "--temp", "0"]) == 0
    assert "generation: " in capsys.readouterr().out
    assert main(["generate", "--prompt", "Hello!", "--kv-bits", "4", "--kv-group-size", "64"]) == 2
    assert "head size 32" in capsys.readouterr().err


def test_prompt_from_stdin(monkeypatch, capsys):
    assert main(["generate", "--prompt", "What is 2+3?", "-m", "8", "--temp", "0"]) == 0
    expected = _reply(capsys.readouterr().out)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+3?"))
    assert main(["generate", "--prompt", "-", "-m", "8", "--temp", "0"]) == 0
    assert _reply(capsys.readouterr().out) == expected and expected.strip()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["generate", "--prompt", "-"]) == 2
    assert "the prompt is empty (nothing on standard input)" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--system-prompt", "--system"])
def test_system_prompt(spy, monkeypatch, capsys, flag):
    system = {"role": "system", "content": "Answer briefly."}
    assert main(["generate", flag, "Answer briefly.", "--prompt", "Hi", "-m", "2"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/reset\nHello\n"))
    assert main(["chat", flag, "Answer briefly.", "-m", "2"]) == 0
    assert [c["messages"][0] for c in spy] == [system] * 3  # generate; chat, before and after /reset
    assert [len(c["messages"]) for c in spy] == [2, 2, 2]


def _chat(lines, *flags):
    args = cli.parser().parse_args(["chat", "-m", "3", "--temp", "0", *flags])
    out = io.StringIO()
    code = cli._chat(args, stdin=io.StringIO("".join(f"{line}\n" for line in lines)), out=out)
    return code, out.getvalue()


def test_chat_commands(spy, tmp_path):
    img = tmp_path / "pic.png"
    Image.new("RGB", (40, 30), "red").save(img)
    code, text = _chat([f"/image {img}", "What is it?", "/image /nope.png", "/image", "/help", "/foo bar",
                        "More?", "/reset", "Hello", "/quit", "never read"])
    assert code == 0
    assert "[attached pic.png]" in text and "[no such file: /nope.png]" in text and "[usage: /image PATH]" in text
    assert "[unknown command /help; commands: /image PATH" in text and "[unknown command /foo;" in text
    assert "[conversation cleared]" in text
    users = [[m for m in c["messages"] if m["role"] == "user"] for c in spy]
    assert [len(u) for u in users] == [1, 2, 1]  # the commands never reached the model
    assert users[0][0]["content"][0] == {"type": "image", "image": str(img)}
    assert users[1][1]["content"] == [{"type": "text", "text": "More?"}]
    assert _chat(["Hi"])[0] == 0  # end of input (Ctrl-D) leaves too


class _Interrupting(io.StringIO):
    """An output that raises KeyboardInterrupt (as Ctrl-C would) at its ``after``-th write."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def write(self, s):
        self.after -= 1
        if self.after == 0:
            raise KeyboardInterrupt
        return super().write(s)


def test_an_interrupted_stream_is_cancelled_at_once(spy):
    model, processor = mlx_llama4.load("demo")
    chunks = mlx_llama4.stream_generate(model, processor, "Hello!", max_tokens=20)
    with pytest.raises(KeyboardInterrupt):
        cli._stream(chunks, _Interrupting(3), stats=True)
    assert spy[0]["closed"]  # closed before the exception left _stream, not whenever it is collected


def _main(argv):
    try:
        return main(argv)
    except KeyboardInterrupt:  # would stop the whole test session
        pytest.fail("Ctrl-C escaped main")


def test_exit_codes(spy, monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "Hi", "--no-such-flag"])
    assert e.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err  # argparse's
    assert main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlx-llama4: error: ") and "absent: no such folder" in err
    assert main(["generate", "--prompt", "Hi", "--top-p", "1.5"]) == 2
    assert "top_p must be a number in (0, 1]" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n"))
    calls = len(spy)
    assert main(["chat", "--kv-bits", "4", "--kv-group-size", "64"]) == 2 and len(spy) == calls  # no turn ran
    assert "head size 32" in capsys.readouterr().err

    monkeypatch.setattr(sys, "stdout", _Interrupting(2))  # Ctrl-C while the reply streams
    assert _main(["generate", "--prompt", "Hello!", "-m", "20", "--temp", "0"]) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and spy[-1]["closed"]

    class CtrlC(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", CtrlC())  # Ctrl-C at the chat prompt
    assert _main(["chat"]) == 130
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n"))
    monkeypatch.setattr(sys, "stdout", _Interrupting(3))  # Ctrl-C during a chat reply
    assert _main(["chat", "-m", "20"]) == 130
    monkeypatch.undo()
    assert spy[-1]["closed"] and "Traceback" not in capsys.readouterr().err

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(mlx_llama4, "load", broken)
    assert main(["generate", "--prompt", "Hi"]) == 1  # an unexpected failure keeps its traceback
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err


def _python_m(*args, **kw):
    env = dict(os.environ, **kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "mlx_llama4", *args], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_python_m_and_ctrl_c_at_the_chat_prompt():
    help_run = _python_m("--help")
    out, _ = help_run.communicate(timeout=120)
    assert help_run.returncode == 0 and out.startswith("usage: mlx-llama4")

    chat = _python_m("chat")
    seen = ""
    while not seen.endswith("> "):  # the demo model is loaded and the prompt shown
        c = chat.stdout.read(1)
        assert c, chat.stderr.read()
        seen += c
    chat.send_signal(signal.SIGINT)
    _, err = chat.communicate(timeout=120)
    assert chat.returncode == 130 and "Traceback" not in err and "interrupted" in err


class _GatedHub(BaseHTTPRequestHandler):
    """Answers every request as the Hub answers for a gated repo without access."""

    def _gated(self):
        body = b'{"error": "Access to model org/gated is restricted."}'
        self.send_response(403)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model org/gated is restricted.")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _gated

    def log_message(self, *a):
        pass


def test_a_gated_repo_says_how_to_get_access(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")
    try:
        run = _python_m("generate", "--model", "org/gated", "--prompt", "Hi", env=env)
        _, err = run.communicate(timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    assert run.returncode == 2, err
    assert "org/gated is a gated repo" in err and "accept its license" in err and "/org/gated" in err
    assert "hf auth login" in err and "HF_TOKEN" in err and "not found" not in err


def test_import_is_light_and_names_are_public():
    """``import mlx_llama4`` (and the CLI module) loads neither MLX nor mlx-lm (which pulls in transformers);
    every public name, ``load_processor`` included, is importable from the top level."""
    code = ("import sys, mlx_llama4, mlx_llama4.cli; "
            "print(sorted(m for m in ('mlx', 'mlx_lm', 'transformers', 'torch') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
    from mlx_llama4.processor import load_processor

    assert mlx_llama4.load_processor is load_processor
    assert all(getattr(mlx_llama4, name) is not None for name in mlx_llama4.__all__)
