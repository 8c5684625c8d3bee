"""Serving under ``mlx.launch --backend ring -n 2`` (on 127.0.0.1) with the demo model: process 0 runs the
engine, process 1 follows it.

- ``mlx-llama4 serve`` against the same server in one process (the one-process engine), through the official
  ``openai`` client, greedy: concurrent streams of different lengths, one with an image, while another stream
  is cancelled; a follow-up turn that reuses the prefix cache; float and 8-bit KV. Only process 0 prints, and
  Ctrl-C (SIGINT to every process, as a terminal sends it) stops both cleanly.
- ``mlx-llama4 app``: two sessions at once against ``stream_generate`` in one process; the picker keeps the
  launch's model.
- The engine itself (``sharding_engine_worker.py``): requests whose sampling fails keep the processes in step,
  and the follower returns when the engine closes.
- A process killed ends the launch instead of leaving the other waiting forever.

Each case is one launch (seconds of start-up per process on a loaded 2-core machine).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from server_helpers import DEMO, ServerThread, openai_client, picture, question, wait_until
from test_sharding_launch import MLX_LAUNCH, free_ports, launch

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
    """``mlx-llama4 ARGS`` on ``n`` processes under ``mlx.launch``, in a process group of its own, once it prints
    its address (``address``: a pattern capturing it)."""

    def __init__(self, n: int, args: list[str], address: str):
        self.err = tempfile.NamedTemporaryFile()
        self.proc = subprocess.Popen(
            [str(MLX_LAUNCH), "--backend", "ring", "-n", str(n), "--starting-port", str(free_ports(n)), "--",
             sys.executable, "-m", "mlx_llama4", *args],
            stdin=subprocess.PIPE, stdout=self.err, stderr=self.err, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # standard input open: see test_sharding_launch.launch
        self.url = None
        wait_until(lambda: self._serving(address), timeout=TIMEOUT, what="the launch to print its address")
        wait_until(self._listening, timeout=TIMEOUT, what="the launch to listen")  # serve prints it first

    def _listening(self) -> bool:
        try:
            address = urlsplit(self.url)
            socket.create_connection((address.hostname, address.port), timeout=5).close()
            return True
        except OSError:
            return False

    def _serving(self, address: str) -> bool:
        found = re.search(address, self.output())
        assert found or self.proc.poll() is None, "the launch ended: " + self.output()[-3000:]
        self.url = found and found.group(1)
        return bool(found)

    def output(self) -> str:
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


def launched_process(launch: Launch, rank: int) -> int:
    """The id of the launch's process of this rank (mlx.launch gives each its rank in ``MLX_RANK``)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == launch.proc.pid:
                if f"MLX_RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    return int(proc.name)
        except OSError:  # gone meanwhile, or not ours
            continue
    raise AssertionError(f"no process of rank {rank} in the launch")


def assert_stopped_cleanly(output: str, rank0_code: int) -> None:
    """mlx.launch names each process that failed or that it killed: process 0 stopped on Ctrl-C (with
    ``rank0_code``), process 1 at its word. The launcher's own Ctrl-C traceback aside, no process failed."""
    assert ((f"rank 0 exited with code {rank0_code}" in output) == bool(rank0_code) and "rank 1" not in output
            ), output[-3000:]
    ours = [line for line in output.splitlines() if line.strip().startswith('File "')
            and "mlx/_distributed_utils/" not in line and "bin/mlx.launch" not in line]
    assert not ours, output[-3000:]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def launched(request):
    """(configuration, session's results, the launch's stderr after Ctrl-C) for ``serve`` on 2 processes."""
    launch = Launch(2, ["serve", "--port", "0", *CONFIGS[request.param]], r"on (http://127\.0\.0\.1:\d+)/v1")
    try:
        results = session(launch.url)
        time.sleep(0.5)  # idle beats between the processes
        assert session(launch.url)["replies"] == results["replies"]  # again, from the prefix cache
    except BaseException:
        launch.close()
        raise
    launch.interrupt()
    return request.param, results, launch.output()


def test_replies_equal_the_one_process_server(launched, one_process):
    config, results, _ = launched
    expected = one_process[config]
    assert all(expected["replies"]) and expected["follow_up_cached"] > 0
    assert results == expected


def test_only_process_0_prints_and_ctrl_c_stops_both(launched):
    _, _, output = launched
    assert output.count("Loading ") == 1 and output.count("Serving demo on") == 1, output[-3000:]
    assert_stopped_cleanly(output, 130)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the launch's processes in /proc")
@pytest.mark.parametrize("rank", [0, 1])
def test_a_dead_process_ends_the_launch(rank):
    """A process of a serving launch dies (SIGKILL): the other ends too, rather than wait forever in a collective
    (process 1 finds process 0's plans gone; process 0, stopped by mlx.launch, waits a bounded time for its
    engine)."""
    launch = Launch(2, ["serve", "--port", "0"], r"on (http://127\.0\.0\.1:\d+)/v1")
    try:
        assert ask(launch.url, messages("Hello!")).choices[0].message.content
        os.kill(launched_process(launch, rank), signal.SIGKILL)
        launch.proc.wait(timeout=TIMEOUT)
    finally:
        launch.close()
    assert f"rank {rank} exited with code -9" in launch.output(), launch.output()[-3000:]


def test_app_under_mlx_launch(tmp_path):
    """``mlx-llama4 app`` on 2 processes: two sessions at once (one with a picture) get the one-process greedy
    replies; the model picker cannot switch away from the launch's model; Ctrl-C stops both processes."""
    from gradio_client import Client, handle_file

    from mlx_llama4 import load, stream_generate

    image = tmp_path / "shape.png"
    picture(3, count=1).save(image)
    other = tmp_path / "models" / "other-model"  # what the picker lists: a copy of the demo model
    shutil.copytree(DEMO, other, ignore=shutil.ignore_patterns("hf"))
    turns = [("Who are you?", []), ("What shape is this?", [image])]
    launch = Launch(2, ["app", "--port", str(free_ports(1)), "--no-hf-cache", "--models-dir", str(other.parent)],
                    r"Running on (http://127\.0\.0\.1:\d+)")
    try:
        jobs = [Client(launch.url, verbose=False).submit(
            message={"text": text, "files": [handle_file(str(f)) for f in files]}, system="", temperature=0.0,
            top_p=1.0, max_tokens=MAX_TOKENS, api_name="/chat") for text, files in turns]
        replies = [job.result(timeout=TIMEOUT)[0] for job in jobs]
        Client(launch.url, verbose=False).predict(str(other), api_name="/load_model")
        # the switch was refused, in the log: mlx.launch relays output every 0.1 s and drops what it has not
        # relayed when Ctrl-C reaches it, so wait for the line before pressing it
        wait_until(lambda: "it serves only that model" in launch.output(), timeout=60, what="the refusal in the log")
    except BaseException:
        launch.close()
        raise
    launch.interrupt()
    model, processor = load("demo")
    for (text, files), reply in zip(turns, replies):
        content = [{"type": "image", "image": str(f)} for f in files] + [{"type": "text", "text": text}]
        chunks = stream_generate(model, processor, [{"role": "user", "content": content}], max_tokens=MAX_TOKENS,
                                 temperature=0.0, top_p=1.0)
        assert reply == "".join(c.text for c in chunks), text
    output = launch.output()
    assert output.count("Running on") == 1, output[-3000:]
    assert_stopped_cleanly(output, 0)


def test_failing_samples_keep_the_processes_in_step(tmp_path):
    """The engine itself on 2 processes (``sharding_engine_worker.py``): requests whose logits processor fails,
    alone (no row of the step samples) and among others, end with their error while every other request gets the
    one-process engine's tokens; the follower returns once process 0's engine closes."""
    import json

    from mlx_llama4 import load
    from mlx_llama4.engine import Engine
    from sharding_engine_worker import requests

    worker = Path(__file__).parent / "sharding_engine_worker.py"
    proc = launch(2, [sys.executable, str(worker), str(tmp_path)], cwd=worker.parent)
    files = [tmp_path / f"rank{r}.json" for r in range(2)]
    assert proc.returncode == 0 and all(f.exists() for f in files), proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(f.read_text()) for f in files]
    with Engine(*load("demo"), max_batch=4) as engine:
        expected = json.loads(json.dumps(requests(engine)))  # tuples as the worker's JSON holds them
    assert ranks[0]["events"] == expected and ranks[1]["followed"]
    finishes = [events[-1][1] for events in expected]
    assert finishes[0] == finishes[2] == finishes[3] == "error" and "error" not in finishes[4:] + finishes[1:2]
    assert len(expected[3]) == 4  # three tokens, then the failure


def test_the_engine_refuses_a_model_split_by_layers():
    from mlx_llama4 import load
    from mlx_llama4.engine import Engine
    from mlx_llama4.sharding import Sharding
    from sharding_checkpoints import FakeGroup

    model, processor = load("demo")
    model.sharding = Sharding(FakeGroup(0, 2), "pipeline")  # what load(..., parallel="pipeline") sets
    with pytest.raises(ValueError, match="tensor parallelism, not pipeline parallelism"):
        Engine(model, processor)
