"""Item 7, serving: the workload, and the two in-process measurements: the ceiling and our engine without HTTP.

The workload: N concurrent streams (N = 1, 2, 4, 8), each with its own prompt (``prompt_ids``: BOS and P - 1
random " word" tokens; a new prompt for every stream of every run, so no prefix cache ever helps) and
``max_tokens`` M, greedy. The checkpoint is ``scout-serve`` (bench/checkpoints.py: the Scout shape with the demo
tokenizer, lm_head zero but for " word" tokens, so greedy never ends a reply early and every token streams as
one chunk), converted once by ``mlx_lm.convert`` (float32, text-only): both servers and both measurements here
load that very folder.

- ceiling: the bare model (ours, the same weights) decoding B rows at once: prefill the B prompts as one batch,
  then M - 1 synchronous steps (forward, greedy argmax, ``mx.eval``); tokens/s = B / mean step time. On a CPU
  a batch of B costs nearly B single steps (compute-bound matmuls), so this, not B x the one-row speed, is what
  any batching server can reach on this machine.
- engine: our ``Engine`` in-process, no HTTP, the same streams and counting as the servers; optionally with
  timers on the engine's parts of a decode step, to show where the time beyond the bare step goes.

Each runs resident in a process of its own (``python -m bench.serving ceiling|engine``: load once, then answer
one JSON command per line on stdin with one JSON line on stdout), so that ``bench/serving_load.py`` can measure it
in turns with the two servers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from . import checkpoints as ck

NAME = "scout-serve"
STREAMS = (1, 2, 4, 8)
TRIM = 0.1  # aggregate rate over the middle 80% of all tokens (by arrival time): ramp-up and tail left out


def folder() -> Path:
    """The ``mlx_lm.convert`` output (float32, text-only) of the ``scout-serve`` checkpoint, made on first use."""
    src = ck.checkpoint(NAME)
    out = src / "mlx-lm"
    if not (out / "config.json").exists():
        from mlx_lm.convert import convert

        tmp = Path(tempfile.mkdtemp(prefix=".mlx-lm-", dir=src))
        shutil.rmtree(tmp)  # convert() refuses an existing folder
        convert(hf_path=str(src / "compat"), mlx_path=str(tmp), dtype="float32")
        os.replace(tmp, out)
    return out


def prompt_ids(index: int, length: int, seed: int = 7) -> list[int]:
    """Stream ``index``'s prompt: BOS and ``length - 1`` random " word" tokens (distinct per index)."""
    words = ck.word_token_ids()
    rng = np.random.default_rng([seed, index])
    return [ck.text_config(NAME)["bos_token_id"], *rng.choice(words, length - 1).tolist()]


@functools.lru_cache(maxsize=1)
def _token_names() -> dict[int, str]:
    vocab = json.loads((ck.DEMO / "tokenizer.json").read_text())["model"]["vocab"]
    return {i: t for t, i in vocab.items()}


def prompt_text(index: int, length: int) -> str:
    """The same prompt as text, for the servers (which add BOS): " w1 w2 ..."; each " word" is one token."""
    names = _token_names()
    return "".join(" " + names[i][1:] for i in prompt_ids(index, length)[1:])


def aggregate(streams: list[list[float]], trim: float = TRIM) -> dict:
    """Aggregate tokens/s of streams given as per-token arrival times: over all tokens sorted by time, the
    tokens between the ``trim`` and ``1 - trim`` quantiles / the time between them. With N streams decoding
    together that is mostly their steady state (the ramp of N prefills can reach into it); with one stream
    served after another it includes the gaps between them. ``all_decoding_tps``: the same over the time when
    every stream is between its first and last token (none for a server that serves one at a time)."""
    stamps = np.sort(np.concatenate([np.asarray(s, float) for s in streams if len(s)]))
    lo, hi = int(trim * len(stamps)), int(np.ceil((1 - trim) * len(stamps))) - 1
    if hi <= lo or stamps[hi] <= stamps[lo]:
        return {"tps": None, "tokens": int(len(stamps))}
    rates = [(len(s) - 1) / (s[-1] - s[0]) for s in streams if len(s) > 1 and s[-1] > s[0]]
    out = {"tps": (hi - lo) / float(stamps[hi] - stamps[lo]), "tokens": int(len(stamps)),
           "window_s": float(stamps[hi] - stamps[lo]), "wall_s": float(stamps[-1] - stamps[0]),
           "per_stream_tps": statistics.median(rates) if rates else None, "all_decoding_tps": None}
    start, end = max(s[0] for s in streams), min(s[-1] for s in streams)
    inside = int(((stamps > start) & (stamps <= end)).sum())
    if end > start and inside >= 10 * len(streams):
        out["all_decoding_tps"] = inside / float(end - start)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the ceiling: the bare model's batch-B decode step
# ---------------------------------------------------------------------------------------------------------------


def ceiling_run(lm, streams: int, prompt: int, tokens: int, first: int) -> dict:
    """``streams`` rows (prompts ``first``, ``first + 1``, ...) decoded together by the bare model, taking turns
    step by step (order alternating) with one row decoded alone, for the batch's speed-up over one row measured
    side by side: the median over steps of B x (one-row step time) / (batch step time). ``cpu_tps``: the batch's
    tokens over the process CPU time of its whole job (prefill and steps), as counted for the servers."""
    import mlx.core as mx

    sizes = [streams] if streams == 1 else [streams, 1]
    caches, token, cpu = {}, {}, {}
    for b in sizes:
        start = first if b == streams else first + 50
        ids = mx.array([prompt_ids(start + i, prompt) for i in range(b)], dtype=mx.int32)  # (B, P)
        c = time.process_time()
        caches[b] = lm.make_cache()
        token[b] = mx.argmax(lm(ids, cache=caches[b])[:, -1:], axis=-1)  # (B, 1)
        mx.eval(token[b])
        cpu[b] = time.process_time() - c
    times: dict[int, list[float]] = {b: [] for b in sizes}
    for i in range(tokens - 1):  # a stream of M tokens takes M - 1 decode steps after its prefill
        for b in (sizes if i % 2 == 0 else sizes[::-1]):
            t, c = time.perf_counter(), time.process_time()
            token[b] = mx.argmax(lm(token[b], cache=caches[b])[:, -1:], axis=-1)
            mx.eval(token[b])
            times[b].append(time.perf_counter() - t)
            cpu[b] += time.process_time() - c
    del caches
    mx.clear_cache()
    batch, one = times[streams][2:], times[1][2:]  # warm-up steps dropped
    # tokens/s over the total time, as the streams are counted (a median would hide the stalls they see)
    return {"streams": streams, "tps": streams * len(batch) / sum(batch), "step_s": sum(batch) / len(batch),
            "step_median_s": statistics.median(batch), "steps": len(batch),
            "one_row_step_s": sum(one) / len(one),
            "speedup_vs_1": statistics.median(streams * a / b for a, b in zip(one, batch)),
            "cpu_tps": streams * tokens / cpu[streams]}


# ---------------------------------------------------------------------------------------------------------------
# our engine in-process (no HTTP), with a profile of its decode step
# ---------------------------------------------------------------------------------------------------------------


class _Timers:
    """Wall time spent in some methods during each decode step of the engine (not in prefill, whose first token
    also goes through ``_sample``), to split the step into its parts."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []  # per decode step: part -> seconds
        self.on = False
        self._current: Optional[dict[str, float]] = None

    def step(self, owner: Any, name: str) -> Callable[[], None]:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.on:
                return original(*args, **kwargs)
            self._current = {}
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._current["step"] = time.perf_counter() - t
                self.steps.append(self._current)
                self._current = None

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)

    def part(self, owner: Any, name: str, label: str) -> Callable[[], None]:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            current = self._current
            if current is None:
                return original(*args, **kwargs)
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                current[label] = current.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


@contextmanager
def _profiled(timers: _Timers) -> Iterator[None]:
    from mlx_llama4.engine import engine as eng
    from mlx_llama4.engine.sampling import RowSampler
    from mlx_llama4.engine.text_stream import TextStream

    undo = [timers.step(eng.Engine, "_decode_step"),
            timers.part(eng.Engine, "_sample", "sample"),
            timers.part(RowSampler, "choose", "choose"),
            timers.part(eng.Engine, "_advance", "advance"),
            timers.part(TextStream, "add", "detokenize"),
            timers.part(eng.Engine, "_retire", "retire")]
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def _consume(handle, stamps: list[float], finish: list) -> None:
    for event in handle:
        if event.token is not None:
            stamps.append(time.perf_counter())
        if event.finish_reason:
            finish.append(event.finish_reason)


def engine_run(engine, streams: int, prompt: int, tokens: int, first: int, profile: bool = False) -> dict:
    """``streams`` requests at once through our engine, each event taken by a thread of its own (as the
    server's pump threads do)."""
    stamps: list[list[float]] = [[] for _ in range(streams)]
    finish: list = []
    timers = _Timers()
    with _profiled(timers) if profile else contextlib.nullcontext():
        timers.on = profile
        t = time.perf_counter()
        handles = [engine.submit(prompt_ids(first + i, prompt), max_tokens=tokens, temperature=0.0)
                   for i in range(streams)]
        threads = [threading.Thread(target=_consume, args=(h, s, finish)) for h, s in zip(handles, stamps)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=600)
        wall = time.perf_counter() - t
        timers.on = False
    out = dict(aggregate(stamps), streams=streams, finish=sorted(set(finish)), generated=[len(s) for s in stamps])
    if profile:
        out["profile"] = _profile_summary(timers, out, wall, streams)
    return out


def _profile_summary(timers: _Timers, point: dict, wall: float, n: int) -> dict:
    """Per decode step, in ms (medians over the steps where all ``n`` rows decode): the engine's step split into
    the forward pass's graph building (step - sample - retire), the per-row sampling graphs, ``mx.eval`` (the
    computation itself: sample - sampler graphs - bookkeeping), the per-row Python bookkeeping (of which
    detokenizing) and rows leaving."""
    steps = timers.steps[n:len(timers.steps) - n]  # without the ramp up and down, where the batch is smaller
    if not steps:
        return {}

    def med(f: Callable[[dict], float]) -> float:
        return 1e3 * statistics.median(f(t) for t in steps)

    parts = {
        "forward graph build": med(lambda t: t["step"] - t.get("sample", 0.0) - t.get("retire", 0.0)),
        "row sampling graphs": med(lambda t: t.get("choose", 0.0)),
        "mx.eval (the computation)": med(lambda t: t.get("sample", 0.0) - t.get("choose", 0.0) - t.get("advance", 0.0)),
        "row bookkeeping (_advance)": med(lambda t: t.get("advance", 0.0)),
        "  of which detokenizing": med(lambda t: t.get("detokenize", 0.0)),
        "rows leaving (_retire)": med(lambda t: t.get("retire", 0.0)),
    }
    return {"streams": n, "decode_steps": len(steps), "step_ms": med(lambda t: t["step"]), "parts_ms": parts,
            "wall_s": wall, "tps": point.get("tps")}


# ---------------------------------------------------------------------------------------------------------------
# resident process
# ---------------------------------------------------------------------------------------------------------------

REPLY = "@@ "  # marks the result lines on stdout (libraries may print there too)


def resident(kind: str) -> None:
    """Load once, then for each JSON line on stdin (``{"streams", "prompt", "tokens", "first"[, "profile"]}``)
    write ``REPLY`` + a JSON line with the measurement; an empty line or end of input stops."""
    import mlx.core as mx

    from mlx_llama4 import load

    model, processor = load(folder(), dtype=mx.float32)
    if kind == "ceiling":
        lm = model.language_model
        run = functools.partial(ceiling_run, lm)
        closing: contextlib.AbstractContextManager = contextlib.nullcontext()
    elif kind == "engine":
        from mlx_llama4.engine import Engine

        closing = engine = Engine(model, processor, max_batch=max(STREAMS))
        run = functools.partial(engine_run, engine)
    else:
        raise SystemExit(f"unknown kind {kind!r}: ceiling or engine")
    with closing:
        run(1, 16, 8, first=10**6)  # warm-up
        print(REPLY + json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                break
            try:
                reply = run(**json.loads(line))
            except Exception as e:  # reported to the driver, which goes on
                reply = {"error": f"{type(e).__name__}: {e}"}
            print(REPLY + json.dumps(reply), flush=True)


if __name__ == "__main__":
    resident(sys.argv[1])
