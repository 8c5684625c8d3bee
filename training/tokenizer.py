"""A small byte-level BPE tokenizer for the demo model, with Llama 4's special tokens by their real names.

The layout mirrors the real tokenizer (Meta's llama_models/llama4/tokenizer.py; docs/architecture.md, "Tokenizer")
at a small scale: ``BASE_VOCAB`` BPE tokens first (any byte sequence encodes, so any user text works), then the
special tokens in Llama 4's own order
(``<|begin_of_text|>``, ``<|end_of_text|>``, ..., ``<|image|>``, ``<|vision_reserved_special_token_6|>``,
``<|patch|>``), then ``<|reserved_special_token_k|>`` fillers up to ``VOCAB_SIZE``. Nothing downstream may
assume the real ids: the model config carries them (bos/eos/pad/image_token_index/boi/eoi) and the processor
looks tokens up by name.

The pre-tokenizer is the real one (the O200K split pattern, then byte-level without a prefix space), and the
post-processor adds ``<|begin_of_text|>`` like the Hub tokenizer.json does.
"""

from __future__ import annotations

from typing import Iterable

BASE_VOCAB = 1024
VOCAB_SIZE = 1152  # BASE_VOCAB + 128 special tokens

O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


def llama4_special_tokens(total: int = VOCAB_SIZE - BASE_VOCAB) -> list[str]:
    """The first 93 Llama 4 special tokens in their real order (ids 200000-200092 there), then reserved ones."""
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        "<|eot|>",
        "<|step|>",
    ]
    names += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)]
    names += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    names += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(8, 69)]
    names += [
        "<|image_start|>",
        "<|image_end|>",
        "<|vision_reserved_special_token_0|>",
        "<|vision_reserved_special_token_1|>",
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
    ]
    names += [f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)]
    names += ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
    assert len(names) == 93
    names += [f"<|reserved_special_token_{i}|>" for i in range(total - len(names))]
    return names


def train_tokenizer(texts: Iterable[str]):
    """A ``tokenizers.Tokenizer``: byte-level BPE with BASE_VOCAB tokens trained on ``texts``, then the specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    base = tokenizer.get_vocab_size()  # a small corpus ends early; reserved specials fill up to VOCAB_SIZE
    specials = llama4_special_tokens(VOCAB_SIZE - base)
    tokenizer.add_special_tokens(specials)
    assert tokenizer.get_vocab_size() == VOCAB_SIZE, tokenizer.get_vocab_size()
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return tokenizer


def fast_tokenizer(tokenizer):
    """The transformers fast tokenizer around a ``tokenizers.Tokenizer``, with Llama 4's roles set."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot|>",
        pad_token="<|finetune_right_pad|>",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def special_ids(tokenizer) -> dict:
    """The ids the model config needs, looked up by name."""
    t = tokenizer.token_to_id
    return dict(
        bos_token_id=t("<|begin_of_text|>"),
        eos_token_id=[t("<|end_of_text|>"), t("<|eom|>"), t("<|eot|>")],
        pad_token_id=t("<|finetune_right_pad|>"),
        image_token_index=t("<|patch|>"),
        boi_token_index=t("<|image_start|>"),
        eoi_token_index=t("<|image_end|>"),
    )
