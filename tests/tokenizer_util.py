"""The real Llama 4 tokenizer as a Hugging Face ``tokenizer.json``, built offline for the tests.

Meta ships the tokenizer as a tiktoken BPE file (``llama_models/llama4/tokenizer.model``) inside the
``llama-models`` package; the Hub ships a converted ``tokenizer.json``, which the tests cannot download.
``real_tokenizer_dir()`` rebuilds that conversion once per machine with transformers' ``TikTokenConverter``
(about 10 s) and caches the folder, keyed by a hash of the inputs, so later test sessions reuse it.

Pitfalls handled (see docs/architecture.md, "Tokenizer"):
- the O200K split pattern and the 2048 special-token names must be exactly Meta's, in id order, so that
  the special tokens get ids 200000..202047;
- transformers 5's ``TikTokenConverter`` reads ``extra_special_tokens`` (``additional_special_tokens`` is
  silently ignored);
- the pad token is ``<|finetune_right_pad|>`` (the HF conversion script's ``<|finetune_right_pad_id|>`` is
  not in the vocabulary).
Like the Hub file, the tokenizer's post-processor adds ``<|begin_of_text|>``, so that the tests exercise
the double-BOS pitfall.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

# Bump when the recipe below changes, so that old cached folders are not reused.
_RECIPE_VERSION = "1"

_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def meta_tokenizer_model() -> Path:
    """Path of Meta's tiktoken file inside the installed ``llama-models`` package."""
    import llama_models.llama4

    return Path(llama_models.llama4.__file__).parent / "tokenizer.model"


def meta_special_tokens() -> list[str]:
    """The 2048 special-token names in id order (id = 200000 + index), as Meta's tokenizer.py builds them."""
    from llama_models.llama4 import tokenizer as meta

    names = meta.BASIC_SPECIAL_TOKENS + meta.LLAMA4_SPECIAL_TOKENS
    count = meta.Tokenizer.num_reserved_special_tokens
    names = names + [f"<|reserved_special_token_{i}|>" for i in range(count - len(names))]
    assert len(names) == len(set(names)) == count
    return names


def reference_chat_template() -> str:
    """The Llama 4 chat template as transformers ships it (transformers' Llama 4 chat template)."""
    from transformers.models.llama4.processing_llama4 import chat_template

    return chat_template


def _cache_root() -> Path:
    env = os.environ.get("MLX_LLAMA4_TEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx-llama4-tests"


def _cache_key() -> str:
    """Hash of everything the built files depend on: Meta's file, the recipe and the tokenizers version."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    digest.update(meta_tokenizer_model().read_bytes())
    digest.update("\n".join(meta_special_tokens()).encode())
    digest.update(f"{_RECIPE_VERSION}|{tokenizers.__version__}|{transformers.__version__}".encode())
    return digest.hexdigest()[:16]


def _build(folder: Path) -> None:
    """Convert Meta's tiktoken file into tokenizer.json + tokenizer_config.json + chat_template.jinja."""
    from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = meta_special_tokens()
    converter = TikTokenConverter(
        vocab_file=str(meta_tokenizer_model()),
        pattern=MetaTokenizer.O200K_PATTERN,
        extra_special_tokens=specials,
    )
    tok = converter.converted()
    # The special tokens must land on Meta's ids, right after the 200000 BPE ranks.
    for index in (0, 8, 92, len(specials) - 1):
        assert tok.token_to_id(specials[index]) == 200000 + index, specials[index]
    bos = specials[0]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, 200000)]
            ),
        ]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot|>",
        "pad_token": "<|finetune_right_pad|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 10485760,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "chat_template.jinja").write_text(reference_chat_template())


@lru_cache(maxsize=1)
def real_tokenizer_dir() -> Path:
    """Folder with the real Llama 4 tokenizer in Hugging Face format; built once per machine, then cached.

    The folder is written to a temporary sibling and renamed into place, so a crashed or concurrent build
    never leaves a half-written folder behind.
    """
    target = _cache_root() / f"tokenizer-{_cache_key()}"
    if all((target / name).is_file() for name in _FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-build-", dir=target.parent))
    try:
        _build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (or a stale partial folder exists): keep a complete one.
            if not all((target / name).is_file() for name in _FILES):
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# Meta's reference code (llama_models.llama4.chat_format / preprocess) without torchvision
# --------------------------------------------------------------------------------------------------


def _torchvision_stand_in():
    """Modules standing in for the few torchvision v1 pieces Meta's preprocess.py uses, on PIL images.

    torchvision is not installed (the only wheel reachable is a 5 GB CUDA build that does not load next
    to CPU torch). Each stand-in does what torchvision does for PIL input: ``Resize``/``F.resize`` call
    ``PIL.Image.resize`` with BILINEAR (torchvision's PIL path), ``ToTensor`` is uint8 HWC -> float CHW / 255,
    ``Normalize`` is (x - mean) / std per channel. Everything else (canvas choice, padding, tiling, global
    tile, token layout) is Meta's own code.
    """
    import enum
    import types

    import numpy as np
    import torch
    from PIL import Image

    class InterpolationMode(enum.Enum):
        BILINEAR = "bilinear"

    def resize(img, size, interpolation=InterpolationMode.BILINEAR):
        assert interpolation == InterpolationMode.BILINEAR and isinstance(img, Image.Image)
        height, width = size
        return img.resize((width, height), Image.BILINEAR)

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    class Resize:
        def __init__(self, size):
            self.size = size

        def __call__(self, img):
            return resize(img, self.size)

    class ToTensor:
        def __call__(self, pic):
            array = np.array(pic, dtype=np.uint8, copy=True)  # (H, W, C)
            return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)

    class Normalize:
        def __init__(self, mean, std, inplace=False):
            self.mean, self.std = mean, std

        def __call__(self, t):
            mean = torch.as_tensor(self.mean, dtype=t.dtype)[:, None, None]
            std = torch.as_tensor(self.std, dtype=t.dtype)[:, None, None]
            return t.sub_(mean).div_(std)

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = resize
    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose, transforms.Resize, transforms.ToTensor = Compose, Resize, ToTensor
    transforms.Normalize, transforms.InterpolationMode = Normalize, InterpolationMode
    transforms.functional = functional
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    return {
        "torchvision": torchvision,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }


@lru_cache(maxsize=1)
def meta_reference():
    """Meta's ``chat_format`` and ``preprocess`` modules, importable without torchvision.

    The stand-ins are in ``sys.modules`` only while Meta's modules import (the modules keep their own
    references), so nothing else in the test session sees a fake torchvision. preprocess.py sets
    ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` globally on import; that is undone here.
    """
    import importlib
    import sys

    from PIL import ImageFile

    stand_in = _torchvision_stand_in()
    saved = {name: sys.modules.get(name) for name in stand_in}
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        sys.modules.update(stand_in)
        chat_format = importlib.import_module("llama_models.llama4.chat_format")
        preprocess = importlib.import_module("llama_models.llama4.preprocess")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return chat_format, preprocess


@lru_cache(maxsize=1)
def meta_tokenizer():
    """Meta's tiktoken tokenizer (the reference for token ids)."""
    from llama_models.llama4.tokenizer import Tokenizer

    return Tokenizer(meta_tokenizer_model())


def meta_chat_format(vision: bool = True):
    """Meta's ChatFormat with the published vision settings (336 px tiles, patch 14, pixel shuffle 0.5)."""
    from llama_models.llama4.args import Size, VisionArgs

    chat_format, _ = meta_reference()
    args = None
    if vision:
        args = VisionArgs(
            image_size=Size(height=336, width=336),
            patch_size=Size(height=14, width=14),
            dim=1408,
            n_layers=34,
            n_heads=16,
            mlp_ratio=4.0,
            output_dim=4096,
            pixel_shuffle_ratio=0.5,
        )
    return chat_format.ChatFormat(meta_tokenizer(), vision_args=args, max_num_chunks=16)
