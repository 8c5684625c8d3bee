"""Item 6: the converter's peak resident memory against its largest output shard (goal: peak RSS
<= 1.5 x the largest output shard).

This is the quick version, on a 0.8 GB source, where the interpreter's own ~0.3 GB weigh heavily; the
multi-GB measurement (ours against mlx-vlm's converter) is ``python -m bench.convert_large``.

Runs ``mlx_llama4.convert.convert`` on the Maverick-shaped float32 checkpoint (~0.8 GB, expert tensors of
~134 MB each) in a fresh process. Peak RSS is the kernel's high-water mark (``VmHWM``), reset just before the
conversion (``/proc/self/clear_refs``) so the interpreter and imports count only as the baseline; both the raw
peak and the peak above that baseline are reported. Pages the converter reads through the page cache are not
resident memory of the process and do not count.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from . import checkpoints as ck


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def convert_peak(name: str = "maverick", quantize: bool = False, dtype: str | None = "bfloat16",
                 max_shard_size: str | None = None, q_bits: int = 4, q_group_size: int = 64) -> dict:
    """``max_shard_size`` None: the converter's default (5 GB, so one shard here)."""
    try:
        from mlx_llama4.convert import convert
    except ImportError as e:
        return {"status": "not ready", "reason": f"mlx_llama4.convert.convert is not importable ({e})"}

    src = ck.checkpoint(name)
    out_root = Path(tempfile.mkdtemp(prefix="mlx-llama4-bench-convert-"))
    out = out_root / "out"
    kwargs = dict(quantize=quantize, dtype=dtype, verbose=False)
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    if quantize:
        kwargs.update(q_bits=q_bits, q_group_size=q_group_size)
    try:
        import mlx.core as mx  # noqa: F401  (imported before the baseline is taken)

        reset = _reset_peak()
        base = _status_kb("VmRSS") * 1024
        t = time.perf_counter()
        convert(src, out, **kwargs)
        seconds = time.perf_counter() - t
        peak = _status_kb("VmHWM") * 1024
        shards = sorted(out.glob("*.safetensors"))
        sizes = [f.stat().st_size for f in shards]
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        largest = max(sizes)
        return {
            "status": "ok", "source": name, "source_bytes": src_bytes, "options": kwargs, "seconds": seconds,
            "shards": len(sizes), "largest_shard_bytes": largest, "output_bytes": sum(sizes),
            "baseline_rss_bytes": base, "peak_rss_bytes": peak, "peak_above_baseline_bytes": peak - base,
            "peak_reset": reset, "ratio": peak / largest, "ratio_above_baseline": (peak - base) / largest,
        }
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
