import numpy as np
import pytest
import transformers.modeling_outputs

from checkpoints import VARIANTS, build_hf_model, hf_logits, save_hf_model

# transformers 5.24: Llama4ForConditionalGeneration.forward(return_dict=True) builds its output from
# ``outputs.image_outputs`` of the language model's MoeCausalLMOutputWithPast, a class without that field, and
# fails with AttributeError. Giving the class the field (None) lets the reference run; newer versions that
# define it are left alone.
if not hasattr(transformers.modeling_outputs.MoeCausalLMOutputWithPast, "image_outputs"):
    transformers.modeling_outputs.MoeCausalLMOutputWithPast.image_outputs = None


@pytest.fixture(scope="session")
def demo():
    """The bundled demo model (model, processor), float32 on any backend; shared: tests must not change it."""
    import mlx.core as mx

    from mlx_llama4 import load

    return load("demo", dtype=mx.float32)


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, checkpoint folder, token ids (1, L), transformers float32 logits (1, L, V)) per variant."""
    name = request.param
    model = build_hf_model(name)
    path = save_hf_model(model, tmp_path_factory.mktemp(name))
    ids = np.random.default_rng(1).integers(0, 1000, size=(1, 45))  # spans >= 5 chunks of every variant
    return name, path, ids, hf_logits(model, ids)


# ---- the Gradio app's tests (test_app.py, test_app_browser.py) ---------------------------------------------


@pytest.fixture(scope="session")
def app_model(tmp_path_factory):
    """A loaded tiny checkpoint (real vocabulary and tokenizer) in a ModelHolder, with one device thread for
    the whole test session; returns ``(holder, checkpoint folder)``."""
    from mlx_llama4.app.device import DeviceWorker, ModelHolder
    from real_vocab import build_checkpoint

    folder = tmp_path_factory.mktemp("app-models") / "tiny-llama4"
    folder.mkdir()
    build_checkpoint(folder)
    holder = ModelHolder(DeviceWorker())
    holder.load(str(folder))
    return holder, folder


@pytest.fixture
def slow_generation(monkeypatch):
    """Make each token the app generates take 50 ms; one record per generation: tokens, closed early or not,
    the thread it ran on."""
    import threading
    import time

    from mlx_llama4.app import chat

    runs = []
    real = chat.stream_generate

    def slow(*args, **kwargs):
        run = {"tokens": 0, "closed": False, "finished": False, "thread": threading.current_thread().name}
        runs.append(run)
        inner = real(*args, **kwargs)
        try:
            for chunk in inner:
                run["tokens"] += 1
                time.sleep(0.05)
                yield chunk
            run["finished"] = True
        finally:
            inner.close()
            run["closed"] = True

    monkeypatch.setattr(chat, "stream_generate", slow)
    return runs
