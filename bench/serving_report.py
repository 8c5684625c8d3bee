"""Item 7 in the report: table rows (each goal with the ceiling beside it), the section of RESULTS.md, the plot.

``results["serving"]`` is what ``serving_load.serving_load`` returns (``levels``: per process, one record per
stream count and repeat; ``profiles``; ``ttft``; ``check``) plus the item's ``machine``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Optional

GOALS = {"streams": (">=", 3.0), "vs-mlx-lm": (">=", 2.5), "ttft": ("<=", 2.0)}
MODEL = "scout-serve f32"
IMPLS = ("ceiling", "engine", "ours", "mlx-lm")
CPU = "cpu_tps"  # tokens per CPU-second of the measured process, whole job: the cross-check on a shared machine


def _median(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _f(x: Optional[float], nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _tps(s: dict, key: str = "tps") -> dict[str, dict[tuple[int, int], float]]:
    """tokens/s (``key``: "tps", or "cpu_tps" per CPU-second) by process and (stream count, repeat)."""
    return {k: {(r["streams"], r["repeat"]): r.get(key) for r in runs if "streams" in r}
            for k, runs in (s.get("levels") or {}).items()}


def series(s: dict, key: str = "tps") -> dict[str, dict[int, float]]:
    """Median tokens/s over the repeats, by process and stream count."""
    out = {}
    for k, by in _tps(s, key).items():
        ns = sorted({n for n, _ in by})
        out[k] = {n: _median(v for (m, _), v in by.items() if m == n) for n in ns}
    return out


def paired(s: dict, a: str, n: int, b: str, m: int, key: str = "tps") -> Optional[float]:
    """Median over repeats of a's tokens/s at n streams / b's at m streams, both of the same repeat."""
    t = _tps(s, key)
    reps = sorted({r for _, r in t.get(a, {})})
    return _median(t[a].get((n, r)) / t[b][(m, r)] for r in reps
                   if t[a].get((n, r)) and t.get(b, {}).get((m, r)))


def ceiling_speedup(s: dict, n: int) -> Optional[float]:
    """The bare batch-n step's tokens/s over one row's, measured side by side (median of the repeats)."""
    return _median(r.get("speedup_vs_1") for r in (s.get("levels") or {}).get("ceiling", []) if r.get("streams") == n)


def add_rows(results: dict, add: Callable) -> None:
    """Item 7's rows through report.rows's ``add(item, measure, model, ours, ref, ratio, goal, note=, why=)``."""
    s = results.get("serving")
    if not s:
        return
    if "error" in s:
        add("7", "serving", MODEL, "-", "-", None, note=f"error: {s['error']}")
        return
    ser = series(s)
    ours, mlx, ceil = ser.get("ours", {}), ser.get("mlx-lm", {}), ser.get("ceiling", {})
    errors = [f"{k} at {r.get('streams')}: {r['error']}" for k, runs in s["levels"].items() for r in runs
              if "error" in r]
    if errors:
        add("7", "serving", MODEL, "-", "-", None, note="errors: " + "; ".join(errors))
    if not ours:
        return
    top = max(ours)
    speed, bound = paired(s, "ours", top, "ours", 1), ceiling_speedup(s, top)
    add("7", f"aggregate decode tok/s, ours at {top} streams / ours at 1", MODEL, _f(ours.get(top), 1),
        _f(ours.get(1), 1), speed, GOALS["streams"], paired(s, "ours", top, "ours", 1, CPU),
        note=f"ceiling on this machine: the bare batch-{top} step gives {_f(bound)}x batch 1's tokens/s",
        why=(f"above the ceiling: on this CPU the bare model's batch-{top} decode step (compute-bound matmuls) "
             f"gives only {_f(bound)}x batch 1's tokens/s, so no batching server can reach "
             f"{GOALS['streams'][1]:g}x here; ours reaches {_f(speed / bound if speed and bound else None)} of that"
             if bound and bound < GOALS["streams"][1] else None))
    for n in sorted(ours):
        room = paired(s, "ceiling", n, "mlx-lm", n)
        goal = GOALS["vs-mlx-lm"] if n == top else None
        why = None
        if n == top and room is not None and room < GOALS["vs-mlx-lm"][1]:
            why = (f"above the ceiling: the bare batch-{n} step gives only {_f(room)}x what mlx-lm's server delivers "
                   f"at {n} streams on this CPU")
        elif n == top:
            why = (f"the ceiling allows {_f(room)}x; ours reaches {_f(paired(s, 'ours', n, 'ceiling', n))} of the "
                   f"bare batch-{n} step, our engine without HTTP {_f(paired(s, 'engine', n, 'ceiling', n))}: see "
                   "the item 7 section for the profile and the run-to-run spread")
        add("7", f"aggregate decode tok/s at {n} stream{'s' if n > 1 else ''}, ours server / mlx-lm server",
            MODEL, _f(ours.get(n), 1), _f(mlx.get(n), 1), paired(s, "ours", n, "mlx-lm", n), goal,
            paired(s, "ours", n, "mlx-lm", n, CPU), note=f"ceiling {_f(ceil.get(n), 1)} tok/s = {_f(room)}x mlx-lm", why=why)
    for n in sorted(ours):
        add("7", f"  ours server / ceiling (bare batch-{n} step), {n} stream{'s' if n > 1 else ''}", MODEL,
            _f(ours.get(n), 1), _f(ceil.get(n), 1), paired(s, "ours", n, "ceiling", n), None,
            paired(s, "ours", n, "ceiling", n, CPU), note=f"engine without HTTP / ceiling: {_f(paired(s, 'engine', n, 'ceiling', n))}")
    for impl, label in (("ours", "ours"), ("mlx-lm", "mlx-lm server")):
        t = (s.get("ttft") or {}).get(impl)
        if not t:
            continue
        flight = ", ".join(f"{a}/{b}" for a, b in zip(t.get("decoding_at_send", []), t.get("unfinished_at_send", [])))
        add("7", f"TTFT ms, new request with 7 others in flight / idle ({label})", MODEL,
            _f(1e3 * t["loaded_median_s"], 0) if t.get("loaded_median_s") else "-",
            _f(1e3 * t["idle_median_s"], 0) if t.get("idle_median_s") else "-", t.get("ratio"),
            GOALS["ttft"] if impl == "ours" else None,
            note=f"median of {len(t.get('loaded_s', []))} probe(s); others decoding / in flight when sent: {flight}")


# ---------------------------------------------------------------------------------------------------------------
# RESULTS.md section
# ---------------------------------------------------------------------------------------------------------------


def section_markdown(results: dict, plots: list[str]) -> str:
    s = results.get("serving")
    if not s or "error" in s:
        return ""
    ser = series(s)
    ours, mlx, ceil, eng = (ser.get(k, {}) for k in ("ours", "mlx-lm", "ceiling", "engine"))
    m = s.get("machine", {})
    v = m.get("versions", {})
    lines = ["## 7. Serving: aggregate decode tokens/s vs concurrent streams", ""]
    if m:
        lines += [f"Measured {m.get('date')} on {m.get('cpu')} x {m.get('cpu_count')} cores (shared), MLX "
                  f"{v.get('mlx')} ({m.get('mlx_device')}), mlx-lm {v.get('mlx-lm')}; load average "
                  f"{m.get('loadavg_start')} at the start of the item, {m.get('loadavg_end')} at its end; "
                  f"{m.get('runtime_s', 0) / 60:.1f} min.", ""]
    lines += [f"Workload: every stream its own prompt of {s.get('prompt_tokens')} tokens and {s.get('tokens')} "
              f"generated tokens (greedy), the N streams sent at once; {s.get('repeats')} repeats, the four taking "
              f"turns level by level; tokens/s: median of the repeats, ratios: median of the per-repeat ratios. "
              f"Model: {MODEL} (`bench/checkpoints.py`), one folder written by `mlx_lm.convert` that all four load.",
              "", "| streams | ceiling: bare batch step | engine, no HTTP | ours server | mlx-lm server | ours / ours "
              "at 1 | ceiling / one row | ours / mlx-lm | ceiling / mlx-lm | ours / ceiling | engine / ceiling |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted(ours or ceil):
        lines.append(
            f"| {n} | {_f(ceil.get(n), 1)} | {_f(eng.get(n), 1)} | {_f(ours.get(n), 1)} | {_f(mlx.get(n), 1)} | "
            f"{_f(paired(s, 'ours', n, 'ours', 1))} | {_f(ceiling_speedup(s, n))} | "
            f"{_f(paired(s, 'ours', n, 'mlx-lm', n))} | {_f(paired(s, 'ceiling', n, 'mlx-lm', n))} | "
            f"{_f(paired(s, 'ours', n, 'ceiling', n))} | {_f(paired(s, 'engine', n, 'ceiling', n))} |")
    lines += ["", "Tokens/s per repeat (ceiling / engine / ours / mlx-lm):", ""]
    t = _tps(s)
    for n in sorted(ours):
        reps = sorted({r for m_, r in t.get("ours", {}) if m_ == n})
        cells = ["/".join(_f(t.get(k, {}).get((n, r)), 0) for k in IMPLS) for r in reps]
        lines.append(f"- {n} stream{'s' if n > 1 else ''}: " + "; ".join(cells))
    lines += [""] + _cpu_lines(s) + _cpu_table(s) + _ttft_lines(s) + _profile_lines(s) + _check_lines(s) + [NOTES]
    if "serving.png" in plots:
        lines += ["", "![serving.png](serving.png)", ""]
    return "\n".join(lines)


def _cpu_lines(s: dict) -> list[str]:
    rows = []
    for k in IMPLS:
        runs = (s.get("levels") or {}).get(k, [])
        by_n = {}
        for r in runs:
            by_n.setdefault(r["streams"], []).append(r.get("cpu_per_s"))
        if any(x is not None for v in by_n.values() for x in v):
            rows.append(f"{k} " + ", ".join(f"{_f(_median(v), 2)}" for _, v in sorted(by_n.items())))
    if not rows:
        return []
    return ["CPU cores each process kept busy while measured (1, 2, 4, 8 streams): " + "; ".join(rows) + ".", ""]


def _cpu_table(s: dict) -> list[str]:
    """The same per CPU-second of the measured process (the whole job, prefill included), a cross-check that
    waiting for a CPU taken by other work on the machine does not count in."""
    ser = series(s, CPU)
    if not ser.get("ours"):
        return []
    lines = ["Tokens per CPU-second of each process, for the whole job (prefill included; median of the repeats), "
             "and the same ratios by CPU time:", "",
             "| streams | ceiling | engine, no HTTP | ours server | mlx-lm server | ours / ours at 1 | ceiling / "
             "ceiling at 1 | ours / mlx-lm | ours / ceiling | engine / ceiling |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted(ser["ours"]):
        lines.append(
            f"| {n} | " + " | ".join(_f(ser.get(k, {}).get(n), 1) for k in IMPLS) + " | "
            f"{_f(paired(s, 'ours', n, 'ours', 1, CPU))} | {_f(paired(s, 'ceiling', n, 'ceiling', 1, CPU))} | "
            f"{_f(paired(s, 'ours', n, 'mlx-lm', n, CPU))} | {_f(paired(s, 'ours', n, 'ceiling', n, CPU))} | "
            f"{_f(paired(s, 'engine', n, 'ceiling', n, CPU))} |")
    return lines + [""]


def _ttft_lines(s: dict) -> list[str]:
    t = s.get("ttft") or {}
    if not t:
        return []
    lines = ["Time to first token of a new request (its own prompt, 4 tokens), idle and with 7 other requests in "
             "flight:", "", "| server | idle ms | loaded ms | loaded / idle (medians) | others decoding / in flight "
             "when sent |", "|---|---|---|---:|---|"]
    for impl, d in t.items():
        idle = ", ".join(f"{1e3 * x:.0f}" for x in d.get("idle_s", []))
        busy = ", ".join(f"{1e3 * x:.0f}" for x in d.get("loaded_s", []))
        flight = ", ".join(f"{a}/{b}" for a, b in zip(d.get("decoding_at_send", []), d.get("unfinished_at_send", [])))
        lines.append(f"| {impl} | {idle} | {busy} | {_f(d.get('ratio'))} | {flight} |")
    return lines + [""]


def _profile_lines(s: dict) -> list[str]:
    profiles = [p for p in (s.get("profiles") or [s.get("profile")]) if p]
    if not profiles:
        return []
    heads = " | ".join(f"{p['streams']} stream{'s' if p['streams'] > 1 else ''}" for p in profiles)
    lines = ["Where our engine's decode step goes (engine without HTTP, timers on the engine's methods; ms, the "
             f"median over {', '.join(str(p['decode_steps']) for p in profiles)} steps with every row decoding):", "",
             f"| part | {heads} |", "|---|" + "---:|" * len(profiles),
             "| whole decode step | " + " | ".join(f"{p['step_ms']:.2f}" for p in profiles) + " |"]
    for k in profiles[0]["parts_ms"]:
        lines.append(f"| {k} | " + " | ".join(f"{p['parts_ms'][k]:.2f}" for p in profiles) + " |")
    host = [(p["streams"], _host_ms(p), p["step_ms"]) for p in profiles]
    lines += ["", "The engine is synchronous: each step builds the forward graph, evaluates it (`mx.eval` in `_sample`), "
              "then reads every row's token (`.item()`) and does the row's bookkeeping before the next graph is "
              "built, so the host work is added to the computation instead of overlapping it: "
              + ", ".join(f"{h:.1f} of {t:.1f} ms ({100 * h / t:.0f}%) at {n} stream{'s' if n > 1 else ''}"
                          for n, h, t in host)
              + ". What would close it (not changed here): evaluate step t + 1 asynchronously (`mx.async_eval`) "
              "before taking step t's tokens to the host, feeding the sampled tokens as a lazy array, as mlx-lm's "
              "`generate_step` and `BatchGenerator` do (a row that finished at step t costs one wasted row of step "
              "t + 1); sample all greedy rows with one `argmax` over (B, V) instead of one small graph per row; "
              "detokenize off the device thread. The rest of the step is the matmuls themselves, which on this "
              "CPU grow with the batch (see the ceiling)."]
    return lines + [""]


def _host_ms(p: dict) -> float:
    """Milliseconds of a step spent on the host (Python) rather than in ``mx.eval``."""
    parts = p["parts_ms"]
    return sum(v for k, v in parts.items() if not k.startswith(" ") and k != "mx.eval (the computation)")


def _check_lines(s: dict) -> list[str]:
    lines = ["Checks:", ""]
    b = s.get("mlx_lm_batching")
    if b:
        what = "batched" if b["batchable"] else "served one request at a time (its --decode-concurrency never applies)"
        lines.append(f"- mlx-lm's server batches a model only if every cache of `make_prompt_cache(model)` has `merge` "
                     f"(mlx_lm/server.py, `ModelProvider._load`); Llama 4's caches: {', '.join(b['cache_kinds'])}; "
                     f"without `merge`: {', '.join(b['without_merge']) or 'none'} -> {what}")
    c = s.get("check")
    if c:
        lines.append(f"- the same greedy reply from both servers for one prompt: {'yes' if c.get('same_text') else 'NO'} "
                     f"({c['ours'].get('generated')} tokens: \"{c['ours'].get('text', '')[:60]}...\")")
    bad, prompts, cached = [], set(), {}
    for impl, runs in (s.get("levels") or {}).items():
        if impl == "ceiling":
            continue
        for r in runs:
            prompts.update(str(p) for p in r.get("prompt_tokens", []))
            if "cached_tokens" in r:
                cached.setdefault(impl, set()).update(str(p) for p in r["cached_tokens"])
            counts = r.get("generated", [])
            if r.get("errors") or r.get("error") or r.get("finish") != ["length"] \
                    or any(g != s.get("tokens") for g in counts) or r.get("chunks", counts) != counts:
                bad.append(f"{impl} at {r.get('streams')}: finish {r.get('finish')}, generated {counts}, chunks "
                           f"{r.get('chunks')}, errors {r.get('errors') or r.get('error')}")
    lines.append(f"- every stream of every run generated exactly {s.get('tokens')} tokens (one text chunk each on the "
                 f"servers), finish reason 'length'; prompt tokens as the servers counted them: "
                 f"{', '.join(sorted(prompts))}; prompt tokens served from a prompt cache: "
                 + "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in cached.items())
                 if not bad else "- streams not as expected: " + "; ".join(bad))
    return lines + [""]


NOTES = """\
How to read it:
- Ceiling: the bare model (ours, same weights) decoding B rows at once, one synchronous step at a time (forward,
  greedy argmax, `mx.eval`), from B prompts of the streams' length, for as many steps as a stream has tokens;
  tokens/s = B / mean step time (over the total time, as streams are counted: a median would hide the stalls
  that the streams see); "ceiling / one row": its steps taking turns with one row's, the median of
  B x (one-row step time) / (batch step time). On this CPU the matmuls are compute-bound, so a batch of B costs nearly B
  single steps: this ceiling, not B x the single-stream speed, is what a batching server can reach here (on a
  Mac GPU decode is bandwidth-bound and batching pays far more).
- Servers: N streaming clients (httpx, one process on the same machine) send `/v1/completions` at once;
  aggregate tokens/s counts the middle 80% of all tokens by arrival time over the time between them (ramp-up
  and tail left out). For a server that serves one request at a time that window includes its gaps between
  requests (prefill, request setup): what N clients get from it.
- Engine, no HTTP: `mlx_llama4.engine.Engine` in a process of its own, the same prompts (as token ids) and
  counting, one thread per request taking its events: the difference to "ours server" is the HTTP layer's
  share (uvicorn, SSE, a pump thread per request, in the server's process beside the engine's thread).
- The weights are random; lm_head rows are zero but for " word" tokens, so greedy decoding never picks an end or
  special token: every reply is exactly max_tokens long, one text chunk per token, in both servers."""


# ---------------------------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------------------------


def plot(results: dict, out_dir: Path, plt) -> Optional[str]:
    s = results.get("serving")
    if not s or "error" in s:
        return None
    ser = series(s)
    if not ser.get("ours"):
        return None
    style = {"ceiling": dict(marker="^", color="gray", ls="--", label="ceiling: bare model, batch-N step"),
             "engine": dict(marker="d", color="C2", label="ours: engine without HTTP"),
             "ours": dict(marker="o", color="C0", label="ours: mlx-llama4 serve"),
             "mlx-lm": dict(marker="s", color="C1", label="mlx_lm.server")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    for k in IMPLS:
        if ser.get(k):
            xs = sorted(ser[k])
            ax.plot(xs, [ser[k][x] for x in xs], **style[k])
    ours = ser["ours"]
    top = max(ours)
    if ours.get(1):
        xs = [n for n in sorted(ours) if ceiling_speedup(s, n)]
        ax.plot(xs, [ceiling_speedup(s, n) * ours[1] for n in xs], ls=":", color="gray",
                label="ours at 1 stream x the ceiling's batch-N speed-up (paired)")
        ax.plot([top], [GOALS["streams"][1] * ours[1]], marker="*", ms=13, ls="none", color="C0",
                label=f"goal: {GOALS['streams'][1]:g}x ours at 1 stream")
    if ser.get("mlx-lm", {}).get(top):
        ax.plot([top], [GOALS["vs-mlx-lm"][1] * ser["mlx-lm"][top]], marker="*", ms=13, ls="none", color="C1",
                label=f"goal: {GOALS['vs-mlx-lm'][1]:g}x mlx-lm at {top}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ours), [str(x) for x in sorted(ours)])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title("aggregate decode tokens/s vs streams (median of repeats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    t = s.get("ttft") or {}
    names = [k for k in ("ours", "mlx-lm") if (t.get(k) or {}).get("idle_median_s")]
    for i, k in enumerate(names):
        ax.bar([i - 0.2], [1e3 * t[k]["idle_median_s"]], width=0.4, color="C2", label="idle" if i == 0 else None)
        if t[k].get("loaded_median_s"):
            ax.bar([i + 0.2], [1e3 * t[k]["loaded_median_s"]], width=0.4, color="C3",
                   label="7 other requests in flight" if i == 0 else None)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("time to first token, ms (log scale)")
    ax.set_title("TTFT of a new request (median)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    m = s.get("machine") or results.get("machine", {})
    fig.suptitle(f"{MODEL} (hidden 256, 8 layers, 16 experts), MLX {m.get('versions', {}).get('mlx')} CPU, "
                 f"{m.get('cpu')} x {m.get('cpu_count')} (shared, load average {m.get('loadavg_start')}), "
                 f"{str(m.get('date'))[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "serving.png", dpi=120)
    plt.close(fig)
    return "serving.png"
