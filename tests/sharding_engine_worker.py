"""One process of the engine launch in tests/test_sharding_serve.py, under ``mlx.launch --backend ring -n N``:

    python tests/sharding_engine_worker.py OUT_DIR

Process 0 runs an ``Engine`` on its share of the demo model and the others ``follow`` it. Process 0 runs
``requests`` (below): requests whose logits processor fails at their first token, alone (every row of the step
fails) and among others, or at a later token; then writes their events to ``OUT_DIR/rank0.json`` and closes the
engine. The others write ``OUT_DIR/rank{r}.json`` once ``follow`` returns.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MAX_TOKENS = 16


def failing_at(n: int):
    """A logits processor that raises at the ``n``-th token it is asked about (1: the first)."""
    calls = []

    def process(tokens, logits):
        calls.append(n)
        if len(calls) == n:
            raise RuntimeError(f"planted failure at token {n}")
        return logits

    return process


def requests(engine) -> list[list]:
    """Each request's (token, finish_reason, error) events."""

    def submit(text: str, fail_at=None):
        processors = [failing_at(fail_at)] if fail_at else None
        return engine.submit(text, max_tokens=MAX_TOKENS, temperature=0.0, logits_processors=processors)

    def events(handle) -> list:
        return [(e.token, e.finish_reason, e.error) for e in handle]

    out = [events(submit("Who are you?", fail_at=1))]  # alone: the step's only row fails
    together = [submit("What is 3 plus 4?"), submit("Hello!", fail_at=1), submit("Who are you?", fail_at=4),
                submit("What is 2 plus 2?")]
    out += [events(h) for h in together]
    out.append(events(submit("What is 3 plus 4?")))  # the processes are still in step
    return out


def main(out_dir: str) -> None:
    import mlx.core as mx

    from mlx_llama4 import load
    from mlx_llama4.engine import Engine, follow

    group = mx.distributed.init()
    model, processor = load("demo", group=group)
    result: dict = {"rank": group.rank()}
    if group.rank() == 0:
        with Engine(model, processor, max_batch=4) as engine:
            result["events"] = requests(engine)
    else:
        follow(model)
        result["followed"] = True
    (Path(out_dir) / f"rank{group.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
