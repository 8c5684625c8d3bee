"""One benchmark task in a fresh process: ``python -m bench.worker TASK '{"kwarg": ...}' OUT.json``.

Fresh processes keep one configuration's allocations, caches and peak-memory counter out of another's.
"""

from __future__ import annotations

import json
import sys
import traceback


def tasks():
    from . import checkpoints, convert_bench, long_context, serving_load, text, vision

    def build(names: list[str]) -> dict:
        return {n: dict(checkpoints.describe(n), path=str(checkpoints.checkpoint(n))) for n in names}

    return {
        "build": build,
        "text_speed": text.text_speed,
        "mlx_lm_raw_load": text.mlx_lm_raw_load,
        "kernel_sum": text.kernel_sum,
        "expert_scaling": text.expert_scaling,
        "context_point": text.context_point,
        "context_speed": text.context_speed,
        "vision_speed": vision.vision_speed,
        "convert": convert_bench.convert_peak,
        "serving": serving_load.serving_load,
        "long_context_point": long_context.context_point,
        "long_context_decode": long_context.decode_pair,
        "long_context_decode_filled": long_context.decode_filled,
    }


def main(argv: list[str]) -> int:
    task, kwargs, out = argv[0], json.loads(argv[1]), argv[2]
    try:
        result = {"ok": True, "result": tasks()[task](**kwargs)}
    except Exception as e:  # reported by the parent, which goes on with the other items
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
