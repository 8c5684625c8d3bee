"""Converter benchmark on a synthetic multi-GB checkpoint: peak RSS / largest output shard, and wall time,
ours (``mlx_llama4.convert``) against mlx-vlm's converter on the same input. Not a test.

    python -m bench.convert_large                  # ~3.8 GB bf16 Scout-shaped source; 4-bit and bf16 outputs
    python -m bench.convert_large --layers 4       # smaller (~2 GB)
    python -m bench.convert_large --skip-mlx-vlm   # ours only

The source is written once (random bf16 weights, Hugging Face layout and config spellings, 1 GB shards, a small
word-level tokenizer and processor files so that mlx-vlm's converter can load it) into ``--work`` and reused.
Every conversion runs in a fresh process that reports its own peak resident set (``VmHWM``) and the resident set
just before converting (the interpreter and imports). The goal is peak RSS <= 1.5 x the largest output shard.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .convert_bench import _status_kb

VOCAB = 32000
VISION = dict(
    model_type="llama4_vision_model", hidden_size=256, num_attention_heads=4, intermediate_size=1024,
    num_hidden_layers=2, image_size=112, patch_size=14, num_channels=3, hidden_act="gelu", norm_eps=1e-5,
    pixel_shuffle_ratio=0.5, projector_input_dim=512, projector_output_dim=512, vision_output_dim=512,
    multi_modal_projector_bias=False, rope_theta=10000, vision_feature_layer=-1,
    vision_feature_select_strategy="default", initializer_range=0.02, projector_dropout=0.0, attention_dropout=0.0,
)


def text_config(layers: int, hidden: int, experts: int, inter: int) -> dict:
    return dict(
        model_type="llama4_text", hidden_size=hidden, head_dim=128, num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512), num_hidden_layers=layers, intermediate_size=inter,
        intermediate_size_mlp=2 * inter, num_local_experts=experts, num_experts_per_tok=1,
        interleave_moe_layer_step=1, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(layers)],
        attention_chunk_size=8192, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=8192,
        attn_scale=0.1, rms_norm_eps=1e-5, hidden_act="silu", rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                          original_max_position_embeddings=8192),
        max_position_embeddings=262144, attention_bias=False, vocab_size=VOCAB, bos_token_id=1,
        eos_token_id=[2], pad_token_id=0, torch_dtype="bfloat16",
    )


def tensor_shapes(cfg: dict) -> dict[str, tuple]:
    """Hugging Face names and shapes of a Llama4ForConditionalGeneration checkpoint."""
    t, v = cfg["text_config"], cfg["vision_config"]
    D, H, KV, hd = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    E, I = t["num_local_experts"], t["intermediate_size"]
    out = {"language_model.model.embed_tokens.weight": (VOCAB, D), "language_model.lm_head.weight": (VOCAB, D),
           "language_model.model.norm.weight": (D,)}
    for i in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}"
        out.update({
            f"{p}.self_attn.q_proj.weight": (H * hd, D), f"{p}.self_attn.k_proj.weight": (KV * hd, D),
            f"{p}.self_attn.v_proj.weight": (KV * hd, D), f"{p}.self_attn.o_proj.weight": (D, H * hd),
            f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.feed_forward.router.weight": (E, D),
            f"{p}.feed_forward.experts.gate_up_proj": (E, D, 2 * I), f"{p}.feed_forward.experts.down_proj": (E, I, D),
            f"{p}.feed_forward.shared_expert.gate_proj.weight": (I, D),
            f"{p}.feed_forward.shared_expert.up_proj.weight": (I, D),
            f"{p}.feed_forward.shared_expert.down_proj.weight": (D, I),
        })
    V, n = v["hidden_size"], (v["image_size"] // v["patch_size"]) ** 2
    out.update({"vision_model.patch_embedding.linear.weight": (V, 3 * v["patch_size"] ** 2),
                "vision_model.class_embedding": (V,), "vision_model.positional_embedding_vlm": (n + 1, V),
                "vision_model.layernorm_pre.weight": (V,), "vision_model.layernorm_pre.bias": (V,),
                "vision_model.layernorm_post.weight": (V,), "vision_model.layernorm_post.bias": (V,),
                "vision_model.vision_adapter.mlp.fc1.weight": (v["projector_input_dim"], v["intermediate_size"]),
                "vision_model.vision_adapter.mlp.fc2.weight": (v["projector_output_dim"], v["projector_input_dim"]),
                "multi_modal_projector.linear_1.weight": (D, v["vision_output_dim"])})
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.model.layers.{i}"
        for proj in "qkvo":
            out[f"{p}.self_attn.{proj}_proj.weight"], out[f"{p}.self_attn.{proj}_proj.bias"] = (V, V), (V,)
        out.update({f"{p}.mlp.fc1.weight": (v["intermediate_size"], V), f"{p}.mlp.fc1.bias": (v["intermediate_size"],),
                    f"{p}.mlp.fc2.weight": (V, v["intermediate_size"]), f"{p}.mlp.fc2.bias": (V,)})
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{p}.{norm}.weight"], out[f"{p}.{norm}.bias"] = (V,), (V,)
    return out


def _bf16(shape, rng) -> np.ndarray:
    """Random normal * 0.02 as bfloat16 bits (uint16), in pieces to bound memory."""
    out = np.empty(shape, dtype=np.uint16)
    flat = out.reshape(-1)
    step = 1 << 24
    for a in range(0, flat.size, step):
        x = (rng.standard_normal(min(step, flat.size - a), dtype=np.float32) * 0.02).view(np.uint32)
        flat[a : a + x.size] = (x >> 16).astype(np.uint16)
    return out


def write_source(path: Path, layers: int, hidden: int, experts: int, inter: int, shard_bytes: int = 1 << 30) -> Path:
    from mlx_llama4.convert.safetensors_io import ShardWriter
    from mlx_llama4.weights import TensorInfo
    import mlx.core as mx

    cfg = dict(architectures=["Llama4ForConditionalGeneration"], model_type="llama4", boi_token_index=200080,
               eoi_token_index=200081, image_token_index=VOCAB - 1, tie_word_embeddings=False,
               torch_dtype="bfloat16", text_config=text_config(layers, hidden, experts, inter),
               vision_config=dict(VISION))
    marker = path / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == cfg:
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shapes = tensor_shapes(cfg)
    shards, cur, size = [], [], 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    shards.append(cur)
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = ShardWriter(path / fname, [(n, TensorInfo(shapes[n], mx.bfloat16)) for n in names], {"format": "pt"})
        for n in names:
            bits = _bf16(shapes[n], rng)
            if n.endswith(("layernorm.weight", "norm.weight")) and "vision" not in n:
                bits[...] = 0x3F80  # 1.0
            w.write_rows(n, 0, mx.array(bits).view(mx.bfloat16))
            weight_map[n] = fname
        w.close()
        print(f"  wrote {fname} ({(path / fname).stat().st_size / 1e9:.2f} GB)", flush=True)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2]}))
    _write_tokenizer(path)
    marker.write_text(json.dumps(cfg))
    return path


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|finetune_right_pad|>", "<|begin_of_text|>", "<|eot|>", "<|image|>", "<|patch|>",
                "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), 1000)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w10"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                            pad_token="<|finetune_right_pad|>").save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Llama4ImageProcessorFast", "processor_class": "Llama4Processor",
        "size": {"height": VISION["image_size"], "width": VISION["image_size"]}, "max_patches": 4,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Llama4Processor"}))


# -- one conversion in a fresh process ------------------------------------------------------------------------------


def worker(which: str, src: str, out: str, opts: dict) -> None:
    import mlx.core as mx  # noqa: F401  (imports count in the baseline)

    if which == "ours":
        from mlx_llama4.convert import convert
    else:
        from mlx_vlm.convert import convert
    base = _status_kb("VmRSS") * 1024
    t = time.perf_counter()
    if which == "ours":
        convert(src, out, verbose=False, **opts)
    else:
        convert(src, out, **{k: v for k, v in opts.items() if k != "max_shard_size"})
    seconds = time.perf_counter() - t
    print("RESULT " + json.dumps({"seconds": seconds, "peak": _status_kb("VmHWM") * 1024, "base": base}))


def _warm(src: Path) -> None:
    """Read the source once so that every run starts with it in the page cache (else the first run pays for
    the disk and the next ones do not)."""
    buf = bytearray(16 << 20)
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def run(which: str, src: Path, out: Path, opts: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    _warm(src)
    cmd = [sys.executable, "-m", "bench.convert_large", "--worker", which, str(src), str(out), json.dumps(opts)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    r = json.loads(line[7:])
    shards = [f.stat().st_size for f in out.glob("*.safetensors")]
    r.update(largest=max(shards), total=sum(shards), shards=len(shards))
    shutil.rmtree(out, ignore_errors=True)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=4, metavar=("WHICH", "SRC", "OUT", "OPTS"), help=argparse.SUPPRESS)
    ap.add_argument("--work", default=os.environ.get("MLX_LLAMA4_BENCH_CACHE",
                                                     str(Path.home() / ".cache" / "mlx-llama4-bench")) + "/convert")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--skip-mlx-vlm", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic source")
    args = ap.parse_args(argv)
    if args.worker:
        which, src, out, opts = args.worker
        worker(which, src, out, json.loads(opts))
        return 0

    work = Path(args.work)
    print(f"source: {args.layers} layers, hidden {args.hidden}, {args.experts} experts x {args.intermediate}")
    src = write_source(work / "source", args.layers, args.hidden, args.experts, args.intermediate)
    src_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
    print(f"source: {src} ({src_gb:.2f} GB bf16)")
    cases = [
        ("4-bit, 5GB shards", dict(quantize=True, q_bits=4, q_group_size=64)),
        ("bf16, 5GB shards", dict(dtype="bfloat16")),
        ("4-bit, 500MB shards", dict(quantize=True, q_bits=4, q_group_size=64, max_shard_size="500MB")),
    ]
    rows = []
    for label, opts in cases:
        for which in ("ours", "mlx-vlm"):
            if which == "mlx-vlm" and (args.skip_mlx_vlm or "max_shard_size" in opts):
                continue  # mlx-vlm's shard size is fixed at 5 GB
            r = run(which, src, work / f"out-{which}", opts)
            rows.append((label, which, r))
            if "error" in r:
                print(f"{label:22s} {which:8s} FAILED: {r['error'][-400:]}")
                continue
            print(f"{label:22s} {which:8s} {r['seconds']:7.1f} s  peak RSS {r['peak'] / 1e9:5.2f} GB "
                  f"(above start {(r['peak'] - r['base']) / 1e9:5.2f} GB)  largest shard {r['largest'] / 1e9:5.2f} GB "
                  f"({r['shards']} shard(s))  peak/largest {r['peak'] / r['largest']:5.2f}", flush=True)
    print(f"\nload average (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print("goal: peak RSS / largest output shard <= 1.5")
    for label in dict.fromkeys(lbl for lbl, _, _ in rows):
        got = {w: r for lbl, w, r in rows if lbl == label and "error" not in r}
        if "ours" in got:
            ratio = got["ours"]["peak"] / got["ours"]["largest"]
            line = f"{label:22s} ours {ratio:4.2f} ({'met' if ratio <= 1.5 else 'MISSED'})"
            if "mlx-vlm" in got:
                v = got["mlx-vlm"]
                line += (f"; mlx-vlm {v['peak'] / v['largest']:4.2f}; time ours/mlx-vlm "
                         f"{got['ours']['seconds'] / v['seconds']:4.2f}, peak ours/mlx-vlm {got['ours']['peak'] / v['peak']:4.2f}")
            print(line)
    if not args.keep:
        shutil.rmtree(work / "source", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
