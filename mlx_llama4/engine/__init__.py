"""A continuous-batching generation engine: many requests through one model at once, on one device thread.

    from mlx_llama4 import load
    from mlx_llama4.engine import Engine

    model, processor = load("demo")
    with Engine(model, processor, max_batch=8) as engine:
        handle = engine.submit("Hello!", max_tokens=40)
        for event in handle:
            print(event.text, end="", flush=True)
"""

from .engine import Engine
from .follower import follow
from .requests import EngineFull, Event, Handle, SamplingParams

__all__ = ["Engine", "EngineFull", "Event", "Handle", "SamplingParams", "follow"]
