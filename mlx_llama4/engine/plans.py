"""Engine plans: how process 0's engine keeps the other processes of a split model in step (README.md, "Several
Macs").

Process 0 schedules: it takes the requests, samples every token (logits processors, seeds and sampling settings
stay there) and decides which rows join and leave the batch and what the prefix cache keeps. Each change the
other processes must mirror on their share of the KV (a prompt starting its prefill, KV kept in or dropped from
the prefix cache, rows leaving the batch) is recorded as an operation; before each forward pass the operations
so far and the pass itself (a prefill piece, or a decode step with each row's token) go to every process in one
message. The others only carry the plan out (``follower.follow``), so they feed process 0's tokens.

A message is bytes summed across the group: process 0's bytes plus the others' zeros, a head of ``HEAD`` bytes
in one sum and the rest, if any (a prompt's token ids and pixels), in a second.

If a process of the group dies, a collective may never return on the others (the ring backend's sends block):
``mlx.launch`` then stops the other processes, and process 0's engine, closing, waits at most ``CLOSE_WAIT`` for
its device thread. If process 0 dies, a follower's next plan is empty, and it raises ``ConnectionError``.

While the engine is idle the others must not wait inside a collective: MLX's ring backend waits by polling its
sockets, a busy loop. So an idle engine sends an "idle" plan every ``BEAT`` seconds, and after it both sides
sleep until the next: a request that comes in meanwhile waits at most ``BEAT`` for the other processes.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Optional

import mlx.core as mx
import numpy as np

BEAT = 0.05  # seconds between an idle engine's plans
CLOSE_WAIT = 30.0  # seconds a closing engine waits for its step and last plan (a gone process blocks them forever)
HEAD = 1024  # bytes of a message in its first sum: a decode step's tokens fit


def encode(ops: list[tuple]) -> bytes:
    """``ops`` (tuples of JSON values and numpy arrays) as bytes: the JSON's length, the JSON, the arrays."""
    blobs: list[bytes] = []
    at = 0

    def array(x: Any) -> dict:
        nonlocal at
        if not isinstance(x, np.ndarray):
            raise TypeError(f"a plan holds JSON values and numpy arrays, not {type(x).__name__}")
        blobs.append(np.ascontiguousarray(x).tobytes())
        ref = {"at": at, "dtype": x.dtype.str, "shape": list(x.shape)}
        at += len(blobs[-1])
        return ref

    text = json.dumps(ops, default=array).encode()
    return struct.pack("<I", len(text)) + text + b"".join(blobs)


def decode(data: bytes) -> list[list]:
    """The operations ``encode`` wrote, tuples as lists, arrays as read-only numpy views of ``data``."""
    (n,) = struct.unpack_from("<I", data)
    body = memoryview(data)[4 + n :]

    def array(obj: dict) -> Any:
        if set(obj) != {"at", "dtype", "shape"}:
            return obj
        dtype = np.dtype(obj["dtype"])
        count = int(np.prod(obj["shape"], dtype=np.int64))
        return np.frombuffer(body, dtype, count, obj["at"]).reshape(obj["shape"])

    return json.loads(bytes(data[4 : 4 + n]), object_hook=array)


def _summed(data: np.ndarray, group: mx.distributed.Group) -> np.ndarray:
    return np.array(mx.distributed.all_sum(mx.array(data), group=group, stream=mx.cpu))


def exchange(group: mx.distributed.Group, message: Optional[bytes] = None) -> bytes:
    """Process 0's ``message``, on every process of ``group`` (the others pass None)."""
    head = np.zeros(HEAD, np.uint8)
    if message is not None:
        message = struct.pack("<Q", len(message)) + message
        head[: min(len(message), HEAD)] = np.frombuffer(message[:HEAD], np.uint8)
    head = _summed(head, group)
    size = 8 + struct.unpack_from("<Q", head.tobytes())[0]
    if size == 8:  # no message is empty: process 0 has gone (the ring backend then gives zeros)
        raise ConnectionError("process 0 has stopped without closing its engine")
    if size <= HEAD:
        return head[8:size].tobytes()
    rest = np.zeros(size - HEAD, np.uint8)
    if message is not None:
        rest[:] = np.frombuffer(message[HEAD:], np.uint8)
    return head[8:].tobytes() + _summed(rest, group).tobytes()


def receive(group: mx.distributed.Group) -> list[list]:
    """The next plan from process 0: its operations, each a list ``[name, *arguments]``."""
    return decode(exchange(group))


class PlanSender:
    """Process 0's side. With no group (a model in one process) every call does nothing."""

    def __init__(self, group: Optional[mx.distributed.Group]):
        self.group = group
        self.beat = BEAT if group is not None else None  # how long an idle engine waits between plans
        self.close_wait = CLOSE_WAIT if group is not None else None  # how long closing waits for the device thread
        self._ops: list[tuple] = []
        self._sent = False

    def record(self, *op: Any) -> None:
        """Note a change the other processes make when the next plan reaches them."""
        if self.group is not None:
            self._ops.append(op)

    def send(self, *op: Any) -> None:
        """Send the changes noted so far and ``op``, a forward pass that every process now runs."""
        if self.group is not None:
            self._flush(op)
            self._sent = True

    def idle(self) -> None:
        """End of an engine step: if it sent nothing (no work), an "idle" plan."""
        if self.group is not None and not self._sent:
            self._flush(("idle",))
        self._sent = False

    def stop(self) -> None:
        """The last plan: the other processes return from ``follow``."""
        if self.group is not None:
            self._flush(("stop",))

    def _flush(self, op: tuple) -> None:
        ops, self._ops = [*self._ops, op], []
        exchange(self.group, encode(ops))
