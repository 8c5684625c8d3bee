"""``mlx-llama4 serve`` under ``mlx.launch --backend ring -n 2`` (on 127.0.0.1) with the demo model: process 0 serves
HTTP with its share of the model, process 1 follows its engine. Against the same server in one process (the
one-process engine), through the official ``openai`` client, greedy: concurrent streams of different lengths,
one with an image, while another stream is cancelled; a follow-up turn that reuses the prefix cache; with float
and with 8-bit KV. Only process 0 prints, and Ctrl-C (SIGINT to every process, as a terminal sends it) stops both
cleanly: process 0 closes its engine, which tells process 1 to stop.

Each configuration is one launch (seconds of start-up per process on a loaded 2-core machine).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server_helpers import ServerThread, openai_client, picture, question, wait_until
from test_sharding_launch import MLX_LAUNCH, free_ports

TIMEOUT = 600  # seconds for a launch to start serving, or to stop
MAX_TOKENS = 24
CONFIGS = {"float KV": [], "8-bit KV": ["--kv-bits", "8"]}  # serve's extra flags
# prompts of different lengths, one with a picture
REQUESTS = [("Who are you?", None), ("What shape is this?", 10), ("What is 3 plus 4? " * 20, None), ("Hello!", None)]


def messages(text: str, image_seed=None) -> list[dict]:
    return question(text, None if image_seed is None else picture(image_seed, count=1))[0]


def ask(url: str, messages: list[dict]):
    return openai_client(url).chat.completions.create(model="demo", messages=messages, max_tokens=MAX_TOKENS,
                                                      temperature=0.0)


def streamed(url: str, messages: list[dict]) -> str:
    chunks = openai_client(url).chat.completions.create(model="demo", messages=messages, max_tokens=MAX_TOKENS,
                                                        temperature=0.0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def cancelled_stream(url: str) -> None:
    """A long prompt (two prefill pieces) whose client leaves at its first chunk, while the other rows run."""
    chunks = openai_client(url).chat.completions.create(
        model="demo", messages=messages("red green blue " * 300), max_tokens=400, temperature=0.0, stream=True)
    next(iter(chunks))
    chunks.close()


def session(url: str) -> dict:
    """Everything the tests compare, asked of the server at ``url``."""
    with ThreadPoolExecutor(len(REQUESTS) + 1) as pool:
        leaving = pool.submit(cancelled_stream, url)
        replies = list(pool.map(lambda r: streamed(url, messages(*r)), REQUESTS))
        leaving.result()
    first = messages(*REQUESTS[0])
    again = ask(url, first + [{"role": "assistant", "content": replies[0]},
                              {"role": "user", "content": "What is 2 plus 2?"}])
    return {"replies": replies, "follow_up": again.choices[0].message.content,
            "follow_up_cached": again.usage.prompt_tokens_details.cached_tokens}


@pytest.fixture(scope="module")
def one_process() -> dict:
    """``session`` against the same server in this one process, per configuration."""
    from mlx_llama4 import load
    from mlx_llama4.app.server.app import ServerSettings, create_app
    from mlx_llama4.app.server.engine_client import EngineClient
    from mlx_llama4.engine import Engine

    model, processor = load("demo")  # as serve loads it
    out = {}
    for name, flags in CONFIGS.items():
        kv_bits = int(flags[1]) if flags else None
        engine = EngineClient(Engine(model, processor, kv_bits=kv_bits))
        server = ServerThread(create_app(engine, ServerSettings()))
        try:
            out[name] = session(server.url)
        finally:
            server.close()
            engine.close()
    return out


class Launch:
    """``mlx-llama4 serve`` on ``n`` processes under ``mlx.launch``, in a process group of its own."""

    def __init__(self, n: int, flags: list[str]):
        self.out, self.err = tempfile.TemporaryFile(), tempfile.NamedTemporaryFile()
        command = [sys.executable, "-m", "mlx_llama4", "serve", "--port", "0", *flags]
        self.proc = subprocess.Popen(
            [str(MLX_LAUNCH), "--backend", "ring", "-n", str(n), "--starting-port", str(free_ports(n)), "--",
             *command], stdin=subprocess.PIPE, stdout=self.out, stderr=self.err, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # standard input open: see test_sharding_launch.launch
        self.url = None
        wait_until(self._serving, timeout=TIMEOUT, what="the launch to serve")

    def _serving(self) -> bool:
        found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", self.stderr())
        assert found or self.proc.poll() is None, "the launch ended: " + self.stderr()[-3000:]
        self.url = found and found.group(1)
        return bool(found)

    def stderr(self) -> str:
        return Path(self.err.name).read_text(errors="replace")

    def interrupt(self) -> int:
        """Ctrl-C, as a terminal sends it (to every process of the group); the launcher's exit code."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:  # still running: end the launcher and the processes it started
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc.stdin.close()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def launched(request):
    """(configuration, session's results, the launch's stderr after Ctrl-C) for ``serve`` on 2 processes."""
    launch = Launch(2, CONFIGS[request.param])
    try:
        results = session(launch.url)
        time.sleep(0.5)  # idle beats between the processes
        assert session(launch.url)["replies"] == results["replies"]  # again, from the prefix cache
    except BaseException:
        launch.close()
        raise
    launch.interrupt()
    return request.param, results, launch.stderr()


def test_replies_equal_the_one_process_server(launched, one_process):
    config, results, _ = launched
    expected = one_process[config]
    assert all(expected["replies"]) and expected["follow_up_cached"] > 0
    assert results == expected


def test_only_process_0_prints_and_ctrl_c_stops_both(launched):
    _, _, stderr = launched
    assert stderr.count("Loading ") == 1 and stderr.count("Serving demo on") == 1, stderr[-3000:]
    # mlx.launch names each process that failed or that it killed: process 0 stopped on Ctrl-C, process 1 at its
    # word. The launcher's own Ctrl-C traceback aside, no process failed.
    assert "rank 0 exited with code 130" in stderr and "rank 1" not in stderr, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if line.strip().startswith('File "')
            and "mlx/_distributed_utils/" not in line and "bin/mlx.launch" not in line]
    assert not ours, stderr[-3000:]
