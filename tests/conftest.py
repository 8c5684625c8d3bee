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


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, checkpoint folder, token ids (1, L), transformers float32 logits (1, L, V)) per variant."""
    name = request.param
    model = build_hf_model(name)
    path = save_hf_model(model, tmp_path_factory.mktemp(name))
    ids = np.random.default_rng(1).integers(0, 1000, size=(1, 45))  # spans >= 5 chunks of every variant
    return name, path, ids, hf_logits(model, ids)
