"""Text benchmarks (items 1-4). Each function runs inside one worker process and returns plain JSON data.

The machine these run on may be shared, with load that comes in bursts of seconds. So comparisons are made
between measurements taken as close together as possible, and ratios are medians of such pairs:

- decode: the two models take turns, one decode step each (order alternating), each step synchronous
  (build the graph, evaluate it, take the greedy token, which is fed back); ratio = median of the per-step
  time ratios, tokens/s = 1 / median step time.
- prefill: mlx-lm's ``generate_step`` (the loop both libraries generate with; ours drives it through
  ``model.language_model``) until the first token, the two models alternating run by run; ratio = median of
  the per-pair ratios, tokens/s = prompt tokens / median time to first token.

Process CPU time is recorded next to wall-clock time as a cross-check.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from . import checkpoints as ck
from .impls import LOADERS, load_mlx_lm, load_ours, param_bytes

IMPLS = ("ours", "mlx-lm")
WARMUP_STEPS = 2


def prompt_ids(n: int, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, ck.PROMPT_ID_RANGE, n), dtype=mx.int32)


def _fresh() -> None:
    gc.collect()
    mx.clear_cache()


def rel_err(a: mx.array, b: mx.array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _ratio(a: list[float], b: list[float]) -> float:
    """Median over pairs of b / a: with times, how many times faster a is."""
    return statistics.median(y / x for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------


def timed_generate(lm, prompt: mx.array, max_tokens: int, cache: Any = None, prefill_step_size: int = 2048) -> dict:
    """mlx-lm's generation loop as a user runs it: time to first token, then the interval between tokens."""
    from mlx_lm.generate import generate_step

    _fresh()
    stamps, cpu = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for _tok, _ in generate_step(prompt, lm, max_tokens=max_tokens, prompt_cache=cache,
                                 prefill_step_size=prefill_step_size):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
    prefill, prefill_cpu = stamps[0] - t0, cpu[0] - c0
    out = {"prompt_tokens": int(prompt.size), "generated": len(stamps), "prefill_s": prefill,
           "prefill_cpu_s": prefill_cpu, "prefill_tps": prompt.size / prefill}
    if len(stamps) > 1:
        steps = np.diff(stamps)
        out.update(decode_step_median_s=float(np.median(steps)), decode_tps=float(1.0 / np.median(steps)),
                   decode_tps_cpu=(len(stamps) - 1) / (cpu[-1] - cpu[0]))
    return out


def prefill_pairs(lms: dict, prompt: mx.array, repeats: int) -> dict:
    """Time to first token through ``generate_step``, the models alternating run by run."""
    names = list(lms)
    times: dict[str, list] = {k: [] for k in names}
    cpu: dict[str, list] = {k: [] for k in names}
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            res = timed_generate(lms[k], prompt, 1)
            times[k].append(res["prefill_s"])
            cpu[k].append(res["prefill_cpu_s"])
    return {"times_s": times, "cpu_s": cpu,
            "tps": {k: prompt.size / statistics.median(v) for k, v in times.items()}}


def decode_turns(lms: dict, caches: dict, tokens: dict, steps: int) -> dict:
    """``steps`` decode steps per model, the models taking turns step by step (order alternating); each step
    synchronous, feeding back its greedy token. Returns per-step wall and CPU times (warm-up dropped)."""
    names = list(lms)
    times: dict[str, list] = {k: [] for k in names}
    cpu: dict[str, list] = {k: [] for k in names}
    toks = dict(tokens)
    for i in range(steps + WARMUP_STEPS):
        for k in (names if i % 2 == 0 else names[::-1]):
            t, c = time.perf_counter(), time.process_time()
            logits = lms[k](toks[k], cache=caches[k])
            nxt = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)
            mx.eval(nxt)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            toks[k] = nxt
            if i >= WARMUP_STEPS:
                times[k].append(dt)
                cpu[k].append(dc)
    return {"times_s": times, "cpu_s": cpu, "tps": {k: 1.0 / statistics.median(v) for k, v in times.items()}}


def prefilled(lm, prompt: mx.array) -> tuple[Any, mx.array]:
    """A cache holding ``prompt`` and the greedy next token."""
    cache = lm.make_cache()
    logits = lm(prompt[None], cache=cache)
    tok = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)
    mx.eval(tok, [c.state for c in cache])
    return cache, tok


def parity(lms: dict, prompt: mx.array, steps: int = 4) -> tuple[dict, dict, dict]:
    """Logits of ours and mlx-lm on the same prompt (one forward with a cache), then ``steps`` cached decode
    steps fed the same tokens. Also returns the caches and next tokens, to decode on from there."""
    a_lm, b_lm = lms["ours"], lms["mlx-lm"]
    c1, c2 = a_lm.make_cache(), b_lm.make_cache()
    a, b = a_lm(prompt[None], cache=c1), b_lm(prompt[None], cache=c2)
    mx.eval(a, b)
    prefill_err = rel_err(a, b)
    agree = float((np.asarray(a.argmax(-1)) == np.asarray(b.argmax(-1))).mean())
    decode_err = 0.0
    tok = mx.argmax(a[:, -1:], axis=-1)
    for _ in range(steps):
        a, b = a_lm(tok, cache=c1), b_lm(tok, cache=c2)
        mx.eval(a, b)
        decode_err = max(decode_err, rel_err(a, b))
        tok = mx.argmax(a[:, -1:], axis=-1)
    mx.eval(tok)
    report = {"prompt_tokens": int(prompt.size), "prefill_rel_err": prefill_err, "decode_rel_err": decode_err,
              "decode_steps": steps, "argmax_agreement": agree}
    return report, {"ours": c1, "mlx-lm": c2}, {"ours": tok, "mlx-lm": tok}


def _pair_summary(pre: dict, dec: dict, prompt_tokens: int) -> dict:
    o, t = "ours", "mlx-lm"
    return {
        "prompt_tokens": prompt_tokens,
        "prefill_tps": pre["tps"], "decode_tps": dec["tps"],
        "prefill_ratio": _ratio(pre["times_s"][o], pre["times_s"][t]),
        "prefill_ratio_cpu": _ratio(pre["cpu_s"][o], pre["cpu_s"][t]),
        "decode_ratio": _ratio(dec["times_s"][o], dec["times_s"][t]),
        "decode_ratio_cpu": _ratio(dec["cpu_s"][o], dec["cpu_s"][t]),
    }


# ---------------------------------------------------------------------------------------------------------------
# 1. tokens/s, ours / mlx-lm, short context and past 4 chunks
# ---------------------------------------------------------------------------------------------------------------


def text_speed(name: str, quant: str, repeats: int, short: int, long: int, steps: int) -> dict:
    path = ck.checkpoint(name)
    lms = {"ours": load_ours(path, quant)[1], "mlx-lm": load_mlx_lm(path, quant)[1]}
    out: dict[str, Any] = {"model": name, "quant": quant, "weights_bytes": {k: param_bytes(v) for k, v in lms.items()}}
    # Same logits first; the long prompt's caches then serve the long-context decode timing.
    out["parity"], long_caches, long_tokens = parity(lms, prompt_ids(long))
    for lm in lms.values():  # warm up both generation paths
        timed_generate(lm, prompt_ids(short), 2)
    out["summary"], out["raw"] = {}, {}
    for ctx, n in (("short", short), ("long", long)):
        # a short prefill is over in a fraction of a second: more pairs for the same robustness
        pre = prefill_pairs(lms, prompt_ids(n, seed=2), repeats if ctx == "long" else max(repeats, 5))
        if ctx == "long":
            caches, tokens = long_caches, long_tokens
        else:
            caches, tokens = {}, {}
            for k, lm in lms.items():
                caches[k], tokens[k] = prefilled(lm, prompt_ids(n, seed=3))
        _fresh()
        dec = decode_turns(lms, caches, tokens, steps)
        out["summary"][ctx] = _pair_summary(pre, dec, n)
        out["raw"][ctx] = {"prefill": pre, "decode": dec}
    return out


def mlx_lm_raw_load(name: str, quant: str, short: int, steps: int) -> dict:
    """mlx-lm reading the HF folder as is (strided expert views), against its contiguous load: for reference."""
    path = ck.checkpoint(name)
    lms = {"as-converted": load_mlx_lm(path, quant)[1], "raw-hf-load": load_mlx_lm(path, quant, as_converted=False)[1]}
    caches, tokens = {}, {}
    for k, lm in lms.items():
        caches[k], tokens[k] = prefilled(lm, prompt_ids(short, seed=3))
    dec = decode_turns(lms, caches, tokens, steps)
    return {"model": name, "quant": quant, "decode_tps": dec["tps"],
            "slowdown": _ratio(dec["times_s"]["as-converted"], dec["times_s"]["raw-hf-load"])}


# ---------------------------------------------------------------------------------------------------------------
# 2. decode step time / the sum of its own weight kernels
# ---------------------------------------------------------------------------------------------------------------


def _weight_kernels(lm, expert: int = 3) -> list[tuple[str, Callable]]:
    """Every weight matmul of one decode step (batch 1, one token), each as a zero-argument function:
    q/k/v/o projections, router, the routed expert's gate|up and down gather-matmuls, the shared expert (or the
    dense MLP), lm_head."""
    cfg = lm.config
    D, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    Dq = cfg.num_attention_heads * cfg.head_dim
    x = mx.random.normal((1, 1, D))
    xq = mx.random.normal((1, 1, Dq))
    idx = mx.array([[expert % E]], dtype=mx.uint32)
    xe = mx.random.normal((1, 1, 1, D))
    he = mx.random.normal((1, 1, 1, I))
    hm = mx.random.normal((1, 1, cfg.intermediate_size_mlp))
    hs = mx.random.normal((1, 1, I))
    mx.eval(x, xq, idx, xe, he, hm, hs)
    ks: list[tuple[str, Callable]] = []
    for i, layer in enumerate(lm.layers):
        at = layer.self_attn
        for p in ("q_proj", "k_proj", "v_proj"):
            ks.append((f"{i}.{p}", lambda m=getattr(at, p): m(x)))
        ks.append((f"{i}.o_proj", lambda m=at.o_proj: m(xq)))
        ff = layer.feed_forward
        if hasattr(ff, "router"):
            ks.append((f"{i}.router", lambda m=ff.router: m(x)))
            ks.append((f"{i}.experts.gate_up", lambda m=ff.experts.gate_up_proj: m(xe, idx)))
            ks.append((f"{i}.experts.down", lambda m=ff.experts.down_proj: m(he, idx)))
            mlp, h = ff.shared_expert, hs
        else:
            mlp, h = ff, hm
        for p in ("gate_proj", "up_proj"):
            ks.append((f"{i}.mlp.{p}", lambda m=getattr(mlp, p): m(x)))
        ks.append((f"{i}.mlp.down_proj", lambda m=mlp.down_proj, h=h: m(h)))
    ks.append(("lm_head", lambda: lm.lm_head(x)))
    return ks


def _time_eval(fn: Callable) -> tuple[float, float]:
    """(wall, process CPU) seconds of building and evaluating ``fn()``."""
    t, c = time.perf_counter(), time.process_time()
    mx.eval(fn())
    return time.perf_counter() - t, time.process_time() - c


def kernel_sum(name: str, quant: str, context: int = 64, samples: int = 40, with_mlx_lm: bool = True) -> dict:
    """Our decode step against its weight kernels. Per sample, in turn: one synchronous decode step; the step's
    weight kernels alone (all of them, evaluated together, nothing else); mlx-lm's step on the same weights.
    Ratio = median over samples of step / kernels. Each kernel is also timed alone, one ``mx.eval`` each, for
    the breakdown and for the sum of separately timed kernels (which includes one ``mx.eval`` per kernel)."""
    path = ck.checkpoint(name)
    lms = {"ours": load_ours(path, quant)[1]}
    if with_mlx_lm:
        lms["mlx-lm"] = load_mlx_lm(path, quant)[1]
    caches, toks = {}, {}
    for k, lm in lms.items():
        caches[k], toks[k] = prefilled(lm, prompt_ids(context, seed=3))
    kernels = _weight_kernels(lms["ours"])
    all_kernels = lambda: [fn() for _, fn in kernels]  # noqa: E731

    def step(k):
        def run():
            logits = lms[k](toks[k], cache=caches[k])
            nxt = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)
            toks[k] = nxt
            return nxt
        return run

    jobs = {"step": step("ours"), "kernels": all_kernels}
    if with_mlx_lm:
        jobs["mlx-lm step"] = step("mlx-lm")
    t: dict[str, list] = {k: [] for k in jobs}
    c: dict[str, list] = {k: [] for k in jobs}
    alone: dict[str, list] = {k: [] for k, _ in kernels}
    names = list(jobs)
    for i in range(samples + WARMUP_STEPS):
        for k in (names if i % 2 == 0 else names[::-1]):
            dt, dc = _time_eval(jobs[k])
            if i >= WARMUP_STEPS:
                t[k].append(dt)
                c[k].append(dc)
        if i >= WARMUP_STEPS and i % 4 == 0:
            for k, fn in kernels:
                alone[k].append(_time_eval(fn)[0])
    med = {k: statistics.median(v) for k, v in t.items()}
    per_kernel = {k: statistics.median(v) for k, v in alone.items()}
    groups: dict[str, float] = {}
    for k, v in per_kernel.items():
        g = k.split(".", 1)[-1]
        groups[g] = groups.get(g, 0.0) + v
    cfg = ck.text_config(name)
    return {
        "model": name, "quant": quant, "context": context, "kernels": len(kernels), "samples": samples,
        "hidden_size": cfg["hidden_size"], "layers": cfg["num_hidden_layers"],
        "step_s": med["step"], "kernels_s": med["kernels"], "mlx_lm_step_s": med.get("mlx-lm step"),
        "ratio": _ratio(t["kernels"], t["step"]),
        "ratio_cpu": _ratio(c["kernels"], c["step"]),
        "ratio_min": min(t["step"]) / min(t["kernels"]),
        "mlx_lm_ratio": _ratio(t["kernels"], t["mlx-lm step"]) if with_mlx_lm else None,
        "kernel_sum_alone_s": sum(per_kernel.values()),
        "ratio_alone": med["step"] / sum(per_kernel.values()),
        "alone_by_kind_s": groups,
    }


# ---------------------------------------------------------------------------------------------------------------
# 3. decode time with 128 experts / 16 experts at equal active size
# ---------------------------------------------------------------------------------------------------------------


def expert_scaling(prompt: int, steps: int, with_mlx_lm: bool = True) -> dict:
    """All four models (ours and mlx-lm, 128 and 16 experts) take turns step by step."""
    impls = ["ours"] + (["mlx-lm"] if with_mlx_lm else [])
    lms = {}
    for impl in impls:
        for e, n in (("128", "maverick"), ("16", "maverick16")):
            lms[f"{impl}/{e}"] = LOADERS[impl](ck.checkpoint(n), "f32")[1]
    caches, toks = {}, {}
    for k, lm in lms.items():
        caches[k], toks[k] = prefilled(lm, prompt_ids(prompt, seed=3))
    _fresh()
    dec = decode_turns(lms, caches, toks, steps)
    out = {}
    for impl in impls:
        a, b = f"{impl}/128", f"{impl}/16"
        out[impl] = {
            "decode_tps": {"128": dec["tps"][a], "16": dec["tps"][b]},
            "time_ratio": _ratio(dec["times_s"][b], dec["times_s"][a]),  # median of t128 / t16
            "time_ratio_cpu": _ratio(dec["cpu_s"][b], dec["cpu_s"][a]),
            "weights_bytes": {"128": param_bytes(lms[a]), "16": param_bytes(lms[b])},
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# 4. peak memory (and speed) vs context length; one fresh process per point
# ---------------------------------------------------------------------------------------------------------------


def context_speed(name: str, contexts: list[int], steps: int) -> dict:
    """Tokens/s vs context length, ours and mlx-lm loaded together: at each length one prefill each through
    ``generate_step`` (order alternating), then ``steps`` decode steps each from those caches, taking turns."""
    path = ck.checkpoint(name)
    lms = {"ours": load_ours(path, "f32")[1], "mlx-lm": load_mlx_lm(path, "f32")[1]}
    for lm in lms.values():
        timed_generate(lm, prompt_ids(16), 2)
    points = []
    for j, n in enumerate(contexts):
        prompt = prompt_ids(n, seed=4)
        caches, pre = {}, {}
        for k in (IMPLS if j % 2 == 0 else IMPLS[::-1]):
            caches[k] = lms[k].make_cache()
            pre[k] = timed_generate(lms[k], prompt, 1, cache=caches[k])
        tok = mx.array([[7]], dtype=mx.int32)
        _fresh()
        dec = decode_turns(lms, caches, {k: tok for k in lms}, steps)
        points.append({
            "context": n,
            "prefill_tps": {k: v["prefill_tps"] for k, v in pre.items()},
            "decode_tps": dec["tps"],
            "decode_ratio": _ratio(dec["times_s"]["ours"], dec["times_s"]["mlx-lm"]),
        })
        del caches
    return {"model": name, "points": points}


def kv_budget(name: str, tokens: int, weights: int) -> dict:
    """The goal: weights + K/V of the global (NoPE) layers + one chunk per RoPE layer, + 10%."""
    t = ck.text_config(name)
    n = t["num_hidden_layers"]
    n_nope = sum(1 for i in range(n) if (i + 1) % t["no_rope_layer_interval"] == 0)
    per_pos = 2 * t["num_key_value_heads"] * t["head_dim"] * 4  # K and V, float32
    global_kv = n_nope * tokens * per_pos
    chunk_kv = (n - n_nope) * min(tokens, t["attention_chunk_size"]) * per_pos
    return {"weights": weights, "global_kv": global_kv, "chunk_kv": chunk_kv,
            "budget": int(1.10 * (weights + global_kv + chunk_kv))}


def context_point(impl: str, name: str, context: int, gen: int, prefill_step_size: int | None = None) -> dict:
    """Peak MLX memory of prefilling ``context`` tokens and generating ``gen`` more with ``generate_step``, in
    pieces of ``prefill_step_size`` tokens: by default each library's own (ours: one attention chunk, as
    ``stream_generate`` does; mlx-lm: 2048)."""
    lm = LOADERS[impl](ck.checkpoint(name), "f32")[1]
    if prefill_step_size is None:
        prefill_step_size = lm.config.attention_chunk_size if impl == "ours" else 2048
    _fresh()
    weights = mx.get_active_memory()
    prompt = prompt_ids(context)
    mx.eval(prompt)
    cache = lm.make_cache()
    mx.reset_peak_memory()
    res = timed_generate(lm, prompt, gen, cache=cache, prefill_step_size=prefill_step_size)
    res["peak_bytes"] = mx.get_peak_memory()
    res["weights_bytes"] = weights
    res["param_bytes"] = param_bytes(lm)
    res["cache_bytes"] = sum(c.nbytes for c in cache)
    res.update(impl=impl, model=name, context=context, prefill_step_size=prefill_step_size)
    res.update(kv_budget(name, context + gen, weights))
    return res
