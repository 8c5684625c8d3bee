"""A continuous-batching generation engine: many requests through one model at once, on one device thread.

    from mlx_llama4 import load
    from mlx_llama4.engine import Engine

    model, processor = load("demo")
    with Engine(model, processor, max_batch=8) as engine:
        handle = engine.submit("Hello!", max_tokens=40)
        for event in handle:
            print(event.text, end="", flush=True)

Under ``mlx.launch`` with a model split across processes, process 0 runs the engine and the others ``follow`` it
(``follow_if_launched`` for front doors; follower.py).
"""

from .engine import Engine
from .follower import follow, follow_if_launched
from .requests import EngineFull, Event, Handle, SamplingParams

__all__ = ["Engine", "EngineFull", "Event", "Handle", "SamplingParams", "follow", "follow_if_launched"]
