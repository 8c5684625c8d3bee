"""The one thread that touches MLX, and the process-wide holder of the loaded model.

MLX streams are thread-local and a lazy graph must be evaluated on the thread that built it, while Gradio
runs handlers on a pool of threads. So every MLX call (loading a model, building a prompt cache, every
generation step) runs on a single ``DeviceWorker`` thread, one job at a time; handlers only wait for
results. ``DeviceWorker.stream`` runs an iterator there and hands its items over, and closing the
consumer (what Gradio does when Stop is pressed) closes the iterator on the device thread, which stops
the MLX work between two steps.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

_ITEM, _ERROR, _DONE = "item", "error", "done"


class Stopped(Exception):
    """Raised on the device thread (from a progress callback) to abandon work the consumer no longer wants."""


class DeviceWorker:
    """A single daemon thread that runs submitted jobs in order (a daemon, so that quitting the app never
    waits for a long reply to finish)."""

    def __init__(self, name: str = "mlx-device"):
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._running = 0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()

    @property
    def idle(self) -> bool:
        """True when no job is queued or running."""
        with self._lock:
            return self._running == 0

    def _submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            self._running += 1

        def job() -> None:
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as e:  # handed to the caller
                        future.set_exception(e)
            finally:
                with self._lock:
                    self._running -= 1

        self._jobs.put(job)
        return future

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the device thread and return its result (or raise its exception)."""
        return self._submit(fn, *args, **kwargs).result()

    def stream(self, make_iterator: Callable[[], Iterator[T]], stop: threading.Event,
               heartbeat: float = 0.25) -> Iterator[list[T]]:
        """Iterate ``make_iterator()`` on the device thread and yield its items here, in batches.

        Each batch holds every item that arrived since the last one (so a slow consumer, such as a browser
        re-rendering the chat, gets fewer, larger updates); an empty batch is yielded whenever
        ``heartbeat`` seconds pass without an item, so that a consumer waiting on a long step (a prefill)
        can still be closed. Closing the returned generator sets ``stop``; the device side then closes
        the iterator after its current step. Exceptions are re-raised here.
        """
        items: queue.Queue = queue.Queue()

        def pump() -> None:
            iterator = None
            try:
                if stop.is_set():  # stopped while waiting for the device: nothing to start
                    return
                iterator = make_iterator()
                for item in iterator:
                    items.put((_ITEM, item))
                    if stop.is_set():
                        break
            except Stopped:
                pass
            except BaseException as e:  # handed to the consumer
                items.put((_ERROR, e))
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
                items.put((_DONE, None))

        self._submit(pump)
        try:
            while True:
                try:
                    received = [items.get(timeout=heartbeat)]
                except queue.Empty:
                    yield []
                    continue
                while True:
                    try:
                        received.append(items.get_nowait())
                    except queue.Empty:
                        break
                batch = [value for kind, value in received if kind == _ITEM]
                if batch:
                    yield batch
                for kind, value in received:
                    if kind == _ERROR:
                        raise value
                    if kind == _DONE:
                        return
        finally:
            stop.set()

    def shutdown(self) -> None:
        """Let the thread end after the jobs already submitted."""
        self._jobs.put(None)


@dataclass(frozen=True)
class LoadedModel:
    """A model and its processor; ``generation`` counts loads, so prompt caches can tell models apart."""

    name: str
    model: Any
    processor: Any
    generation: int


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
    """The process-wide loaded model: one at a time, swapped under a lock, loaded on the device thread.

    A new model loads next to the current one when both fit in memory (``FIT``: the memory in use plus
    the new model's size, at most this share of ``memory_bytes()``) and replaces it only once loaded, so a
    failed load changes nothing. When both do not fit, the current model is released first and, if the new
    one fails to load, loaded again. Either way a name, folder or config that is plainly wrong fails before
    anything is released. ``on_release`` callbacks run when a model is let go, so that whatever refers to
    it (per-session prompt caches) can let go of it too.
    """

    FIT = 0.9

    def __init__(self, worker: DeviceWorker, loader: Optional[Callable[[Any], tuple]] = None):
        self.worker = worker
        self._loader = loader
        self._lock = threading.Lock()
        self._current: Optional[LoadedModel] = None
        self._generation = 0
        self.on_release: list[Callable[[], None]] = []
        self.loading: Optional[str] = None

    @property
    def current(self) -> Optional[LoadedModel]:
        return self._current

    def load(self, name: str, progress: Optional[Progress] = None) -> LoadedModel:
        """Load ``name`` (a folder, a Hub repo id or "demo") and make it current.

        Hub downloads run on the calling thread (so tqdm progress bars show there); reading the weights
        runs on the device thread. Raises what ``mlx_llama4.load`` raises (FileNotFoundError, ValueError);
        the previous model is then current again.
        """
        report = progress or (lambda fraction, text: None)
        with self._lock:
            if self._current is not None and self._current.name == name:
                report(1.0, f"{name} is already loaded")
                return self._current
            source = _locate(name, report)  # before the current model is released: a bad name changes nothing
            previous = self._current.name if self._current is not None else None
            self.loading = name
            try:
                side_by_side = previous is None or self.worker.call(self._fits, source)
                if not side_by_side:
                    report(0.2, f"Unloading {previous}: there is no room for both models")
                    self._current = None
                    self._let_go()
                report(0.3, f"Loading {name}")
                try:
                    loaded = self.worker.call(self._load_fn(), source)
                except Exception:
                    if not side_by_side:
                        self._restore(previous, report)
                    raise
                self._install(name, loaded)
                del loaded
                if previous is not None and side_by_side:
                    self._let_go()
            finally:
                self.loading = None
            report(1.0, f"Loaded {name}")
            return self._current

    def _restore(self, name: str, report: Progress) -> None:
        """Load ``name`` again after a failed switch; if that fails too, no model is current."""
        report(0.6, f"Loading {name} again")
        try:
            self._install(name, self.worker.call(self._load_fn(), _locate(name, report)))
        except Exception as e:  # the caller reports the first error; this one goes to the log
            log.error("could not load %s again: %s", name, e)

    def _load_fn(self) -> Callable[[Any], tuple]:
        if self._loader is not None:
            return self._loader
        from mlx_llama4 import load

        return load

    def _fits(self, source: Any) -> bool:
        """Whether ``source`` can load while the current model stays (run on the device thread)."""
        import mlx.core as mx

        return mx.get_active_memory() + _bytes_needed(source) <= self.FIT * memory_bytes()

    def _install(self, name: str, loaded: tuple) -> None:
        self._generation += 1
        self._current = LoadedModel(name, loaded[0], loaded[1], self._generation)

    def _let_go(self) -> None:
        """After the current model was replaced or dropped: release what refers to the old one, free memory."""
        for callback in self.on_release:
            callback()
        self.worker.call(_free_memory)
