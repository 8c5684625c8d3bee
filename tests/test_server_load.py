"""A load test on 127.0.0.1: 16 client threads send 64 requests (chat and raw completions, streamed and not,
some with pictures, different lengths) to the server on the real engine and the demo model, greedy. Every
reply must equal its serial result (``generate()`` for the same prompt), none may fail or go missing; the
process's peak memory is reported (``pytest -s`` shows it; also in the JUnit properties).
"""

from __future__ import annotations

import resource
import sys
from concurrent.futures import ThreadPoolExecutor



import mlx.core as mx  # noqa: E402

from mlx_llama4.app.server.app import ServerSettings, create_app  # noqa: E402
from mlx_llama4.app.server.engine_client import EngineClient  # noqa: E402
from mlx_llama4.engine import Engine  # noqa: E402
from server_helpers import ServerThread, expected, openai_client, picture, question  # noqa: E402, F401

THREADS, REQUESTS = 16, 64


def _prompts() -> list[tuple[str, object, int]]:
    """(question, picture or None, max_tokens): 16 distinct requests of different lengths."""
    texts = [("Who are you?", None), ("What is 3 plus 4?", None), ("Hello!", None), ("What is 2 plus 5?", None)]
    pictures = [(q, picture(100 + i, count=1 + i % 3)) for i, q in enumerate(
        ["What shape is this?", "How many shapes are there?", "What colour is the shape?", "Describe the picture."])]
    return [(q, image, max_tokens) for (q, image) in texts + pictures for max_tokens in (8, 40)]


def test_sixteen_threads_sixty_four_requests_all_exact(demo, record_property):  # noqa: F811  (demo: a fixture)
    model, processor = demo
    prompts = _prompts()
    serial = [expected(demo, question(q, image)[1], max_tokens) for q, image, max_tokens in prompts]

    engine = EngineClient(Engine(model, processor, max_batch=8, max_queue=REQUESTS))
    server = ServerThread(create_app(engine, ServerSettings()))
    try:
        def send(i: int) -> tuple[int, str]:
            q, image, max_tokens = prompts[i % len(prompts)]
            c = openai_client(server.url)
            ours = question(q, image)[0]
            if i % 4 == 3 and image is None:  # a raw completion of the same chat prompt
                text = c.completions.create(model="demo", prompt=processor.apply_chat_template(question(q)[1]),
                                            max_tokens=max_tokens, temperature=0.0).choices[0].text
            elif i % 2:
                chunks = c.chat.completions.create(model="demo", messages=ours, max_tokens=max_tokens,
                                                   temperature=0.0, stream=True)
                text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            else:
                text = c.chat.completions.create(model="demo", messages=ours, max_tokens=max_tokens,
                                                 temperature=0.0).choices[0].message.content
            return i, text

        with ThreadPoolExecutor(THREADS) as pool:
            results = dict(pool.map(send, range(REQUESTS), timeout=1800))
        stats = engine.stats()
    finally:
        server.close()
        engine.close()

    assert sorted(results) == list(range(REQUESTS))
    wrong = [i for i in range(REQUESTS) if results[i] != serial[i % len(prompts)]]
    assert not wrong, [(i, results[i], serial[i % len(prompts)]) for i in wrong[:3]]
    assert stats["running"] == 0 and stats["queued"] == 0

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
    mlx_mb = mx.get_peak_memory() / 2**20
    record_property("peak_rss_mb", round(rss_mb))
    record_property("peak_mlx_mb", round(mlx_mb))
    print(f"\nload test: {REQUESTS} requests from {THREADS} threads, all exact; peak RSS {rss_mb:.0f} MB "
          f"(whole test process), MLX peak {mlx_mb:.0f} MB")
