"""``python -m bench``: every benchmark, each configuration in a fresh worker process, then the report.

    python -m bench                 # everything (20-25 minutes on 2 shared CPU cores)
    python -m bench --quick         # fewer repeats and context lengths (a smoke run, ~10 minutes)
    python -m bench --only 1,4      # some items only (1-9, listed in bench/README.md)
    python -m bench --only 9        # long context, 2K to 64K tokens (not in the default run: hours on 2 cores)
    python -m bench --only 9 --contexts 2048,8192   # long context at these prompt lengths only
    python -m bench --update-docs   # write the results into docs/bench/, the copy the README quotes
                                    # (with --only: replaces those items there, keeps the others)
    python -m bench --render --out DIR   # rewrite DIR/RESULTS.md and the plots from DIR/results.json

Writes results.json, RESULTS.md and the plots into a new folder ``bench-results/<date-time>/`` under the current
directory (``--out`` to choose another, ``--update-docs`` for ``docs/bench/``); the tracked copy in docs/bench/ is
only written when asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import long_context, report, serving, sharding

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "bench"  # the copy README.md quotes
ALL_ITEMS = "1,2,3,4,5,6,7,8"
# the results.json keys each item writes
ITEM_KEYS = {1: ("speed", "mlx_lm_raw_load"), 2: ("kernel_sum",), 3: ("experts",),
             4: ("context_speed", "context", "context_chunked_prefill"), 5: ("vision",), 6: ("convert",),
             7: ("serving",), 8: ("sharding",), 9: ("long_context",)}


def run_worker(task: str, timeout: float = 1200, **kwargs) -> dict:
    """Run ``bench.worker`` in a fresh interpreter; its result, or ``{"error": ...}``."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TQDM_DISABLE", "1")
    t = time.perf_counter()
    label = f"{task} {json.dumps(kwargs)}"
    print(f"  - {label} ...", end="", flush=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.worker", task, json.dumps(kwargs), out], cwd=ROOT,
                              env=env, timeout=timeout, capture_output=True, text=True)
        data = json.loads(Path(out).read_text()) if Path(out).stat().st_size else {}
        if not data:
            data = {"ok": False, "error": f"worker exited {proc.returncode}: {proc.stderr[-2000:]}"}
    except subprocess.TimeoutExpired:
        data = {"ok": False, "error": f"timed out after {timeout} s"}
    finally:
        Path(out).unlink(missing_ok=True)
    dt = time.perf_counter() - t
    print(f" {dt:.0f} s" + ("" if data.get("ok") else f"  FAILED: {data.get('error')}"), flush=True)
    if data.get("ok"):
        return data["result"]
    return {"error": data.get("error"), "traceback": data.get("traceback")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and context lengths")
    ap.add_argument("--only", default=ALL_ITEMS,
                    help="comma-separated item numbers (default: 1-8; 9, long context, takes hours on 2 cores)")
    ap.add_argument("--repeats", type=int, default=None, help="prefill runs per model and context (default 3, quick 1)")
    ap.add_argument("--contexts", default=None,
                    help="item 9's prompt lengths, comma-separated (default 2048-65536 by powers of 2, quick to 8192)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--out", default=None,
                       help="folder for results.json, RESULTS.md and the plots (default: bench-results/<date-time>)")
    where.add_argument("--update-docs", action="store_true", help="write them into docs/bench/ (tracked in git)")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite RESULTS.md and the plots from results.json in --out or docs (no measuring)")
    args = ap.parse_args(argv)
    if args.update_docs:
        out_dir = DOCS
    elif args.out:
        out_dir = Path(args.out)
    elif args.render:
        ap.error("--render needs the folder of an earlier run: --out DIR or --update-docs")
    else:
        out_dir = Path.cwd() / "bench-results" / time.strftime("%Y%m%d-%H%M%S")
    if args.render:
        report.write_all(json.loads((out_dir / "results.json").read_text()), out_dir)
        return 0
    items = {int(x) for x in args.only.split(",") if x.strip()}
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"results go to {out_dir}", flush=True)
    t_start = time.perf_counter()

    machine = report.machine_info()
    print(report.machine_text(machine), flush=True)
    results: dict = {"machine": machine, "command": "python -m bench " + " ".join(argv or sys.argv[1:]),
                     "repeats": repeats, "quick": args.quick, "items": sorted(items)}

    print("building / reusing checkpoints", flush=True)
    names = ["scout", "maverick", "maverick16", "scout-wide", "vision"] + ([serving.NAME] if 7 in items else []) \
        + (["scout-tp"] if 8 in items else [])
    results["checkpoints"] = run_worker("build", names=names)

    short, long = 64, 4 * 128 + 64  # long: 4.5 chunks of 128; decoding goes on inside the 5th chunk
    steps = 24 if args.quick else 48  # decode steps per model, taken in turns
    if 1 in items:
        print("1. tokens/s ours / mlx-lm", flush=True)
        configs = [("scout", "f32"), ("scout", "q4"), ("maverick", "f32"), ("maverick", "q4")]
        if args.quick:
            configs = configs[:2]
        results["speed"] = [run_worker("text_speed", name=n, quant=q, repeats=repeats, short=short, long=long,
                                       steps=steps) for n, q in configs]
        results["mlx_lm_raw_load"] = run_worker("mlx_lm_raw_load", name="scout", quant="f32", short=short,
                                                steps=steps // 2)
    if 2 in items:
        print("2. decode step / its weight kernels", flush=True)
        samples = 20 if args.quick else 40
        results["kernel_sum"] = [run_worker("kernel_sum", name=n, quant=q, samples=samples)
                                 for n, q in (("scout", "f32"), ("scout", "q4"), ("scout-wide", "f32"))]
    if 3 in items:
        print("3. decode time, 128 experts / 16 experts", flush=True)
        results["experts"] = run_worker("expert_scaling", prompt=short, steps=steps)
    if 4 in items:
        print("4. peak memory vs context length (one process per point), and tokens/s vs context length", flush=True)
        # half a chunk past a power of two, so that decoding is mid-chunk (not at a chunk start, where our
        # RoPE layers attend to almost nothing)
        contexts = [c + 64 for c in ([128, 512, 1024] if args.quick else [128, 256, 512, 1024, 2048])]
        results["context_speed"] = run_worker("context_speed", name="scout", contexts=contexts, steps=steps // 2)
        points = []
        for ctx in contexts:
            for impl in ("ours", "mlx-lm"):
                r = run_worker("context_point", impl=impl, name="scout", context=ctx, gen=8)
                points.append(r if "error" not in r else dict(r, impl=impl, context=ctx))
        results["context"] = points
        # ours again at the longest context, in mlx-lm's 2048-token prefill pieces instead of one chunk
        results["context_chunked_prefill"] = run_worker("context_point", impl="ours", name="scout",
                                                        context=contexts[-1], gen=8, prefill_step_size=2048)
    if 5 in items:
        print("5. image: preprocessing + vision encode per tile, ours / mlx-vlm", flush=True)
        results["vision"] = run_worker("vision_speed", repeats=repeats)
    if 6 in items:
        print("6. converter peak RSS / largest output shard", flush=True)
        results["convert"] = [
            run_worker("convert", name="maverick", quantize=False, dtype="bfloat16"),
            run_worker("convert", name="maverick", quantize=True, dtype=None),
            run_worker("convert", name="maverick", quantize=False, dtype="bfloat16", max_shard_size="200MB"),
        ]
    if 7 in items:
        print("7. serving: aggregate decode tokens/s at 1-8 streams, ours / mlx-lm's server / the bare batch step",
              flush=True)
        t_item, item_machine = time.perf_counter(), report.machine_info()
        s = run_worker("serving", timeout=1800, streams=list(serving.STREAMS), prompt=64,
                       tokens=64 if args.quick else 128, repeats=1 if args.quick else 3, probes=5)
        s["machine"] = dict(item_machine, loadavg_end=report.loadavg(), runtime_s=time.perf_counter() - t_item)
        results["serving"] = s
    if 8 in items:
        print("8. 1, 2 and 4 processes (mlx.launch --backend ring on this machine): memory, bytes per token, "
              "decode step split", flush=True)
        results["sharding"] = sharding.run(steps=steps // 2)
    if 9 in items:
        print("9. long context: peak memory and speed, 2K to 64K tokens (one process per point)", flush=True)
        contexts = sorted(int(x) for x in args.contexts.split(",")) if args.contexts else None
        results["long_context"] = long_context.run(run_worker, args.quick, contexts=contexts)
    results["runtime_s"] = time.perf_counter() - t_start
    results["machine"]["loadavg_end"] = report.loadavg()
    if args.update_docs and items != {int(x) for x in ALL_ITEMS.split(",")} and (DOCS / "results.json").exists():
        results = merged(json.loads((DOCS / "results.json").read_text()), results, items)
    report.write_all(results, out_dir)
    return 0


def merged(old: dict, new: dict, items: set[int]) -> dict:
    """The docs copy after a run of some items only: those items' results replaced, the others kept with the
    machine and command of their run; the partial run is listed in ``partial_runs``."""
    out = dict(old)
    for item in items:
        for key in ITEM_KEYS[item]:
            out.pop(key, None)
            if key in new:
                out[key] = new[key]
    out["items"] = sorted(set(old.get("items", [])) | items)
    out["partial_runs"] = [*old.get("partial_runs", []), {"items": sorted(items), "machine": new["machine"],
                                                           "command": new["command"], "runtime_s": new["runtime_s"]}]
    return out


if __name__ == "__main__":
    sys.exit(main())
