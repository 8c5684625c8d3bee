import signal

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

# A shell without job control starts a background command (`.ci/run &`) with Ctrl-C (SIGINT) ignored, and every
# process it starts inherits that, so the tests that press Ctrl-C on a command would see it ignored. A handled
# signal is reset to the default in a started program, an ignored one is not: handle it here, as Python does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
    """A loaded tiny checkpoint (real vocabulary and tokenizer) in a ModelHolder, with its batching engine, for
    the whole test session; returns ``(holder, checkpoint folder)``."""
    from mlx_llama4.app.device import ModelHolder
    from real_vocab import build_checkpoint

    folder = tmp_path_factory.mktemp("app-models") / "tiny-llama4"
    folder.mkdir()
    build_checkpoint(folder)
    holder = ModelHolder()
    holder.load(str(folder))
    yield holder, folder
    holder.close()


@pytest.fixture
def engine_spy(monkeypatch):
    """Every request the app's engines take (``.requests``: prompt and handle; ``.final(handle)``: its last
    event once it ended), with each decode step slowed by ``.delay`` seconds (50 ms unless a test sets it)."""
    import time

    from app_helpers import EngineSpy
    from mlx_llama4.engine import Engine, Handle

    spy = EngineSpy(delay=0.05)
    submit, decode_step, put = Engine.submit, Engine._decode_step, Handle._put

    def spied_submit(self, prompt, images=None, **sampling):
        handle = submit(self, prompt, images, **sampling)
        spy.requests.append((prompt, handle))
        return handle

    def slow_step(self):
        time.sleep(spy.delay)
        decode_step(self)

    def spied_put(self, event):
        if event.finish_reason is not None:
            spy.finals[self] = event
        put(self, event)

    monkeypatch.setattr(Engine, "submit", spied_submit)
    monkeypatch.setattr(Engine, "_decode_step", slow_step)
    monkeypatch.setattr(Handle, "_put", spied_put)
    return spy
