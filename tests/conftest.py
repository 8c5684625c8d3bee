import numpy as np
import pytest

from checkpoints import VARIANTS, build_hf_model, hf_logits, save_hf_model


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, checkpoint folder, token ids (1, L), transformers float32 logits (1, L, V)) per variant."""
    name = request.param
    model = build_hf_model(name)
    path = save_hf_model(model, tmp_path_factory.mktemp(name))
    ids = np.random.default_rng(1).integers(0, 1000, size=(1, 45))  # spans >= 5 chunks of every variant
    return name, path, ids, hf_logits(model, ids)
