"""The process-wide model and the batching engine that answers every session with it.

One model per process: ``ModelHolder`` holds it as a ``LoadedModel`` (the model, its processor and its
``mlx_llama4.engine.Engine``, whose one device thread runs every session's reply in one batch) and swaps it
under a lock. Handlers run no MLX computation: replies go through the engine, and a model loads on a thread
of its own (``on_own_thread``). MLX keeps streams per thread, and a thread that ran MLX work must let them go
before it ends, or the process may abort at exit; Gradio's pool threads live on and never would, so loading
is not done on them.

Under ``mlx.launch`` the model is split across the launch's processes (this one is process 0; app/cli.py): the
holder keeps the model it started with, as the other processes hold their shares of that one.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def on_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` run on a new thread that lets its MLX streams go before it ends; its result or exception.

    The thread is a daemon, so that quitting during a long load does not wait for it. What it built must be
    evaluated (``mlx_llama4.load`` evaluates the weights), so that other threads can use it.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        import mlx.core as mx

        try:
            outcome["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            outcome["error"] = e
        finally:
            mx.synchronize()
            mx.clear_streams()

    thread = threading.Thread(target=run, name="mlx-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclass(frozen=True)
class EngineOptions:
    """How each loaded model's engine runs (``--max-batch``, ``--kv-bits``, ``--kv-group-size``)."""

    max_batch: int = 8  # replies generated together; the engine queues the others
    max_queue: int = 64  # replies waiting for a row; past that a reply is refused ("busy")
    kv_bits: Optional[int] = None
    kv_group_size: Optional[int] = None  # None: one the model's head size allows


@dataclass(frozen=True)
class LoadedModel:
    """A model, its processor, and the engine that generates with them."""

    name: str
    model: Any
    processor: Any
    engine: Any  # mlx_llama4.engine.Engine


Progress = Callable[[float, str], None]


def _locate(name: str, report: Progress) -> Any:
    """What to hand to ``load``: a checked local folder, a Hub repo resolved to its (downloaded) folder, or
    the name itself ("demo", if the hub resolver does not know it).

    A folder is checked as far as can be done without reading weights (its config.json describes a Llama 4
    model, its safetensors shards are all there), so that a wrong choice fails before anything is unloaded.
    """
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"model folder not found: {path}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a model folder")
        source = path
    else:
        from mlx_llama4.hub import resolve_model_path

        report(0.0, f"Locating {name}" + (" (downloading if needed)" if "/" in name else ""))
        try:
            source = resolve_model_path(name)
        except FileNotFoundError:
            if name != "demo":
                raise
            return name
    from mlx_llama4.config import load_config
    from mlx_llama4.loading import safetensors_files

    load_config(source)
    safetensors_files(source)
    return source


def memory_bytes() -> int:
    """How much memory models may take: Metal's recommended working set, else the machine's RAM."""
    import mlx.core as mx

    info = mx.device_info()
    size = info.get("max_recommended_working_set_size") or info.get("memory_size")
    return int(size) if size else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_memory() -> int:
    """Memory a new KV cache may still take: ``memory_bytes()`` less what MLX holds, and on Linux at most what
    the system has available (other processes use memory too)."""
    import mlx.core as mx

    free = memory_bytes() - mx.get_active_memory()
    try:
        with open("/proc/meminfo") as info:
            available = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
        return min(free, available)
    except (OSError, StopIteration, ValueError, IndexError):  # not Linux
        return free


def _bytes_needed(source: Any) -> int:
    """An upper bound on the memory that loading ``source`` takes: its safetensors files, twice over where
    the CPU backend widens 16-bit weights to float32."""
    from mlx_llama4.hub import resolve_model_path
    from mlx_llama4.loading import default_dtype, safetensors_files

    on_disk = sum(f.stat().st_size for f in safetensors_files(resolve_model_path(source)))
    return on_disk * (2 if default_dtype() is not None else 1)


def _free_memory() -> None:
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


class ModelHolder:
    """The process-wide loaded model and its engine: one at a time, swapped under a lock.

    A new model loads next to the current one when both fit in memory (``FIT``: the memory in use plus
    the new model's size, at most this share of ``memory_bytes()``) and replaces it only once loaded, so a
    failed load changes nothing. When both do not fit, the current model is released first and, if the new
    one fails to load, loaded again. Either way a name, folder or config that is plainly wrong fails before
    anything is released. Releasing a model closes its engine: replies still in it end as "cancelled".
    """

    FIT = 0.9

    def __init__(self, loader: Optional[Callable[[Any], tuple]] = None, engine: EngineOptions = EngineOptions()):
        self._loader = loader
        self.engine_options = engine
        self._lock = threading.Lock()
        self._current: Optional[LoadedModel] = None
        self.loading: Optional[str] = None

    @property
    def current(self) -> Optional[LoadedModel]:
        return self._current

    def load(self, name: str, progress: Optional[Progress] = None) -> LoadedModel:
        """Load ``name`` (a folder, a Hub repo id or "demo"), start its engine and make it current.

        Hub downloads run on the calling thread (so tqdm progress bars show there); reading the weights
        runs on a thread of its own. Raises what ``mlx_llama4.load`` raises (FileNotFoundError, ValueError;
        a ValueError too for KV quantization options this model cannot take); the previous model is then
        current again.
        """
        report = progress or (lambda fraction, text: None)
        with self._lock:
            if self._current is not None and self._current.name == name:
                report(1.0, f"{name} is already loaded")
                return self._current
            sharding = self._current.model.sharding if self._current is not None else None
            if sharding is not None:  # every process of the launch holds a share of this model, and only it
                raise ValueError(f"this app runs under mlx.launch on {sharding.size} processes that share "
                                 f"{self._current.name}: it serves only that model (launch again with --model "
                                 f"{name})")
            source = _locate(name, report)  # before the current model is released: a bad name changes nothing
            previous = self._current.name if self._current is not None else None
            self.loading = name
            try:
                side_by_side = previous is None or self._fits(source)
                if not side_by_side:
                    report(0.2, f"Unloading {previous}: there is no room for both models")
                    self._replace(None)
                report(0.3, f"Loading {name}")
                try:
                    loaded = self._start(name, source)
                except Exception:
                    if not side_by_side:
                        self._restore(previous, report)
                    raise
                self._replace(loaded)  # side by side: the old model answered until now
            finally:
                self.loading = None
            report(1.0, f"Loaded {name}")
            return self._current

    def close(self) -> None:
        """Close the current model's engine (replies still running end as "cancelled") and let it go."""
        with self._lock:
            self._replace(None)

    def _start(self, name: str, source: Any) -> LoadedModel:
        """Load ``source`` and start an engine on it."""
        from mlx_llama4.engine import Engine

        model, processor = on_own_thread(self._load_fn(), source)
        options = self.engine_options
        engine = Engine(model, processor, max_batch=options.max_batch, max_queue=options.max_queue,
                        kv_bits=options.kv_bits, kv_group_size=options.kv_group_size)
        return LoadedModel(name, model, processor, engine)

    def _restore(self, name: str, report: Progress) -> None:
        """Load ``name`` again after a failed switch; if that fails too, no model is current."""
        report(0.6, f"Loading {name} again")
        try:
            self._current = self._start(name, _locate(name, report))
        except Exception as e:  # the caller reports the first error; this one goes to the log
            log.error("could not load %s again: %s", name, e)

    def _load_fn(self) -> Callable[[Any], tuple]:
        if self._loader is not None:
            return self._loader
        from mlx_llama4 import load
        from mlx_llama4.sharding import process_group

        return functools.partial(load, group=process_group())  # under mlx.launch: this process's share

    def _fits(self, source: Any) -> bool:
        """Whether ``source`` can load while the current model stays."""
        import mlx.core as mx

        return mx.get_active_memory() + _bytes_needed(source) <= self.FIT * memory_bytes()

    def _replace(self, new: Optional[LoadedModel]) -> None:
        """Make ``new`` (None: no model) current; close the old model's engine and free its memory."""
        old, self._current = self._current, new
        if old is not None:
            old.engine.close()
            del old
            _free_memory()
