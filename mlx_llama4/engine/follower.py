"""The engine on every process but 0 of a split model: it carries out process 0's plans (plans.py) on this
process's share of the model and KV, so that every process runs the same batched forward passes in step.

    model, processor = load(path, group=group)     # every process, as for generate()
    if group.rank() == 0:
        engine = Engine(model, processor)           # takes requests; its plans reach the others
    else:
        follow(model)                               # until process 0's engine closes

Front doors (``serve``, ``app``) call ``follow_if_launched`` first: on processes 1, 2, ... it does the above.

A follower makes no decision of its own: which prompt to prefill and how far, which token each row feeds, what
the prefix cache keeps and drops, which rows leave, all come from process 0.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from ..model import Model
from .batch_cache import BatchCache
from .plans import BEAT, receive
from .prefill import feed_piece
from .prefix_cache import restored


class _Mirror:
    """This process's part of process 0's engine state: the batch's KV, the prompt being prefilled, and the
    prefix cache's entries by process 0's ids."""

    def __init__(self, model: Model, kv_bits: Optional[int], kv_group_size: Optional[int]):
        self.model = model
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.batch = BatchCache(model.make_cache(), kv_bits, kv_group_size)
        self.entries: dict[int, list[Any]] = {}
        self.caches: Optional[list[Any]] = None  # the prompt being prefilled
        self.ids = np.zeros(0, np.int32)  # its positions not restored from the prefix cache
        self.embeddings: Optional[mx.array] = None  # (len(ids), D) when they hold images
        self.fed = 0  # of ids

    def start(self, ids: np.ndarray, pixels: Optional[np.ndarray], restore: Optional[list[int]]) -> None:
        """A prompt's prefill starts: its first positions from a prefix-cache entry (``[entry, n]``) or none."""
        self.caches = restored(self.entries[restore[0]], restore[1]) if restore else self.model.make_cache()
        self.ids, self.fed = ids, 0
        self.embeddings = None if pixels is None else self.model.embed(mx.array(ids)[None], mx.array(pixels))[0]

    def prefill(self, n: int, last: bool) -> None:
        """Feed the prompt's next ``n`` positions; the last piece's logits are evaluated, as process 0 samples."""
        embeddings = None if self.embeddings is None else self.embeddings[self.fed : self.fed + n]
        logits = feed_piece(self.model, self.ids[self.fed : self.fed + n], embeddings, self.caches, last,
                            self.kv_bits, self.kv_group_size)
        self.fed += n
        if last:
            mx.eval(logits[:, -1, :])

    def keep(self, entry: Optional[int], dropped: list[int], row: Optional[int]) -> None:
        """The prefix cache keeps the prompt's KV (``row`` None) or a batch row's as ``entry`` (if not None), and
        drops the entries ``dropped``."""
        if entry is not None:
            caches = self.caches if row is None else self.batch.extract(row)
            mx.eval([c.state for c in caches])
            self.entries[entry] = caches
        for e in dropped:
            del self.entries[e]

    def join(self) -> None:
        """The prefilled prompt joins the batch."""
        self.batch.add(self.caches)
        self.drop()

    def drop(self) -> None:
        """The prompt being prefilled is let go (finished at its first token, cancelled, or failed)."""
        self.caches, self.embeddings = None, None

    def decode(self, tokens: list[int]) -> None:
        """One decode step of the batch, each row feeding its token."""
        logits = self.model.language_model(mx.array(tokens, mx.int32)[:, None], cache=self.batch.layers)
        mx.eval(logits[:, -1, :])

    def filter(self, rows: list[int]) -> None:
        """Keep these rows of the batch, in this order."""
        self.batch.filter(rows)


def follow(model: Model) -> None:
    """Carry out process 0's engine plans on this process's share of ``model`` until its engine closes.

    Call it on every process but 0 of a model split across processes (``load(..., group=...)``) while process 0
    runs an ``Engine`` on it. Between plans of an idle engine it sleeps (plans.py). A failure here (process 0
    gone: ``ConnectionError``; too little memory) raises: under ``mlx.launch``, this process then exits with an
    error and the launcher ends the others.
    """
    sharding = model.sharding
    if sharding is None or sharding.group.rank() == 0:
        raise ValueError("follow() runs on processes 1, 2, ... of a model split across processes; process 0 runs "
                         "the Engine")
    mirror: Optional[_Mirror] = None
    try:
        while True:
            for name, *args in receive(sharding.group):
                if name == "stop":
                    return
                if name == "engine":
                    mirror = _Mirror(model, *args)
                elif name == "idle":
                    time.sleep(BEAT)
                else:
                    getattr(mirror, name)(*args)
    finally:
        mirror = None
        mx.clear_cache()


def follow_if_launched(model: str, revision: Optional[str] = None) -> bool:
    """Under ``mlx.launch`` on process 1, 2, ...: load this process's share of ``model`` (a folder, a Hub repo id
    or "demo"), follow process 0's engine until it closes, and return True. Alone or on process 0, return False
    at once: the caller serves.

    Ctrl-C reaches every process of a launch on one terminal: a follower ignores it and stops when process 0's
    engine, which closes on it, says so. If process 0 dies instead, ``mlx.launch`` ends the others.
    """
    from ..loading import load
    from ..sharding import process_group

    group = process_group()
    if group is None or group.rank() == 0:
        return False
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loaded, _ = load(model, revision=revision, group=group)
    follow(loaded)
    return True
