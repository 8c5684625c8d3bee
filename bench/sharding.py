"""8. The model split across processes on this machine (tensor parallelism, ``mlx.launch --backend ring`` on
127.0.0.1): per-process peak memory / one process's, bytes communicated per decoded token, and the decode step
split into compute and communication.

One launch per process count (1: a plain process), each process running ``python -m bench.sharding SPEC OUT``:
load its share, prefill a prompt, then decode step by step, each step synchronous (build the graph, evaluate
it, take process 0's greedy token, as ``generate`` does). While one step's graph is built, every ``all_sum`` it
makes is recorded (shape, dtype): the bytes per token. After each step, replaying just those collectives,
chained, gives that step's communication time; compute is the rest (medians over the steps). Here all
processes share two CPU cores, so every collective also waits for the others to be scheduled: the times
describe this machine, not Macs on a network (README.md, "Several Macs", projects those).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from . import checkpoints as ck

MODEL = "scout-tp"
DTYPES = {str(d): d for d in (mx.float32, mx.float16, mx.bfloat16, mx.uint32, mx.int32)}
WARMUP_STEPS = 2


@contextmanager
def recorded_all_sums():
    """Record (shape, dtype name) of every ``mx.distributed.all_sum`` made inside the block."""
    calls: list[tuple[tuple[int, ...], str]] = []
    real = mx.distributed.all_sum

    def all_sum(x, *args, **kwargs):
        calls.append((tuple(x.shape), str(x.dtype)))
        return real(x, *args, **kwargs)

    mx.distributed.all_sum = all_sum
    try:
        yield calls
    finally:
        mx.distributed.all_sum = real


def replay(calls: list, group) -> float:
    """Seconds to run ``calls``' collectives alone, one after the other (each waits for the previous)."""
    t = time.perf_counter()
    x = mx.zeros((1,))
    for shape, dtype in calls:
        x = mx.distributed.all_sum(mx.depends(mx.zeros(shape, DTYPES[dtype]), x), group=group)
    mx.eval(x)
    return time.perf_counter() - t


def measure(spec: dict) -> dict:
    """One process: its share's memory, one step's collectives, decode step times, the collectives alone."""
    from mlx.utils import tree_flatten

    from mlx_llama4 import load_model
    from mlx_llama4.sharding import rank0_sampler

    group = mx.distributed.init()
    sharded = group.size() > 1
    mx.reset_peak_memory()
    model = load_model(spec["path"], dtype=mx.float32, group=group if sharded else None)
    load_peak = mx.get_peak_memory()
    lm = model.language_model
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    sample = rank0_sampler(greedy, group) if sharded else greedy
    prompt = mx.array([[(7 * i) % ck.PROMPT_ID_RANGE for i in range(spec["prompt"])]])
    cache = lm.make_cache()
    token = sample(lm(prompt, cache=cache)[:, -1])
    mx.eval(token)

    def step(tok):
        return sample(lm(tok[:, None], cache=cache)[:, -1])

    with recorded_all_sums() as calls:
        token = step(token)
    mx.eval(token)
    # Each decode step is followed by a replay of its collectives, so that each pair sees the same load.
    times, comm = [], []
    for i in range(spec["steps"] + WARMUP_STEPS):
        t = time.perf_counter()
        token = step(token)
        mx.eval(token)
        dt = time.perf_counter() - t
        dc = replay(calls, group) if sharded else 0.0
        if i >= WARMUP_STEPS:
            times.append(dt)
            comm.append(dc)
    return {
        "rank": group.rank(), "processes": group.size(),
        "parameter_bytes": sum(a.nbytes for _, a in tree_flatten(model.parameters())),
        "load_peak_bytes": load_peak, "peak_bytes": mx.get_peak_memory(),
        "step_s": statistics.median(times), "steps": len(times), "comm_s": statistics.median(comm),
        "compute_s": statistics.median(t - c for t, c in zip(times, comm)),
        "collectives_per_token": len(calls),
        "bytes_per_token": sum(DTYPES[d].size * math.prod(s) for s, d in calls),
    }


def run(counts=(1, 2, 4), steps: int = 24, prompt: int = 64, timeout: float = 1200) -> dict:
    """Item 8: each process count in its own launch; per count, every process's measures and a summary."""
    path = ck.checkpoint(MODEL)
    spec = {"path": str(path), "steps": steps, "prompt": prompt}
    launcher = Path(sys.executable).parent / "mlx.launch"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out: dict = {"model": MODEL, "description": ck.describe(MODEL)["description"], "counts": {}}
    for n in counts:
        with _tempdir() as folder:
            args = [sys.executable, "-m", "bench.sharding", json.dumps(spec), str(folder)]
            if n > 1:
                args = [str(launcher), "--backend", "ring", "-n", str(n), "--", *args]
            t = time.perf_counter()
            print(f"  - {n} process(es) ...", end="", flush=True)
            proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                                  cwd=Path(__file__).resolve().parent.parent)
            files = [folder / f"rank{r}.json" for r in range(n)]
            if not all(f.exists() for f in files):  # mlx.launch exits with 0 even when a process failed
                print(" FAILED", flush=True)
                out["counts"][str(n)] = {"error": (proc.stdout + proc.stderr)[-2000:]}
                continue
            print(f" {time.perf_counter() - t:.0f} s", flush=True)
            out["counts"][str(n)] = {"ranks": [json.loads(f.read_text()) for f in files]}
    one = out["counts"].get("1", {}).get("ranks", [{}])[0]
    for n, d in out["counts"].items():
        if "ranks" not in d or not one:
            continue
        ranks = d["ranks"]
        step = statistics.median(r["step_s"] for r in ranks)
        comm = statistics.median(r["comm_s"] for r in ranks)
        compute = statistics.median(r["compute_s"] for r in ranks)
        d["summary"] = {
            "peak_ratio": max(r["peak_bytes"] for r in ranks) / one["peak_bytes"],
            "goal": 1 / int(n) + 0.15,
            "peak_bytes": max(r["peak_bytes"] for r in ranks), "one_peak_bytes": one["peak_bytes"],
            "bytes_per_token": ranks[0]["bytes_per_token"],
            "collectives_per_token": ranks[0]["collectives_per_token"],
            "step_s": step, "comm_s": comm, "compute_s": compute, "one_step_s": one["step_s"],
        }
    return out


@contextmanager
def _tempdir():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def main(argv: list[str]) -> int:
    spec, folder = json.loads(argv[0]), Path(argv[1])
    result = measure(spec)
    (folder / f"rank{result['rank']}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
