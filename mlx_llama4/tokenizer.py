"""A checkpoint's Hugging Face fast tokenizer, and the Llama 4 special tokens looked up in it by name.

Special tokens are found by name, never by id: the published checkpoints put them at 200000 and up, the test and
demo tokenizers elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

BOS_TOKEN = "<|begin_of_text|>"
STOP_TOKENS = ("<|eot|>", "<|eom|>", "<|end_of_text|>")
ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def load_tokenizer(folder: Path, config: Mapping):
    """A fast tokenizer from tokenizer.json, with its special-token roles from tokenizer_config.json (``config``).

    Built directly from the file instead of ``AutoTokenizer`` so that a checkpoint's ``tokenizer_class``
    or auto-map cannot pull in other code, and roles whose token is not in the vocabulary (the Hub
    Llama 4 config names a pad token ``<|finetune_right_pad_id|>`` that does not exist) are skipped
    instead of being added as new tokens.
    """
    from transformers import PreTrainedTokenizerFast

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (a Hugging Face fast tokenizer file is required)")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(file), clean_up_tokenization_spaces=False)
    for role in ROLES:
        value = config.get(role)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str) and token_id(tokenizer, value) is not None:
            setattr(tokenizer, role, value)
    if tokenizer.bos_token is None and token_id(tokenizer, BOS_TOKEN) is not None:
        tokenizer.bos_token = BOS_TOKEN
    # tokenizer_config.json's ``model_max_length`` is not applied: the context limit is the model's
    # (``max_position_embeddings``, checked by generation), and transformers would warn on every longer prompt.
    return tokenizer


def token_id(tokenizer, token: str) -> int | None:
    """Id of a token by name, or None when it is not in the vocabulary."""
    return tokenizer.backend_tokenizer.token_to_id(token)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end generation: ``<|eot|>``, ``<|eom|>``, ``<|end_of_text|>`` and the tokenizer's eos, those present."""
    ids = [token_id(tokenizer, name) for name in STOP_TOKENS] + [tokenizer.eos_token_id]
    return [i for i in dict.fromkeys(ids) if i is not None]


def special_tokens(tokenizer, config: Mapping) -> dict[str, str]:
    """The special-token strings by role (``bos_token`` ...), as chat templates and tokenizer_config.json use them;
    ``bos_token`` falls back to the config's, then to ``<|begin_of_text|>``."""
    values = {role: getattr(tokenizer, role, None) for role in ROLES}
    found = {role: value for role, value in values.items() if isinstance(value, str)}
    found.setdefault("bos_token", config.get("bos_token") or BOS_TOKEN)
    return found


def tokenizer_config(tokenizer, config: Mapping) -> dict:
    """tokenizer_config.json for saving: the checkpoint's own (without the template, which is saved on its own,
    and the added-token table, which tokenizer.json holds), with the roles in use."""
    out = {k: v for k, v in config.items() if k not in ("chat_template", "added_tokens_decoder")}
    out.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    out.update(special_tokens(tokenizer, config))
    out.setdefault("clean_up_tokenization_spaces", False)
    return out
