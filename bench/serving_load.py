"""Item 7, serving: the driver. Four processes on the same folder, each loaded once and measured in turns:

- ``ceiling`` and ``engine``: ``python -m bench.serving ceiling|engine`` (see ``bench/serving.py``);
- ``ours``: ``mlx-llama4 serve``; ``mlx-lm``: ``python -m mlx_lm.server``, both on 127.0.0.1.

Every level (N streams) of every repeat runs on all four, one after the other, the order rotating, so that
ratios compare measurements taken side by side (the machine is shared; its load changes within minutes); the
others sit idle meanwhile. A server level: N clients at once, stream i sending ``/v1/completions`` with its own
prompt (text of P tokens with BOS), ``max_tokens`` M, ``temperature`` 0, ``stream`` with usage; the client
stamps each chunk that carries text (one per token) and checks the usage's token counts and the finish reason.
Aggregate tokens/s: the middle 80% of all tokens by arrival time (``serving.aggregate``), the same for all four.

Time to first token (TTFT) of a new request, idle: a request on the idle server (before and after the loaded
ones); loaded: while 7 other requests are in flight, counted from sending the request to its first text chunk.

Every process is stopped at the end (SIGTERM, then SIGKILL after 15 s); every request has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import serving
from .serving import aggregate, prompt_text

HOST = "127.0.0.1"
READY_TIMEOUT = 300.0  # s to load the model and answer
REQUEST_TIMEOUT = 300.0  # s for one load level


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of a process (Linux), for the CPU each server used in a level."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Process:
    """A measured process, its output (stderr, and stdout for a server) in a log file."""

    def __init__(self, name: str, argv: list[str], **popen: Any):
        self.name, self.argv = name, argv
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        env = dict(os.environ, TQDM_DISABLE="1")
        popen.setdefault("stdout", self.log)
        self.proc = subprocess.Popen(argv, stderr=self.log, env=env, **popen)

    def cpu(self) -> Optional[float]:
        return _cpu_seconds(self.proc.pid)

    def log_tail(self, n: int = 2000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def _exited(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


class Server(Process):
    def __init__(self, name: str, argv: list[str], ready_path: str):
        super().__init__(name, argv)
        self.ready_path = ready_path
        self.url = f"http://{HOST}:{argv[argv.index('--port') + 1]}"

    def wait_ready(self) -> float:
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < READY_TIMEOUT:
            self._exited()
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT:.0f} s: {self.log_tail()}")

    def measure(self, streams: int, prompt: int, tokens: int, first: int) -> dict:
        return asyncio.run(level(self, streams, prompt, tokens, first))


class Resident(Process):
    """``python -m bench.serving KIND``, driven through its stdin and stdout."""

    def __init__(self, kind: str):
        super().__init__(kind, [sys.executable, "-m", "bench.serving", kind], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(serving.REPLY):
                return json.loads(line[len(serving.REPLY):])
        self.proc.wait(timeout=15)
        self._exited()
        raise RuntimeError(f"{self.name} closed its output: {self.log_tail()}")

    def wait_ready(self) -> float:
        t0 = time.perf_counter()
        self._reply()
        return time.perf_counter() - t0

    def measure(self, streams: int, prompt: int, tokens: int, first: int, profile: bool = False) -> dict:
        cpu0, t0 = self.cpu(), time.perf_counter()
        command = dict(streams=streams, prompt=prompt, tokens=tokens, first=first, **({"profile": True} if profile else {}))
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        out = self._reply()
        cpu1, wall = self.cpu(), time.perf_counter() - t0
        if cpu0 is not None and cpu1 is not None:
            out["cpu_per_s"] = (cpu1 - cpu0) / wall
            if "cpu_tps" not in out and out.get("tokens"):
                out["cpu_tps"] = out["tokens"] / (cpu1 - cpu0)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                pass
        super().stop()


def start_all(model: Path, max_batch: int) -> dict[str, Process]:
    """The four processes, loading at the same time."""
    py = sys.executable
    ours = ["-m", "mlx_llama4", "serve", "--model", str(model), "--host", HOST, "--port", str(free_port()),
            "--max-batch", str(max_batch)]
    theirs = ["-m", "mlx_lm.server", "--model", str(model), "--host", HOST, "--port", str(free_port())]
    procs: dict[str, Process] = {}
    try:
        procs["ceiling"] = Resident("ceiling")
        procs["engine"] = Resident("engine")
        procs["ours"] = Server("ours", [py, *ours], "/health")
        procs["mlx-lm"] = Server("mlx-lm", [py, *theirs], "/v1/models")
    except Exception:
        for p in procs.values():
            p.stop()
        raise
    return procs


# ---------------------------------------------------------------------------------------------------------------
# streaming clients
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Stream:
    """One request's client-side record."""

    sent: float = 0.0
    stamps: list[float] = field(default_factory=list)  # arrival of each chunk with text
    text: list[str] = field(default_factory=list)
    finish: Optional[str] = None
    usage: Optional[dict] = None
    error: Optional[str] = None

    @property
    def ttft(self) -> Optional[float]:
        return self.stamps[0] - self.sent if self.stamps else None


async def _request(client, url: str, prompt: str, max_tokens: int, record: Stream) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    record.sent = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                now = time.perf_counter()
                msg = json.loads(line[6:])
                for choice in msg.get("choices") or []:
                    if choice.get("text"):
                        record.stamps.append(now)
                        record.text.append(choice["text"])
                    record.finish = choice.get("finish_reason") or record.finish
                record.usage = msg.get("usage") or record.usage
    except Exception as e:  # recorded and reported; the level goes on with the other streams
        record.error = f"{type(e).__name__}: {e}"


def _client():
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=10.0),
                             limits=httpx.Limits(max_connections=32, max_keepalive_connections=32))


def _summary(records: list[Stream]) -> dict:
    usage = [r.usage or {} for r in records]
    return {
        "generated": [u.get("completion_tokens") for u in usage],
        "chunks": [len(r.stamps) for r in records],
        "prompt_tokens": sorted({u.get("prompt_tokens") for u in usage}, key=str),
        "cached_tokens": sorted({(u.get("prompt_tokens_details") or {}).get("cached_tokens") for u in usage}, key=str),
        "finish": sorted({str(r.finish) for r in records}),
        "errors": [r.error for r in records if r.error],
        "ttft_s": [r.ttft for r in records],
    }


async def level(server: Server, n: int, prompt: int, tokens: int, first: int) -> dict:
    """N streams at once on ``server``, with prompts ``first``, ``first + 1``, ..."""
    records = [Stream() for _ in range(n)]
    cpu0, t0 = server.cpu(), time.perf_counter()
    async with _client() as client:
        await asyncio.wait_for(asyncio.gather(*(
            _request(client, server.url, prompt_text(first + i, prompt), tokens, r) for i, r in enumerate(records))),
            REQUEST_TIMEOUT)
    wall, cpu1 = time.perf_counter() - t0, server.cpu()
    out = dict(aggregate([r.stamps for r in records]), streams=n, **_summary(records), request_wall_s=wall)
    if cpu0 is not None and cpu1 is not None:
        out["cpu_per_s"] = (cpu1 - cpu0) / wall  # CPU cores the server kept busy
        out["cpu_tps"] = sum(g or 0 for g in out["generated"]) / (cpu1 - cpu0)  # tokens per CPU-second, whole job
    return out


async def ttft(server: Server, prompt: int, tokens: int, loading: int, probes: int, together: bool) -> dict:
    """TTFT of a new request (max_tokens 4): ``probes`` times in a row while ``loading`` other requests are in
    flight, and ``probes`` times on the idle server, half before and half after (a batching server only: one
    that serves a request at a time is still busy with the cancelled ones). The loaded probes start once every
    loading stream has its first token (``together``: a batching server) or once the first has (a server that
    serves one request at a time, the others waiting in its queue)."""
    base = 100_000  # prompt indices of their own: no prefix is shared with the load levels
    after = probes // 2 if together else 0
    async with _client() as client:

        async def probe(index: int) -> Stream:
            r = Stream()
            await asyncio.wait_for(_request(client, server.url, prompt_text(base + index, prompt), 4, r),
                                   REQUEST_TIMEOUT)
            return r

        idle = [await probe(k) for k in range(probes - after)]
        load = [Stream() for _ in range(loading)]
        tasks = [asyncio.create_task(_request(client, server.url, prompt_text(base + 100 + i, prompt), tokens, r))
                 for i, r in enumerate(load)]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < REQUEST_TIMEOUT:
            started = sum(1 for r in load if r.stamps)
            if started == (loading if together else 1) or any(r.error for r in load):
                break
            await asyncio.sleep(0.01)
        busy = []
        for k in range(probes):
            decoding = sum(1 for x in load if x.stamps and x.finish is None)
            in_flight = sum(1 for x in load if x.finish is None and x.error is None)
            busy.append((await probe(200 + k), decoding, in_flight))
        for task in tasks:  # closing the streams cancels them (ours frees their rows; mlx-lm stops at its next write)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if after:
            await asyncio.sleep(1.0)
            idle += [await probe(50 + k) for k in range(after)]
    idle_s = [r.ttft for r in idle if r.ttft is not None]
    busy_s = [r.ttft for r, _, _ in busy if r.ttft is not None]
    return {
        "idle_s": idle_s, "loaded_s": busy_s, "idle_after": after,
        "decoding_at_send": [d for _, d, _ in busy], "unfinished_at_send": [u for _, _, u in busy],
        "idle_median_s": statistics.median(idle_s) if idle_s else None,
        "loaded_median_s": statistics.median(busy_s) if busy_s else None,
        "ratio": statistics.median(busy_s) / statistics.median(idle_s) if idle_s and busy_s else None,
        "errors": [r.error for r in idle + [b[0] for b in busy] if r.error],
    }


# ---------------------------------------------------------------------------------------------------------------
# the worker task
# ---------------------------------------------------------------------------------------------------------------


def mlx_lm_batching(model: Path) -> dict:
    """Whether mlx-lm's server would batch this model: its rule (mlx_lm/server.py, ``ModelProvider._load``) is
    that every cache of ``make_prompt_cache(model)`` has a ``merge`` method (and no draft model, no seed, no
    --kv-bits, no images per request)."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    lm, _ = load_model(model, lazy=True)
    caches = make_prompt_cache(lm)
    kinds = sorted({type(c).__name__ for c in caches})
    lacking = sorted({type(c).__name__ for c in caches if not hasattr(c, "merge")})
    return {"batchable": not lacking, "cache_kinds": kinds, "without_merge": lacking}


def serving_load(streams: list[int], prompt: int, tokens: int, repeats: int, probes: int,
                 mlx_lm_probes: int = 1, max_batch: int = 8) -> dict:
    model = serving.folder()
    out: dict[str, Any] = {"prompt_tokens": prompt, "tokens": tokens, "repeats": repeats,
                           "mlx_lm_batching": mlx_lm_batching(model)}
    procs = start_all(model, max_batch)
    try:
        out["argv"] = {k: " ".join(["python", *p.argv[1:]]) for k, p in procs.items()}
        out["ready_s"] = {k: p.wait_ready() for k, p in procs.items()}
        out["check"] = _same_reply(procs["ours"], procs["mlx-lm"], prompt)
        names = list(procs)
        runs: dict[str, list] = {k: [] for k in names}
        for rep in range(repeats):
            for j, n in enumerate(streams):
                turn = rep * len(streams) + j
                first = 100 * turn  # new prompts for every level of every repeat
                for k in names[turn % len(names):] + names[: turn % len(names)]:
                    runs[k].append(dict(procs[k].measure(n, prompt, tokens, first), repeat=rep))
        out["levels"] = runs
        first = 100 * len(streams) * repeats
        out["profiles"] = [procs["engine"].measure(n, prompt, tokens, first + 100 * i, profile=True).get("profile")
                           for i, n in enumerate(sorted({1, max(streams)}))]
        together = out["mlx_lm_batching"]["batchable"]
        out["ttft"] = {
            "ours": asyncio.run(ttft(procs["ours"], prompt, tokens, max_batch - 1, probes, True)),
            "mlx-lm": asyncio.run(ttft(procs["mlx-lm"], prompt, tokens, max_batch - 1, mlx_lm_probes, together))}
    finally:
        for p in procs.values():
            p.stop()
    return out


def _same_reply(ours: Server, theirs: Server, prompt: int) -> dict:
    """The same greedy reply from both servers (the same weights, prompt and decoding)."""
    check = {}
    for k, server in (("ours", ours), ("mlx-lm", theirs)):
        r = Stream()
        asyncio.run(_one(server, prompt, r))
        check[k] = {"generated": (r.usage or {}).get("completion_tokens"), "chunks": len(r.stamps),
                    "prompt_tokens": (r.usage or {}).get("prompt_tokens"), "error": r.error, "text": "".join(r.text)}
    # mlx-lm's detokenizer drops the reply's leading space
    check["same_text"] = check["ours"]["text"].strip() == check["mlx-lm"]["text"].strip()
    return check


async def _one(server: Server, prompt: int, record: Stream) -> None:
    async with _client() as client:
        await asyncio.wait_for(_request(client, server.url, prompt_text(200_000, prompt), 16, record),
                               REQUEST_TIMEOUT)
