"""The generation engine against the one-sequence path: greedy tokens under continuous batching equal serial
``stream_generate`` token for token; prefix-cache reuse is exact; cancellation, queue bound, seeds, stop
strings and logprobs. Tiny float32 checkpoints with the real tokenizer and attention chunks of 8."""

import asyncio
import contextlib
import threading

import mlx.core as mx
import numpy as np
import pytest
from real_vocab import build_checkpoint, random_image

from mlx_llama4 import load, stream_generate
from mlx_llama4.engine import Engine, EngineFull
from mlx_llama4.engine.prefix_cache import PrefixCache
from mlx_llama4.text_stream import TextStream, special_token_ids

CHUNK = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    build_checkpoint(folder, {})  # attention chunks of 8, 56-px tiles of 4 tokens
    model, processor = load(folder, dtype=mx.float32)
    assert model.config.text.attention_chunk_size == CHUNK
    return model, processor


def _serial(model, processor, prompt, images=None, **kw):
    return [c.token for c in stream_generate(model, processor, prompt, images, temperature=0.0, **kw)]


def _one_sequence_logprobs(model, processor, prompt, tokens):
    """log-softmax of one full forward over the prompt and ``tokens`` (but the last): (len(tokens), V)."""
    inputs = processor(messages=prompt)
    ids = inputs["input_ids"][0].tolist()
    pixels = None if inputs["pixel_values"] is None else mx.array(inputs["pixel_values"])
    logits = np.array(model(mx.array(ids + tokens[:-1])[None], pixel_values=pixels), np.float64)[0, len(ids) - 1 :]
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _assert_exact(model, processor, prompt, events):
    """The reply is the serial one, and every step's logits are the one-sequence logits (so the KV it was
    computed from is right, not merely close enough to keep the greedy tokens)."""
    tokens = [e.token for e in events]
    assert tokens == _serial(model, processor, prompt, max_tokens=len(tokens))
    reference = _one_sequence_logprobs(model, processor, prompt, tokens)
    assert max(abs(e.logprob - row[t]) for e, row, t in zip(events, reference, tokens)) <= 1e-4


def _tokens(handle):
    return [e.token for e in handle]


def _take(events, n):
    return [next(events).token for _ in range(n)]


def _image_turn(text, n=1):
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(n)), {"type": "text", "text": text}]}]


def test_batched_greedy_equals_serial(tiny):
    """8 requests of different lengths (3 with images, one as raw token ids) through 3 rows: they queue, join
    while others decode, and leave at different steps; each gets exactly its serial tokens."""
    model, processor = tiny
    count = "Count with me: one two three four five six seven eight nine ten eleven."
    requests = [
        ("Hi", None, 12),
        ("Tell me a long story about a cat, a dog and a bird who live in a house by the sea.", None, 40),
        (_image_turn("What is this?"), [random_image(seed=1)], 30),
        (count, None, 25),
        ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why?"}], None, 9),
        ("Describe both pictures.", [random_image(90, 60, seed=2), random_image(50, 50, seed=3)], 20),
        (processor(messages=count)["input_ids"][0].tolist(), None, 15),  # token ids: the same prompt, raw
        (_image_turn("And this one, in detail?"), [random_image(130, 40, seed=4)], 33),
    ]
    expected = [_serial(model, processor, count if isinstance(p[0], int) else p, imgs, max_tokens=n)
                for p, imgs, n in requests]
    with Engine(model, processor, max_batch=3, prefill_step=5) as engine:
        submit = lambda i: iter(engine.submit(requests[i][0], images=requests[i][1], max_tokens=requests[i][2],  # noqa
                                              temperature=0.0))
        streams = {i: submit(i) for i in range(3)}
        got = {1: _take(streams[1], 4)}  # mid-run: rows are decoding
        streams.update({i: submit(i) for i in range(3, 6)})
        got[1] += _take(streams[1], 6)
        streams.update({i: submit(i) for i in range(6, 8)})
        for i, stream in streams.items():
            got[i] = got.get(i, []) + [e.token for e in stream]
        stats = engine.stats()
    assert [got[i] for i in range(8)] == expected
    assert stats["requests"] == 8 and stats["running"] == 0 and stats["batch_cache_bytes"] == 0


def test_runs_a_model_fresh_from_load(tmp_path):
    """Nothing of the model has run on the caller's thread yet (its RoPE tables are still lazy arrays)."""
    build_checkpoint(tmp_path, {}, seed=2)
    model, processor = load(tmp_path, dtype=mx.float32)
    with Engine(model, processor) as engine:
        events = list(engine.submit("Hi", max_tokens=3))
    assert events[-1].finish_reason in ("stop", "length") and events[-1].error is None


def test_process_exits_cleanly_after_the_engine(tmp_path):
    """MLX work on a thread of its own could abort the process at exit ("terminate called without an active
    exception") unless that thread lets its streams go before it ends. Not always: three runs."""
    import subprocess
    import sys

    build_checkpoint(tmp_path, {}, seed=3)
    script = ("import sys, mlx.core as mx; from mlx_llama4 import load; from mlx_llama4.engine import Engine; "
              "m, p = load(sys.argv[1], dtype=mx.float32); e = Engine(m, p); "
              "print(e.submit('Hi', max_tokens=4, temperature=0.7).result() is not None); e.close()")
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr[-2000:]


def test_kv_quantized_batching_equals_serial(tmp_path):
    """With kv_bits=8 every layer's KV is quantized in the batch too; tokens equal serial generation with the
    same kv_bits. (No prefix cache here: serial mlx-lm generation attends its first prefill piece over float
    KV, which a prefix restored from a quantized cache cannot reproduce.)"""
    build_checkpoint(tmp_path, dict(hidden_size=64, head_dim=64, num_attention_heads=2, num_key_value_heads=1), seed=1)
    model, processor = load(tmp_path, dtype=mx.float32)
    prompts = [("Hello there, how are you?", None, 24), (_image_turn("What is it?"), [random_image(seed=5)], 30),
               ("One two three four five six seven eight nine ten eleven twelve.", None, 18), ("Hey", None, 27)]
    expected = [_serial(model, processor, p, imgs, max_tokens=n, kv_bits=8, prefill_step_size=CHUNK)
                for p, imgs, n in prompts]
    with Engine(model, processor, max_batch=2, prefill_step=CHUNK, prefix_cache_bytes=0, kv_bits=8) as engine:
        handles = [engine.submit(p, images=imgs, max_tokens=n, temperature=0.0) for p, imgs, n in prompts]
        assert [_tokens(h) for h in handles] == expected


def test_a_long_prompt_is_prefilled_between_decode_steps(tiny):
    """A new request's prompt goes in pieces of prefill_step tokens, one per decode step of the running rows."""
    model, processor = tiny
    log, submitted = [], threading.Event()

    def short(tokens, logits):
        log.append("short")
        if log.count("short") == 3:
            submitted.wait(timeout=120)  # the long prompt arrives while this row is decoding
        return logits

    def long(tokens, logits):
        log.append("long")
        return logits

    long_prompt = "Read this carefully. " + "word " * 190
    with Engine(model, processor, prefill_step=8) as engine:
        running = engine.submit("Keep talking.", max_tokens=60, temperature=0.0, logits_processors=[short])
        log.append("submitted")
        late = engine.submit(long_prompt, max_tokens=2, logits_processors=[long])
        submitted.set()
        list(running), list(late)
    pieces = -(-(len(processor(messages=long_prompt)["input_ids"][0]) - 1) // 8)
    assert pieces > 20
    assert log[log.index("submitted") : log.index("long")].count("short") >= pieces - 1


def test_follow_up_turn_reuses_the_prefix(tiny):
    model, processor = tiny
    turn = _image_turn("Hello there! What is in this picture, and what colour is it?")
    image = random_image(seed=6)
    turn[0]["content"][0]["image"] = image
    with Engine(model, processor) as engine:
        first = list(engine.submit(turn, max_tokens=12, temperature=0.0))
        follow = turn + [{"role": "assistant", "content": "".join(e.text for e in first)},
                         {"role": "user", "content": [{"type": "image", "image": random_image(70, 90, seed=7)},
                                                      {"type": "text", "text": "And this one?"}]}]
        second = list(engine.submit(follow, max_tokens=14, temperature=0.0, logprobs=True))
    prompt_len = first[-1].prompt_tokens
    assert second[-1].cached_tokens >= prompt_len // CHUNK * CHUNK > 0  # the first turn, its image included
    _assert_exact(model, processor, follow, second)  # and the new image after it


def _common_prefix(a, b):
    n = min(len(a), len(b))
    same = np.asarray(a[:n]) == np.asarray(b[:n])
    return n if same.all() else int(np.argmin(same))


def test_reuse_needing_a_dropped_chunk_restarts_at_a_chunk_boundary(tiny):
    """The cached conversation went on for chunks past where the new prompt leaves it, so the chunked layers
    no longer hold the chunk the reuse would end in: the engine restarts at that chunk's start (exact)."""
    model, processor = tiny
    system = {"role": "system", "content": "You answer questions about the sea, briefly and kindly."}
    long_turn = [system, {"role": "user", "content": "Tell me everything about waves, tides, storms and reefs."}]
    new_turn = [system, {"role": "user", "content": "Why is it blue?"}]
    shared = _common_prefix(processor(messages=long_turn)["input_ids"][0], processor(messages=new_turn)["input_ids"][0])
    assert shared % CHUNK  # the reuse cannot end where it would like to
    with Engine(model, processor) as engine:
        list(engine.submit(long_turn, max_tokens=20, temperature=0.0))
        events = list(engine.submit(new_turn, max_tokens=16, temperature=0.0, logprobs=True))
    assert events[-1].cached_tokens == shared // CHUNK * CHUNK > 0
    _assert_exact(model, processor, new_turn, events)


def test_entry_is_not_corrupted_by_a_request_that_extends_it(tiny):
    """A follow-up reuses the first turn's entry and writes on past it (its chunk buffers wrap several
    times); asking the first turn again still reuses that entry, and still gives the serial tokens."""
    model, processor = tiny
    turn = [{"role": "user", "content": "Please describe a quiet morning in a small harbour town."}]
    with Engine(model, processor) as engine:
        first = list(engine.submit(turn, max_tokens=1, temperature=0.0))  # one entry: the prompt's
        longer = turn + [{"role": "assistant", "content": first[0].text},
                         {"role": "user", "content": "Go on, at length, about the boats and the fishermen there."}]
        follow = list(engine.submit(longer, max_tokens=30, temperature=0.0))
        again = list(engine.submit(turn, max_tokens=8, temperature=0.0, logprobs=True))
    prompt_len = first[-1].prompt_tokens
    assert follow[-1].cached_tokens >= prompt_len and (prompt_len - 1) % CHUNK
    # from the first turn's entry (the follow-up's would restart at a chunk boundary)
    assert again[-1].cached_tokens == prompt_len - 1
    _assert_exact(model, processor, turn, again)


def test_prefix_cache_lru_stays_under_its_budget(tiny):
    model, _ = tiny
    rng = np.random.default_rng(3)

    def entry(n):
        ids = rng.integers(0, 1000, n)
        cache = model.make_cache()
        model(mx.array(ids)[None], cache=cache)
        mx.eval([c.state for c in cache])
        return ids, cache

    a, b, c = entry(20), entry(20), entry(20)
    size = sum(x.nbytes for x in a[1])
    prefix = PrefixCache(model, max_bytes=int(2.5 * size))
    prefix.insert(*a)
    prefix.insert(*b)
    assert prefix.fetch(np.r_[a[0], 7], [])[0] == 20  # touches a: b is now the least recently used
    prefix.insert(*c)
    assert len(prefix) == 2 and prefix.nbytes <= prefix.max_bytes
    assert prefix.fetch(np.r_[b[0], 7], [])[0] == 0  # evicted
    assert prefix.fetch(np.r_[a[0], 7], [])[0] == 20 and prefix.fetch(np.r_[c[0], 7], [])[0] == 20
    prefix.insert(*entry(1100))  # larger than the whole budget: not kept
    assert len(prefix) == 2 and prefix.nbytes <= prefix.max_bytes

    _, processor = tiny
    with Engine(model, processor, prefix_cache_bytes=int(2.5 * size)) as engine:
        for i in range(5):
            list(engine.submit(f"Request number {i} about something else entirely.", max_tokens=4))
        assert 0 < engine.stats()["prefix_cache_bytes"] <= int(2.5 * size)


@contextlib.contextmanager
def _gate():
    """``(hold, entered)``: ``hold(entered)`` is a logits processor that keeps the engine's thread waiting
    (after setting ``entered``) until the block ends, so a failing test cannot leave it blocked."""
    gate, entered = threading.Event(), threading.Event()

    def hold(tokens, logits):
        entered.set()
        gate.wait(timeout=120)
        return logits

    try:
        yield hold, entered, gate
    finally:
        gate.set()


def test_cancel_frees_the_row_at_the_next_step(tiny):
    model, processor = tiny
    ready, handle, steps, batch_sizes = threading.Event(), [], [], []

    def cancel_at_step_5(tokens, logits):
        ready.wait(timeout=120)
        steps.append(None)
        if len(steps) == 5:
            handle[0].cancel()  # as a client that disconnects while its 5th token is being chosen
        return logits

    def watch(tokens, logits):
        batch_sizes.append(engine.stats()["running"])
        return logits

    with Engine(model, processor, max_batch=2) as engine:
        other = engine.submit("A second request that keeps going.", max_tokens=20, temperature=0.0,
                              logits_processors=[watch])
        handle.append(engine.submit("Go on forever.", max_tokens=200, temperature=0.0,
                                    logits_processors=[cancel_at_step_5]))
        ready.set()
        events = list(handle[0])
        assert _tokens(other) == _serial(model, processor, "A second request that keeps going.", max_tokens=20)
        # queued requests are cancelled too, before they ever get a row
        with _gate() as (hold, entered, gate):
            blocker = engine.submit("Blocked.", max_tokens=3, logits_processors=[hold])
            entered.wait(timeout=120)
            blocker2 = engine.submit("Blocked too.", max_tokens=3)
            queued = engine.submit("Never runs.", max_tokens=3)
            queued.cancel()
            gate.set()
            assert [(e.token, e.finish_reason, e.completion_tokens) for e in queued] == [(None, "cancelled", 0)]
            list(blocker), list(blocker2)
    assert [e.finish_reason for e in events] == [None] * 5 + ["cancelled"]
    assert events[-1].completion_tokens == 5 and events[-1].token is None
    # the other row saw two rows running, then one from the step after the cancel on
    assert 2 in batch_sizes and batch_sizes[-1] == 1


def test_engine_full_past_max_queue(tiny):
    model, processor = tiny
    with Engine(model, processor, max_batch=1, max_queue=1) as engine, _gate() as (hold, entered, gate):
        running = engine.submit("First.", max_tokens=3, logits_processors=[hold])
        assert entered.wait(timeout=120)  # it has its row
        waiting = engine.submit("Second.", max_tokens=3)
        with pytest.raises(EngineFull, match="max_batch 1 \\+ max_queue 1"):
            engine.submit("Third.", max_tokens=3)
        assert engine.stats()["queued"] == 1
        gate.set()
        assert running.result() is not None and waiting.result() is not None
        assert engine.submit("Now there is room.", max_tokens=2).result() is not None
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit("After close.")


def test_seeded_sampling_does_not_depend_on_the_batch(tiny):
    model, processor = tiny
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.95, seed=11)
    with Engine(model, processor, max_batch=4) as engine:
        alone = _tokens(engine.submit("Tell me something.", **kw))
        others = [engine.submit("Another prompt, sampled.", max_tokens=24, temperature=1.0),
                  engine.submit("A third.", max_tokens=24, temperature=0.7, seed=3)]
        crowded = _tokens(engine.submit("Tell me something.", **kw))  # joins a batch at another row
        other_seed = _tokens(engine.submit("Tell me something.", **dict(kw, seed=12)))
        [list(h) for h in others]
    assert alone == crowded
    assert other_seed != alone


def test_sampling_parameters_act_as_in_serial_generation(tiny):
    model, processor = tiny
    prompt = "Repeat after me: la la la la la."
    with Engine(model, processor, max_batch=4) as engine:
        top_k = engine.submit(prompt, max_tokens=30, temperature=1.0, top_k=1)  # only the argmax survives
        top_p = engine.submit(prompt, max_tokens=30, temperature=1.5, top_p=1e-6)
        penalty = engine.submit(prompt, max_tokens=30, temperature=0.0, repetition_penalty=3.0)
        greedy = _serial(model, processor, prompt, max_tokens=30)
        assert _tokens(top_k) == _tokens(top_p) == greedy
        assert _tokens(penalty) == _serial(model, processor, prompt, max_tokens=30, repetition_penalty=3.0) != greedy


def test_stop_string_split_across_tokens(tiny):
    model, processor = tiny
    prompt = "Tell me a story about the sea."
    with Engine(model, processor) as engine:
        events = list(engine.submit(prompt, max_tokens=40, temperature=0.0))
        text = "".join(e.text for e in events)
        pieces = [processor.decode([e.token]) for e in events]
        # a stop string made of the end of one token's text and the start of the next one's
        i = next(i for i in range(len(pieces) - 1) if all(len(p) >= 2 and p.isprintable() for p in pieces[i : i + 2])
                 and text.find(pieces[i][-2:] + pieces[i + 1][:2]) >= 0)
        stop = pieces[i][-2:] + pieces[i + 1][:2]
        stopped = list(engine.submit(prompt, max_tokens=40, temperature=0.0, stop=["never-in-this-text", stop]))
    assert "".join(e.text for e in stopped) == text[: text.find(stop)]
    assert stopped[-1].finish_reason == "stop" and len(stopped) < len(events)


def test_text_stream_holds_back_a_possible_stop_string(tiny):
    _, processor = tiny
    tokenizer = processor.tokenizer
    ids = processor.encode("The quick brown fox jumps over the lazy dog.")  # one word per token
    stream = TextStream(tokenizer, special_token_ids(tokenizer), stop=["lazy cat", "dog."])
    out = [stream.add(t) for t in ids]
    # "lazy" could begin "lazy cat": held until " dog" shows it does not; "dog" is held, and "." ends the text
    assert out[6:] == [" the", " ", "lazy ", ""] and stream.stopped
    assert "".join(out) + stream.finish() == "The quick brown fox jumps over the lazy "
    plain = TextStream(tokenizer, special_token_ids(tokenizer))
    assert "".join(plain.add(t) for t in [*ids, 200008]) + plain.finish() == processor.decode(ids)  # <|eot|> dropped


def test_logprobs_are_log_softmax_of_the_one_sequence_logits(tiny):
    model, processor = tiny
    prompt = "What is the capital of France?"
    with Engine(model, processor) as engine:
        events = list(engine.submit(prompt, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=3))
    logprobs = _one_sequence_logprobs(model, processor, prompt, [e.token for e in events])
    for row, e in zip(logprobs, events):
        assert abs(e.logprob - row[e.token]) <= 1e-4
        top = np.argsort(-row)[:3]
        assert [t for t, _ in e.top_logprobs] == top.tolist()
        assert np.allclose([v for _, v in e.top_logprobs], row[top], atol=1e-4)


def test_bad_requests_are_refused_in_submit(tiny):
    model, processor = tiny
    with Engine(model, processor) as engine:
        for kw, match in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                          (dict(max_tokens=0), "max_tokens"), (dict(stop=[""]), "stop"),
                          (dict(top_logprobs=50), "top_logprobs"), (dict(seed=-1), "seed"),
                          (dict(logit_bias={10**7: 1.0}), "logit_bias")]:
            with pytest.raises(ValueError, match=match):
                engine.submit("Hi", **kw)
        with pytest.raises(TypeError, match="nonsense"):
            engine.submit("Hi", nonsense=1)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit([1, 2, 10**7])
        with pytest.raises(ValueError, match="0 image parts .* but 1 images"):
            engine.submit([{"role": "user", "content": "no image part"}], images=[random_image()])
        saved = model.config.text.max_position_embeddings
        try:
            model.config.text.max_position_embeddings = 16
            with pytest.raises(ValueError, match="context is 16 positions"):
                engine.submit("a rather long prompt " * 5)
        finally:
            model.config.text.max_position_embeddings = saved
        assert engine.stats()["requests"] == 0


def test_a_failing_logits_processor_fails_only_its_request(tiny):
    model, processor = tiny

    def broken(tokens, logits):
        raise RuntimeError("grammar exploded")

    async def stream(handle):
        return [e.token async for e in handle]

    with Engine(model, processor) as engine:
        bad = engine.submit("Hi", max_tokens=5, logits_processors=[broken])
        good = engine.submit("Hello", max_tokens=5, temperature=0.0)
        with pytest.raises(RuntimeError, match="grammar exploded"):
            bad.result()
        assert asyncio.run(stream(good)) == _serial(model, processor, "Hello", max_tokens=5)
