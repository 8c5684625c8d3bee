"""9. Long context: peak memory, prefill and decode speed from 2K to 64K tokens, ours and mlx-lm.

Each (library, context) point runs in its own process (``context_point``): load the scaled Scout-shaped
checkpoint, prefill a random prompt through mlx-lm's ``generate_step`` (the loop both libraries generate with)
in each library's own steps (ours: one attention chunk, with the global layers sized for the whole context as
``stream_generate`` does; mlx-lm: 2048 tokens), then decode a few tokens. Recorded: MLX's peak memory
(``mx.get_peak_memory`` after ``mx.reset_peak_memory``), the time of every prefill step (time per 1K tokens as
the context grows), prefill and decode tokens/s. KV in float32, as MLX's CPU backend computes.

The memory goal: within 10% of weights + K/V of the global layers + one chunk per chunked layer (the formula of
``mlx_llama4/long_context.py``) + one bounded step's activations, which is taken as what the smallest context
needs beyond weights and KV; so the peak grows by the global KV's bytes per token, with no quadratic term (the
fitted slope and curvature are reported). Decode at the largest context is measured side by side: both
caches are saved by the point runs and loaded into one process, where the two models take turns step by step
(``text.decode_turns``).

The decode goal, ours / mlx-lm >= 1.25 at 64K, is judged on ``scout-chunk8k``, the same model with the
published attention chunk of 8192: what a decode step costs at 64K depends on the chunk's share of the context
(mlx-lm copies its last chunk of keys and attends to all of it every step; ours attends to the current chunk's
positions so far), 1/8 for Scout, while the chunk of 128 makes it 1/512. Prefilling 64K tokens there would take
about an hour on 2 cores (every chunk's attention, 8192 x 8192 in each chunked layer), so each library's cache
is filled with random keys and values of the shapes it holds at that position (``filled_caches``; a step's cost
does not depend on the values), at a chunk start and half a chunk on, the average over a reply; at 1.5 chunks
the same is measured from caches prefilled for real, as a check of the filling.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from . import checkpoints as ck
from .impls import load_mlx_lm, load_ours, param_bytes
from .text import _fresh, decode_turns, prompt_ids, rel_err

GOALS = {"9-memory": ("<=", 1.10), "9-decode": (">=", 1.25)}
CONTEXTS = [2048, 4096, 8192, 16384, 32768, 65536]
QUICK_CONTEXTS = [2048, 4096, 8192]
MLX_LM_STEP = 2048  # mlx-lm's default prefill_step_size
CHUNK_MODEL = "scout-chunk8k"  # the published attention chunk, for decoding at 64K
DECODE_GOAL_CONTEXT = 65536  # the decode goal holds from 64K tokens on


def cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "mlx-llama4-bench-long-context"


def text_cfg(name: str):
    from mlx_llama4.config import TextConfig

    return TextConfig.from_dict(ck.text_config(name))


def kv_parts(name: str, tokens: int, global_bits: Optional[int] = None) -> dict:
    """The formula's bytes (float32 KV on the CPU): global layers at ``tokens``, chunked layers' one chunk."""
    from mlx_llama4.long_context import kv_bytes_per_position, kv_cache_bytes, kv_layers

    cfg = text_cfg(name)
    n_global, _ = kv_layers(cfg)
    total = kv_cache_bytes(cfg, tokens, global_bits=global_bits, group_size=64, float_bytes=4)
    per_token = n_global * kv_bytes_per_position(cfg, global_bits, 64, float_bytes=4)
    return {"kv_bytes": total, "global_kv_bytes": per_token * tokens, "chunk_kv_bytes": total - per_token * tokens,
            "global_kv_bytes_per_token": per_token}


def context_point(impl: str, name: str, context: int, gen: int, kv_bits: Optional[int] = None,
                  save: bool = False) -> dict:
    """Prefill ``context`` tokens and decode ``gen`` more, in a fresh process; ``kv_bits`` (ours only):
    quantize the global layers' KV, as ``kv_bits="auto"`` does past its threshold. ``save``: write the cache
    to ``cache_dir()`` for ``decode_pair``."""
    from mlx_lm.generate import generate_step

    if impl == "ours":
        from mlx_llama4.cache import quantize_global_layers
        from mlx_llama4.prompt_cache import PromptCache

        model, lm = load_ours(ck.checkpoint(name), "f32")
        prompt_cache = PromptCache(model)
        if kv_bits:
            quantize_global_layers(prompt_cache.layers, kv_bits, 64)
        prompt_cache.reserve(context + gen)  # as stream_generate sizes the global layers
        cache, step = prompt_cache.layers, lm.config.attention_chunk_size
    else:
        _, lm = load_mlx_lm(ck.checkpoint(name), "f32")
        cache, step = lm.make_cache(), MLX_LM_STEP
    _fresh()
    weights = mx.get_active_memory()
    prompt = prompt_ids(context, seed=5)
    mx.eval(prompt)
    stamps: list[tuple[int, float]] = []
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    tokens, times = [], []
    for token, _ in generate_step(prompt, lm, max_tokens=gen + 1, prompt_cache=cache, prefill_step_size=step,
                                  prompt_progress_callback=lambda done, _: stamps.append((done, time.perf_counter()))):
        tokens.append(token)
        times.append(time.perf_counter())
        if len(tokens) == 1:
            peak_prefill = mx.get_peak_memory()
    prefill_s = times[0] - t0
    steps = [(b, 1000 * (tb - ta) / (b - a)) for (a, ta), (b, tb) in zip(stamps, stamps[1:])
             if b > a and b < context]  # per prefill step: (context reached, seconds per 1K tokens)
    out = {
        "impl": impl, "model": name, "context": context, "kv_bits": kv_bits, "prefill_step": step,
        "weights_bytes": weights, "param_bytes": param_bytes(lm),
        "peak_bytes": mx.get_peak_memory(), "peak_prefill_bytes": peak_prefill,
        "cache_bytes": sum(c.nbytes for c in cache),
        "prefill_s": prefill_s, "prefill_tps": context / prefill_s, "steps_s_per_1k": steps,
        "decode_tps": float(1.0 / np.median(np.diff(times))) if len(times) > 2 else None,
    }
    out.update(kv_parts(name, context + gen, kv_bits))
    if save:
        cache_dir().mkdir(exist_ok=True)
        file = cache_dir() / f"{impl}-{name}-{context}{f'-kv{kv_bits}' if kv_bits else ''}.safetensors"
        if impl == "ours":
            from mlx_llama4.prompt_cache import save_prompt_cache

            prompt_cache.keys = np.concatenate([np.asarray(prompt), tokens]).astype(np.int64)  # all were fed
            save_prompt_cache(file, prompt_cache)
        else:
            from mlx_lm.models.cache import save_prompt_cache as save_mlx_lm

            save_mlx_lm(str(file), cache)
        out.update(cache_file=str(file), next_token=int(tokens[-1]))
    return out


def decode_pair(name: str, context: int, files: dict, token: int, steps: int) -> dict:
    """Decode tokens/s at ``context`` from the caches the point runs saved (``files``: "mlx-lm", "ours" and
    possibly "ours, global KV 8-bit" -> file), the models taking turns one synchronous step at a time, all fed
    ``token`` first; each of ours against mlx-lm: the median of per-step time ratios."""
    from mlx_lm.models.cache import load_prompt_cache as load_mlx_lm_cache

    from mlx_llama4.prompt_cache import load_prompt_cache

    model, ours = load_ours(ck.checkpoint(name), "f32")
    _, theirs = load_mlx_lm(ck.checkpoint(name), "f32")
    lms, caches = {}, {}
    for label, file in files.items():
        if label == "mlx-lm":
            lms[label], caches[label] = theirs, load_mlx_lm_cache(file)
        else:
            lms[label], caches[label] = ours, load_prompt_cache(file, model).layers
            for c in caches[label]:  # room for the decode steps, as stream_generate reserves it
                if hasattr(c, "reserve"):
                    c.reserve(c.offset + steps + 8)
    _fresh()
    dec = decode_turns(lms, caches, {k: mx.array([[token]], dtype=mx.int32) for k in lms}, steps)
    for f in files.values():
        Path(f).unlink(missing_ok=True)
    return dict(against_mlx_lm(dec), context=context, steps=steps)


def against_mlx_lm(dec: dict) -> dict:
    """Tokens/s of each model of ``decode_turns``' result, and each of ours against mlx-lm: the median of
    per-step time ratios."""
    mlx_lm = dec["times_s"]["mlx-lm"]
    ratios = {k: statistics.median(b / a for a, b in zip(times, mlx_lm))
              for k, times in dec["times_s"].items() if k != "mlx-lm"}
    return {"decode_tps": dec["tps"], "ratios": ratios, "ratio": ratios["ours"]}


def filled_caches(name: str, context: int, room: int, kv_bits: Optional[int] = None) -> tuple[list, list]:
    """(ours, mlx-lm's) caches as each library holds them after ``context`` positions, filled with random keys
    and values, the same in both (a decode step's cost depends on the shapes, not the values); ``room``: further
    positions ours reserves, as ``stream_generate`` does; ``kv_bits``: ours' global layers quantized.

    Ours: each chunked layer's buffer of one chunk, slot = position % C, the first ``context % C`` slots live;
    each global layer every position. mlx-lm (``ChunkedKVCache`` after ``maybe_trim_front``): the last C
    positions in order, from ``context - C``, of which it masks those before the current chunk (so its buffer is
    ours rolled); ``KVCache``: every position, the buffer full (as after a prefill in steps of 2048), so its first
    step grows it by concatenation, as it would. Both then hold the same keys at the same positions and give the
    same logits (``decode_filled`` checks it)."""
    from mlx_lm.models.cache import ChunkedKVCache, KVCache

    from mlx_llama4.cache import ChunkCache, GlobalCache, quantize_global_layers

    cfg = text_cfg(name)
    C = cfg.attention_chunk_size
    if context < C:
        raise ValueError(f"a filled cache starts past the first chunk ({C} positions), not at {context}")

    def kv(layer: int, n: int) -> tuple[mx.array, mx.array]:  # the same values for both, in arrays of their own
        shape = (1, cfg.num_key_value_heads, n, cfg.head_dim)
        return tuple(mx.random.normal(shape, key=mx.random.key(2 * layer + i)) for i in range(2))

    ours, theirs = [], []
    for layer, uses_rope in enumerate(cfg.uses_rope):
        n = C if uses_rope else context
        if uses_rope:
            a, b = ChunkCache(C), ChunkedKVCache(C)
            a.state = (*kv(layer, n), context, C)
            b.state = (*(mx.roll(x, C - context % C, axis=2) for x in kv(layer, n)), context, C, context - C)
        else:
            a, b = GlobalCache(), KVCache()
            a.state = (*kv(layer, n), context)
            b.state = (*kv(layer, n), context)
        ours.append(a)
        theirs.append(b)
    if kv_bits:
        quantize_global_layers(ours, kv_bits, 64)
    for c in ours:
        if hasattr(c, "reserve"):
            c.reserve(context + room)
    mx.eval([c.state for c in ours + theirs])
    return ours, theirs


def decode_filled(name: str, contexts: list[int], steps: int) -> dict:
    """Decode tokens/s at each of ``contexts`` from ``filled_caches``: ours (float KV, and 8-bit global KV as
    ``kv_bits="auto"`` sets past its threshold) and mlx-lm taking turns step by step; each of ours against
    mlx-lm: the median of per-step time ratios. Before timing, the first step's logits of ours and mlx-lm from
    the same filled caches are compared (``parity_rel_err``)."""
    _, ours = load_ours(ck.checkpoint(name), "f32")
    _, theirs = load_mlx_lm(ck.checkpoint(name), "f32")
    token = mx.array([[int(prompt_ids(1, seed=5)[0])]], dtype=mx.int32)
    out = []
    for context in contexts:
        a, b = filled_caches(name, context, 8)
        parity = rel_err(ours(token, cache=a), theirs(token, cache=b))
        del a, b
        caches = {}
        caches["ours"], caches["mlx-lm"] = filled_caches(name, context, steps + 8)
        caches["ours, global KV 8-bit"], _ = filled_caches(name, context, steps + 8, kv_bits=8)
        lms = {"ours": ours, "mlx-lm": theirs, "ours, global KV 8-bit": ours}
        _fresh()
        dec = decode_turns(lms, caches, {k: token for k in lms}, steps)
        out.append(dict(against_mlx_lm(dec), context=context, steps=steps, parity_rel_err=parity))
        del caches
    return {"model": name, "chunk": text_cfg(name).attention_chunk_size, "points": out}


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------


def with_budget(results: dict) -> list[dict]:
    """Every successful point with its budget: weights + formula KV + the activations ours needs at the
    smallest context (peak - weights - KV there)."""
    pts = [p for p in results.get("points", []) if "peak_bytes" in p]
    ours = sorted((p for p in pts if p["impl"] == "ours" and not p.get("kv_bits")), key=lambda p: p["context"])
    if not ours:
        return []
    first = ours[0]
    activations = first["peak_bytes"] - first["weights_bytes"] - first["kv_bytes"]
    out = []
    for p in pts:
        budget = p["weights_bytes"] + p["kv_bytes"] + activations
        out.append(dict(p, activations_bytes=activations, budget_bytes=budget, ratio=p["peak_bytes"] / budget))
    return out


def fit(points: list[dict]) -> dict:
    """Peak = a + b * N + c * N^2 over the contexts N (least squares): b against the formula's global KV bytes
    per token, and the curvature as bytes at the largest context."""
    n = np.array([p["context"] for p in points], float)
    peak = np.array([p["peak_bytes"] for p in points], float)
    c, b, a = np.polyfit(n, peak, 2) if len(n) >= 3 else (0.0, *np.polyfit(n, peak, 1))
    slope = float(np.polyfit(n, peak, 1)[0])
    return {"linear_slope": slope, "quadratic": float(c), "quadratic_bytes_at_max": float(c * n.max() ** 2),
            "formula_slope": points[0]["global_kv_bytes_per_token"]}


def rows(results: dict, add) -> None:
    """Item 9's rows of the results table, through report.rows' ``add``."""
    lc = results.get("long_context")
    if not lc:
        return
    if "error" in lc:
        add("9", "long context", "?", "-", "-", None, note=f"error: {lc['error']}")
        return
    pts = with_budget(lc)
    by = {(p["impl"], p["context"]): p for p in pts if not p.get("kv_bits")}
    for ctx in sorted({c for _, c in by}):
        o, t = by.get(("ours", ctx)), by.get(("mlx-lm", ctx))
        if o is None:
            continue
        add("9", f"peak MB at {ctx} tokens (ratio: ours / budget)", "scout f32", f"{o['peak_bytes'] / 1e6:.1f}",
            f"{t['peak_bytes'] / 1e6:.1f}" if t else "-", o["ratio"], GOALS["9-memory"],
            note=f"budget {o['budget_bytes'] / 1e6:.1f} MB = weights {o['weights_bytes'] / 1e6:.1f} + KV "
                 f"{o['kv_bytes'] / 1e6:.1f} + step {o['activations_bytes'] / 1e6:.1f}"
                 + (f"; mlx-lm / budget {t['ratio']:.2f}" if t else ""))
    for ctx in sorted({c for _, c in by}):
        o, t = by.get(("ours", ctx)), by.get(("mlx-lm", ctx))
        if o and t:
            add("9", f"prefill tok/s at {ctx} tokens (separate processes)", "scout f32", f"{o['prefill_tps']:.1f}",
                f"{t['prefill_tps']:.1f}", o["prefill_tps"] / t["prefill_tps"])
    d = lc.get("decode")
    if d and "error" not in d:
        for label, ratio in d["ratios"].items():
            add("9", f"decode tok/s at {d['context']} tokens (turns)", f"scout f32 ({label})",
                f"{d['decode_tps'][label]:.1f}", f"{d['decode_tps']['mlx-lm']:.1f}", ratio, None,
                note=f"chunk {ck.CHUNK}: the chunked layers hold 1/{d['context'] // ck.CHUNK} of the context "
                     "(Scout at 64K: 1/8); the goal is judged with the published chunk, below"
                     + ("" if label == "ours" else "; 8-bit: the default past 32768 tokens (kv_bits='auto')"))
    elif d:
        add("9", "decode at the largest context", "scout f32", "-", "-", None, note=f"error: {d['error']}")
    pc = lc.get("published_chunk")
    if pc and "error" not in pc:
        real = pc["prefilled"]
        where = {pc["chunk_start"]: "a chunk start", pc["mid_chunk"]: "half a chunk on: a reply's average"}
        for p in pc["points"]:
            for label, ratio in p["ratios"].items():
                note = f"chunk {pc['chunk']}, filled caches; at {where.get(p['context'], 'the check point')}"
                if p["context"] == pc["check"] and label in real.get("ratios", {}):
                    note += f"; from caches prefilled for real: {real['ratios'][label]:.2f}"
                if label != "ours":
                    note += "; 8-bit: the default past 32768 tokens (kv_bits='auto'), mlx-lm float"
                add("9", f"decode tok/s at {p['context']} tokens (turns)", f"scout-chunk8k f32 ({label})",
                    f"{p['decode_tps'][label]:.1f}", f"{p['decode_tps']['mlx-lm']:.1f}", ratio,
                    GOALS["9-decode"] if p["context"] == pc["mid_chunk"] >= DECODE_GOAL_CONTEXT else None, note=note)
    elif pc:
        add("9", "decode with the published chunk", "scout-chunk8k f32", "-", "-", None, note=f"error: {pc['error']}")
    for p in pts:
        if p.get("kv_bits"):
            add("9", f"peak MB at {p['context']} tokens, global KV {p['kv_bits']}-bit", "scout f32",
                f"{p['peak_bytes'] / 1e6:.1f}", "-", None,
                note=f"KV {p['kv_bytes'] / 1e6:.1f} MB by the formula; prefill {p['prefill_tps']:.1f} tok/s")


def checks(results: dict) -> list[str]:
    """The report's check lines for item 9: filled caches give ours and mlx-lm the same logits."""
    pc = (results.get("long_context") or {}).get("published_chunk")
    if not pc or "error" in pc:
        return []
    errs = ", ".join(f"{p['context']}: {p['parity_rel_err']:.1e}" for p in pc["points"])
    ok = max(p["parity_rel_err"] for p in pc["points"]) <= 1e-3
    return [f"- item 9, {pc['model']}: ours vs mlx-lm logits of the first decode step from the same filled caches, "
            f"rel. err by context {errs} -> {'OK (≤ 1e-3)' if ok else 'DIFFERENT'}"]


def markdown(results: dict) -> str:
    lc = results.get("long_context")
    if not lc or "error" in lc:
        return ""
    pts = with_budget(lc)
    lines = ["## 9. Long context", "",
             "| context | impl | peak MB | weights MB | KV MB (formula) | peak - weights - KV MB | peak / budget | "
             "prefill tok/s | decode tok/s |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(pts, key=lambda p: (p["context"], p["impl"], p.get("kv_bits") or 0)):
        label = p["impl"] + (f", global KV {p['kv_bits']}-bit" if p.get("kv_bits") else "")
        rest = (p["peak_bytes"] - p["weights_bytes"] - p["kv_bytes"]) / 1e6
        decode = f"{p['decode_tps']:.1f}" if p.get("decode_tps") else "-"
        lines.append(f"| {p['context']} | {label} | {p['peak_bytes'] / 1e6:.1f} | {p['weights_bytes'] / 1e6:.1f} | "
                     f"{p['kv_bytes'] / 1e6:.1f} | {rest:.1f} | {p['ratio']:.2f} | {p['prefill_tps']:.1f} | {decode} |")
    for impl in ("ours", "mlx-lm"):
        series = sorted((p for p in pts if p["impl"] == impl and not p.get("kv_bits")), key=lambda p: p["context"])
        if len(series) >= 2:
            f = fit(series)
            lines += ["", f"- {impl}: peak memory grows by {f['linear_slope']:.0f} bytes per token (least squares, "
                          f"{series[0]['context']}-{series[-1]['context']}); the global layers' KV is "
                          f"{f['formula_slope']:.0f} bytes per token; a quadratic fit's N^2 term is "
                          f"{f['quadratic_bytes_at_max'] / 1e6:.1f} MB at {series[-1]['context']} tokens"]
    d = lc.get("decode")
    if d and "error" not in d:
        each = ", ".join(f"{k} {v:.1f} tok/s" for k, v in d["decode_tps"].items())
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in d["ratios"].items())
        lines += [f"- decode at {d['context']} tokens, the models taking turns for {d['steps']} steps: {each}; "
                  f"against mlx-lm (median of per-step ratios): {ratios}"]
    pc = lc.get("published_chunk")
    if pc and "error" not in pc:
        for p in pc["points"]:
            each = ", ".join(f"{k} {v:.1f} tok/s" for k, v in p["decode_tps"].items())
            ratios = ", ".join(f"{k} {v:.2f}" for k, v in p["ratios"].items())
            lines += [f"- decode with the published chunk ({pc['chunk']}) at {p['context']} tokens, filled caches, "
                      f"{p['steps']} steps each: {each}; against mlx-lm: {ratios}"]
        real = pc["prefilled"]
        if "error" not in real:
            ratios = ", ".join(f"{k} {v:.2f}" for k, v in real["ratios"].items())
            lines += [f"- the same at {real['context']} tokens from caches prefilled for real: "
                      + ", ".join(f"{k} {v:.1f} tok/s" for k, v in real["decode_tps"].items())
                      + f"; against mlx-lm: {ratios}"]
    lines += ["", "Method: " + " ".join(__doc__.split("\n\n")[1].split())]
    return "\n".join(lines)


def plot(results: dict, out_dir: Path) -> list[str]:
    lc = results.get("long_context")
    pts = with_budget(lc) if lc and "error" not in lc else []
    if not pts:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"ours": dict(marker="o", color="C0"), "mlx-lm": dict(marker="s", color="C1")}
    m = results["machine"]
    sub = (f"scaled Scout-shaped model (hidden 256, 8 layers, 2 global, chunk 128), float32, MLX "
           f"{m['versions'].get('mlx')} CPU, {m['cpu']} x {m['cpu_count']}, {m['date'][:10]}")
    series = {impl: sorted((p for p in pts if p["impl"] == impl and not p.get("kv_bits")), key=lambda p: p["context"])
              for impl in ("ours", "mlx-lm")}
    files = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl, ps in series.items():
        ax.plot([p["context"] for p in ps], [p["peak_bytes"] / 1e6 for p in ps], label=f"{impl} peak", **style[impl])
    ours = series["ours"]
    if ours:
        xs = [p["context"] for p in ours]
        ax.plot(xs, [p["budget_bytes"] / 1e6 for p in ours], "--", color="C2",
                label="weights + global KV + 1 chunk/chunked layer + step (formula)")
        ax.plot(xs, [1.1 * p["budget_bytes"] / 1e6 for p in ours], ":", color="C2", label="goal: budget + 10%")
        ax.plot(xs, [p["weights_bytes"] / 1e6 for p in ours], ":", color="gray", label="weights")
    for p in pts:
        if p.get("kv_bits"):
            ax.plot([p["context"]], [p["peak_bytes"] / 1e6], marker="*", ms=12, ls="none", color="C0",
                    label=f"ours, global KV {p['kv_bits']}-bit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens (then 8 generated)")
    ax.set_ylabel("peak MLX memory (MB)")
    ax.set_title("peak memory vs context")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.suptitle(sub, fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "long_context_memory.png", dpi=120)
    plt.close(fig)
    files.append("long_context_memory.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for impl, ps in series.items():
        axes[0].plot([p["context"] for p in ps], [p["prefill_tps"] for p in ps], label=impl, **style[impl])
        last = ps[-1] if ps else None
        if last:
            xs, ys = zip(*last["steps_s_per_1k"]) if last["steps_s_per_1k"] else ((), ())
            axes[1].plot(xs, ys, label=f"{impl} (each prefill step, {last['context']}-token prompt)",
                         color=style[impl]["color"], lw=1)
    axes[0].set_xscale("log", base=2)
    axes[0].set_ylim(bottom=0)
    axes[0].set_xlabel("prompt tokens")
    axes[0].set_ylabel("prefill tokens/s (whole prompt)")
    axes[0].set_title("prefill speed vs prompt length")
    axes[1].set_xlabel("context reached")
    axes[1].set_ylabel("seconds per 1K prompt tokens")
    axes[1].set_title("time per 1K tokens as the context grows")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(sub + " - separate processes on a shared machine: absolute speeds follow its load", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "long_context_speed.png", dpi=120)
    plt.close(fig)
    files.append("long_context_speed.png")
    return files


def run(run_worker, quick: bool, contexts: Optional[list[int]] = None, gen: int = 8, decode_steps: int = 24,
        kv8_point: bool = True) -> dict:
    """Item 9 from ``python -m bench``: one worker per (library, context), then the paired decode run."""
    contexts = contexts or (QUICK_CONTEXTS if quick else CONTEXTS)
    points: list[dict[str, Any]] = []
    saved = {}
    for ctx in contexts:
        for impl in ("ours", "mlx-lm"):
            r = run_worker("long_context_point", timeout=4 * 3600, impl=impl, name="scout", context=ctx, gen=gen,
                           save=ctx == contexts[-1])
            points.append(r if "error" not in r else dict(r, impl=impl, context=ctx))
            if ctx == contexts[-1] and "error" not in r:
                saved[impl] = r
    if kv8_point:  # what kv_bits="auto" does past its threshold
        r = run_worker("long_context_point", timeout=4 * 3600, impl="ours", name="scout", context=contexts[-1],
                       gen=gen, kv_bits=8, save=True)
        points.append(r if "error" not in r else dict(r, impl="ours", context=contexts[-1], kv_bits=8))
        if "error" not in r:
            saved["ours, global KV 8-bit"] = r
    out: dict[str, Any] = {"contexts": contexts, "points": points}
    if "ours" in saved and "mlx-lm" in saved:
        out["decode"] = run_worker("long_context_decode", timeout=3600, name="scout", context=contexts[-1],
                                   files={k: p["cache_file"] for k, p in saved.items()},
                                   token=saved["ours"]["next_token"], steps=decode_steps)
    out["published_chunk"] = published_chunk_decode(run_worker, contexts[-1], gen, decode_steps)
    return out


def published_chunk_decode(run_worker, context: int, gen: int, steps: int) -> dict:
    """Decode at ``context`` on ``CHUNK_MODEL`` (the published chunk C): from filled caches at a chunk start (the
    chunked layers' cheapest step for ours) and half a chunk on (a reply's average step, since ours attends to
    the positions of the current chunk so far); checked at 1.5 C against caches prefilled for real."""
    C = text_cfg(CHUNK_MODEL).attention_chunk_size
    start = max(C, context // C * C)
    check = C + C // 2
    points = {}
    for impl in ("ours", "mlx-lm"):
        points[impl] = run_worker("long_context_point", timeout=3600, impl=impl, name=CHUNK_MODEL, context=check,
                                  gen=gen, save=True)
        if "error" in points[impl]:
            return {"error": f"{impl} at {check} tokens: {points[impl]['error']}"}
    out = run_worker("long_context_decode_filled", timeout=3600, name=CHUNK_MODEL,
                     contexts=sorted({check, start, start + C // 2}), steps=steps)
    out["prefilled"] = run_worker("long_context_decode", timeout=3600, name=CHUNK_MODEL, context=check,
                                  files={k: p["cache_file"] for k, p in points.items()},
                                  token=points["ours"]["next_token"], steps=steps)
    out.update(chunk_start=start, mid_chunk=start + C // 2, check=check)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the published models on paper (README, "Long context")
# ---------------------------------------------------------------------------------------------------------------

# The published text configs (config.json of meta-llama/Llama-4-Scout-17B-16E-Instruct and
# Llama-4-Maverick-17B-128E-Instruct): what the formulas read.
SCOUT = dict(
    model_type="llama4_text", vocab_size=202048, hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
    num_key_value_heads=8, head_dim=128, intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=16,
    num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[], attention_chunk_size=8192,
    max_position_embeddings=10485760,
)
MAVERICK = dict(SCOUT, num_local_experts=128, interleave_moe_layer_step=2, max_position_embeddings=1048576)
PAPER_CONTEXTS = {"128K": 2**17, "1M": 2**20, "10M": 10 * 2**20}
ASSUMED_FLOPS = 20e12  # sustained FLOP/s the time column assumes (not measured here)


def matmul_params(cfg) -> tuple[float, float]:
    """(all weights, weights one token multiplies): attention, routed experts (all / top-k), shared expert or
    dense MLP, router, lm_head; embeddings and norms are not multiplied (and small)."""
    d = cfg.hidden_size
    attention = d * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    total = active = d * cfg.vocab_size  # lm_head
    total += d * cfg.vocab_size  # embeddings: stored, not multiplied
    for layer in range(cfg.num_hidden_layers):
        if cfg.is_moe(layer):
            expert = 3 * d * cfg.intermediate_size
            router = d * cfg.num_local_experts
            total += attention + router + expert * (cfg.num_local_experts + 1)
            active += attention + router + expert * (cfg.num_experts_per_tok + 1)
        else:
            mlp = 3 * d * cfg.intermediate_size_mlp
            total += attention + mlp
            active += attention + mlp
    return total, active


def paper_table() -> str:
    """The README's table: KV memory and prefill work of Scout and Maverick at 128K, 1M and 10M tokens."""
    from mlx_llama4.config import TextConfig
    from mlx_llama4.long_context import kv_cache_bytes, prefill_flops

    gib = 2**30
    lines = ["| model | context | KV, bf16 | KV, 8-bit | KV, 4-bit | + 4-bit weights | prefill FLOPs | "
             f"prefill at {ASSUMED_FLOPS / 1e12:.0f} TFLOP/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, spec in (("Scout", SCOUT), ("Maverick", MAVERICK)):
        cfg = TextConfig.from_dict(spec)
        total, active = matmul_params(cfg)
        weights_4bit = total * (4 + 2 * 16 / 64) / 8  # affine 4-bit, group 64, bf16 scale and bias
        for label, n in PAPER_CONTEXTS.items():
            if n > cfg.max_position_embeddings:
                lines.append(f"| {name} | {label} | - | - | - | - | - | beyond its {cfg.max_position_embeddings} "
                             "positions |")
                continue
            kv = {bits: kv_cache_bytes(cfg, n, global_bits=bits) for bits in (None, 8, 4)}
            flops = prefill_flops(cfg, n, active)
            hours = flops / ASSUMED_FLOPS / 3600
            lines.append(f"| {name} | {label} | {kv[None] / gib:.1f} GiB | {kv[8] / gib:.1f} GiB | {kv[4] / gib:.1f} GiB "
                         f"| {(weights_4bit + kv[4]) / gib:.0f} GiB | {flops:.1e} | "
                         + (f"{hours:.1f} h |" if hours >= 1 else f"{hours * 60:.0f} min |"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(paper_table())
