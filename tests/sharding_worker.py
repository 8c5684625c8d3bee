"""One process of a sharded run, started by tests/test_sharding_launch.py under ``mlx.launch --backend ring -n N``:

    python tests/sharding_worker.py SPEC.json OUT_DIR

For each checkpoint of the spec it loads this process's share (its parameter bytes by kind and the peak memory
of loading), computes logits for a batch (one call) and in irregular cached steps, and, where asked, generates
greedily from a text and an image prompt and samples with a seed. Then it runs the spec's command lines
(``mlx_llama4.cli.main``; their output is the launch's only standard output). It writes ``OUT_DIR/rank{r}.json``
and the logits as ``OUT_DIR/{name}-rank{r}-{full,steps}.npy``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

STEPS = [7, 1, 25, 3, 11]  # cached steps over ids[:1, :47]; the third crosses the chunk boundary at 32


def parameter_bytes(model) -> dict[str, int]:
    """Bytes of the model's parameters by kind: in the decoder layers attention, routed experts, MLPs (shared
    expert and dense layers) and the rest (norms, routers); outside them embeddings, final norm, lm_head, vision."""
    kinds = {"attention": 0, "experts": 0, "mlp": 0, "layer_rest": 0, "outside": 0}
    for name, array in tree_flatten(model.parameters()):
        if not name.startswith("language_model.model.layers."):
            kind = "outside"
        elif ".self_attn." in name:
            kind = "attention"
        elif ".feed_forward.experts." in name:
            kind = "experts"
        elif ".feed_forward." in name and ".router." not in name:
            kind = "mlp"
        else:
            kind = "layer_rest"
        kinds[kind] += array.nbytes
    return kinds


def token_runs(model, processor, generation: dict) -> dict[str, list[int]]:
    """Greedy tokens for a text and an image prompt, and seeded samples (after seeding each process
    differently, so that only taking process 0's token keeps the processes together)."""
    from PIL import Image

    from mlx_llama4 import stream_generate

    image = Image.open(generation["image"])
    n = generation["max_tokens"]
    runs = {
        "text": [c.token for c in stream_generate(model, processor, generation["text"], max_tokens=n,
                                                  temperature=0.0)],
        "image": [c.token for c in stream_generate(model, processor, generation["image_prompt"], images=[image],
                                                   max_tokens=n, temperature=0.0)],
    }
    mx.random.seed(1000 + mx.distributed.init().rank())
    runs["sampled"] = [c.token for c in stream_generate(model, processor, generation["text"], max_tokens=n,
                                                        temperature=1.0)]
    return runs


def main(spec_file: str, out_dir: str) -> None:
    from mlx_llama4 import load
    from mlx_llama4.cli import main as cli

    spec = json.loads(Path(spec_file).read_text())
    group = mx.distributed.init()
    rank, out = group.rank(), Path(out_dir)
    ids = np.load(spec["ids"])
    result = {"rank": rank, "size": group.size(), "checkpoints": {}}
    for ckpt in spec["checkpoints"]:
        name = ckpt["name"]
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        model, processor = load(ckpt["path"], dtype=mx.float32, group=group, parallel=spec["parallel"],
                                layers_per_rank=spec.get("layers_per_rank"))
        peak = mx.get_peak_memory() - base
        np.save(out / f"{name}-rank{rank}-full.npy", np.array(model(mx.array(ids))))
        cache, pieces, pos = model.make_cache(), [], 0
        for n in STEPS:
            pieces.append(np.array(model(mx.array(ids[:1, pos : pos + n]), cache=cache)))
            pos += n
        np.save(out / f"{name}-rank{rank}-steps.npy", np.concatenate(pieces, axis=1))
        info = {"load_peak": peak, "bytes": parameter_bytes(model), "cache_layers": len(cache)}
        if ckpt.get("generate"):
            info["tokens"] = token_runs(model, processor, spec["generation"])
        result["checkpoints"][name] = info
        del model, cache
    result["exit_codes"] = [cli(args) for args in spec.get("command_lines", [])]
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
