"""The processor (mlx_llama4.processor): token ids against Meta's ChatFormat, template, configs, errors.

Meta's ``ChatFormat.encode_dialog_prompt`` (llama-models, real tokenizer.model via tiktoken) is the
reference for token ids, text and image dialogs alike; its image path runs with thin torchvision
stand-ins (see tokenizer_util.meta_reference), so its canvas choice, tiling and token layout are Meta's.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from tokenizer_util import meta_chat_format, real_tokenizer_dir  # noqa: E402

from mlx_llama4.images import ImageSettings  # noqa: E402
from mlx_llama4.processor import (  # noqa: E402
    REFERENCE_CHAT_TEMPLATE,
    Processor,
    ProcessorError,
    image_token_count,
    load_processor,
)

BOS, EOM, EOT, EOS = 200000, 200007, 200008, 200001
IMAGE_START, IMAGE_END, TILE_X, TILE_Y, IMAGE, PATCH = 200080, 200081, 200084, 200085, 200090, 200092


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return real_tokenizer_dir()


@pytest.fixture(scope="session")
def processor(tokenizer_dir) -> Processor:
    return load_processor(tokenizer_dir)


@pytest.fixture(scope="session")
def meta():
    return meta_chat_format(vision=True)


def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def to_meta(messages):
    """Hugging Face-format messages (images inline as bytes) as Meta RawMessages."""
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem

    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [
                RawMediaItem(data=part["image"]) if part["type"] == "image" else RawTextItem(text=part["text"])
                for part in content
            ]
        out.append(RawMessage(role=message["role"], content=content))
    return out


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(data=None) -> dict:
    return {"type": "image"} if data is None else {"type": "image", "image": data}


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def ids_of(out) -> list[int]:
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].ndim == 2 and out["input_ids"].shape[0] == 1
    return out["input_ids"][0].tolist()


# ---- text dialogs ------------------------------------------------------------------------------------

TEXT_DIALOGS = {
    "user": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is MLX?"}],
    "multi_turn": [
        {"role": "system", "content": "You are a helpful assistant.\nAnswer in English."},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the GPU cross the road?\n\nTo get to the other tensor."},
        # Text parts are joined before tokenizing (the Hugging Face way); Meta tokenizes each part on its own.
        # The two agree when parts split where the pre-tokenizer splits anyway (see test_text_part_boundaries).
        user(text("Another one,"), text(" please.")),
    ],
    "unicode": [
        {
            "role": "user",
            "content": "Grüße aus Köln! 東京は晴れ 🌤️ — naïve café, Ελληνικά, עברית, हिन्दी, e\u0301, tabs\tand  spaces ",
        },
        {"role": "assistant", "content": "  ✔ 1234567 ∑x² ½ «ok» \r\n"},
        {"role": "user", "content": "😀😃😄😁 " * 5 + "\n\n\n" + "x" * 300},
    ],
}


@pytest.mark.parametrize("name", sorted(TEXT_DIALOGS))
def test_text_dialog_matches_meta(processor, meta, name):
    messages = TEXT_DIALOGS[name]
    expected = meta.encode_dialog_prompt(to_meta(messages)).tokens
    got = ids_of(processor(messages=messages))
    assert got == expected
    assert ids_of(processor(messages)) == expected  # messages as the first argument
    assert got.count(BOS) == 1 and got[0] == BOS


def test_text_part_boundaries(processor, meta):
    """Known difference from Meta's ChatFormat: a content list split inside a pre-tokenizer piece.

    "Another " + "one" is one piece " one" once joined (the chat template joins parts), while Meta encodes
    "Another " and "one" separately. The processor follows the published chat template.
    """
    messages = [user(text("Another "), text("one"))]
    joined = [{"role": "user", "content": "Another one"}]
    assert ids_of(processor(messages)) == ids_of(processor(joined)) == meta.encode_dialog_prompt(to_meta(joined)).tokens
    assert ids_of(processor(messages)) != meta.encode_dialog_prompt(to_meta(messages)).tokens


def test_no_double_bos(processor):
    rendered = processor.apply_chat_template(TEXT_DIALOGS["user"])
    assert rendered.startswith("<|begin_of_text|>")
    # The tokenizer's own post-processor adds BOS (see docs/architecture.md, "Chat template and BOS") ...
    assert processor.tokenizer(rendered)["input_ids"][:2] == [BOS, BOS]
    # ... the processor does not.
    ids = ids_of(processor(text=rendered))
    assert ids[:2] != [BOS, BOS] and ids.count(BOS) == 1
    assert ids == ids_of(processor(messages=TEXT_DIALOGS["user"]))
    plain = ids_of(processor(text="Hello world"))
    assert plain[0] == BOS and plain.count(BOS) == 1 and processor.decode(plain[1:]) == "Hello world"


# ---- rendering -----------------------------------------------------------------------------------------


def test_reference_template_is_the_published_one():
    from transformers.models.llama4.processing_llama4 import chat_template

    assert REFERENCE_CHAT_TEMPLATE == chat_template


def test_rendered_examples(processor):
    """Rendered examples of Meta's prompt format (llama_models/llama4/prompt_format.md)."""
    render = processor.apply_chat_template
    assert render([{"role": "user", "content": "Hi"}]) == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>assistant<|header_end|>\n\n"
    )
    messages = [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert render(messages, add_generation_prompt=False) == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|><|header_start|>user<|header_end|>"
        "\n\nHi<|eot|><|header_start|>assistant<|header_end|>\n\nHello!<|eot|>"
    )
    image_turn = [user(image(), text("What is in this picture?"))]
    assert "<|header_start|>user<|header_end|>\n\n<|image|>What is in this picture?<|eot|>" in render(image_turn)
    tool_call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    tool_dialog = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [tool_call]},
        {"role": "tool", "content": {"temp": 21}},
    ]
    assert render(tool_dialog).endswith(
        "<|header_start|>assistant<|header_end|>\n\n<|python_start|><|python_end|>"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot|>'
        '<|header_start|>ipython<|header_end|>\n\n{"temp": 21}<|eot|><|header_start|>assistant<|header_end|>\n\n'
    )
    # None-valued keys are dropped, as OpenAI-style clients send them.
    with_none = [{"role": "user", "content": "Hi", "tool_calls": None}]
    assert render(with_none) == render([{"role": "user", "content": "Hi"}])


def test_rendering_matches_transformers(processor):
    """Same template, same helpers: tools with tojson(indent=4), tool calls, string tool results."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city — «quoted» <b>",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    dialogs = [
        TEXT_DIALOGS["multi_turn"],
        TEXT_DIALOGS["unicode"],
        [{"role": "user", "content": "Weather in Paris?"}],
        [
            {"role": "system", "content": "Sys"},
            {"role": "user", "content": "Weather?"},
            {"role": "tool", "content": "21C sunny"},
        ],
    ]
    for messages in dialogs:
        for kwargs in ({}, {"tools": tools}, {"tools": tools, "tools_in_user_message": False}):
            want = processor.tokenizer.apply_chat_template(
                messages, chat_template=REFERENCE_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True, **kwargs
            )
            assert processor.apply_chat_template(messages, **kwargs) == want
    assert '"\\"21C sunny\\""' not in want and '"21C sunny"' in want  # the string tool result is JSON-quoted


def test_template_raise_exception(processor):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="no first user message"):
        processor.apply_chat_template([{"role": "system", "content": "x"}], tools=[{"name": "f"}])


# ---- image dialogs ---------------------------------------------------------------------------------------

IMAGE_DIALOGS = {
    "one_tile": [user(image(png(200, 150)), text("Describe."))],
    "grid_2x3": [user(image(png(1000, 480, 1)), text("What is in this picture?"))],
    "tall_multi_turn": [
        {"role": "system", "content": "Look carefully."},
        user(text("First: "), image(png(300, 800, 2))),
        {"role": "assistant", "content": "A tall picture."},
        user(image(png(640, 480, 3)), text("And this?")),
    ],
    "two_in_one_turn": [
        user(image(png(640, 480, 4)), text(" compared with "), image(png(200, 150, 5)), text(" — which is brighter?"))
    ],
}


@pytest.mark.parametrize("name", sorted(IMAGE_DIALOGS))
def test_image_dialog_matches_meta(processor, meta, name):
    messages = IMAGE_DIALOGS[name]
    reference = meta.encode_dialog_prompt(to_meta(messages))
    out = processor(messages=messages)
    assert ids_of(out) == reference.tokens
    want_pixels = np.concatenate([t.numpy() for t in reference.images])
    assert out["pixel_values"].shape == want_pixels.shape and out["pixel_values"].dtype == np.float32
    assert np.abs(out["pixel_values"] - want_pixels).max() <= 1e-5
    ids = np.asarray(ids_of(out))
    assert (ids == PATCH).sum() == out["pixel_values"].shape[0] * 144  # one feature per <|patch|>
    # The same images passed separately, with bare {"type": "image"} parts.
    bare = [
        {**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]
    parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"]]
    images = [p["image"] for p in parts if p["type"] == "image"]
    separate = processor(messages=bare, images=images)
    assert ids_of(separate) == reference.tokens
    assert np.array_equal(separate["pixel_values"], out["pixel_values"]) and separate["grids"] == out["grids"]


def test_multi_tile_layout(processor):
    out = processor(text="<|image|>", images=png(1000, 480))
    assert out["grids"] == [(2, 3)]
    patches = [PATCH] * 144
    row = patches + [TILE_X] + patches + [TILE_X] + patches + [TILE_Y]
    assert ids_of(out) == [BOS, IMAGE_START, *row, *row, IMAGE, *patches, IMAGE_END]
    assert len(ids_of(out)) - 1 == image_token_count((2, 3), 144) == 145 * 6 + 147
    single = processor(text="<|image|>", images=[png(200, 150)])
    assert ids_of(single) == [BOS, IMAGE_START, IMAGE, *patches, IMAGE_END]


def test_table_token_counts(processor):
    """Prompt tokens per image, as in the examples of docs/architecture.md ("Image tokens"), via grey images."""
    for (width, height), prompt_tokens in {
        (200, 150): 147, (500, 500): 727, (640, 480): 727, (1024, 768): 1887, (1920, 1080): 2322,
        (300, 800): 582, (4000, 500): 1307, (100, 2000): 1017,
    }.items():  # fmt: skip
        out = processor(text="<|image|>", images=[np.full((height, width, 3), 128, np.uint8)])
        assert len(ids_of(out)) - 1 == prompt_tokens, (width, height)


def test_inline_image_spellings_in_order(processor, tmp_path):
    a, b, c, d = png(200, 150, 10), png(640, 480, 11), png(300, 800, 12), png(1000, 480, 13)
    path_b, path_c = tmp_path / "b.png", tmp_path / "c.png"
    path_b.write_bytes(b)
    path_c.write_bytes(c)
    data_url = "data:image/png;base64," + base64.b64encode(d).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(io.BytesIO(a))},
                {"type": "image", "path": str(path_b)},
                {"type": "text", "text": "and"},
                {"type": "image", "url": str(path_c)},
                {"type": "image_url", "image_url": {"url": data_url}},
            ],
        }
    ]
    out = processor(messages)
    want = processor(text="<|image|><|image|>and<|image|><|image|>", images=[a, b, c, d])
    assert out["grids"] == want["grids"] == [(1, 1), (2, 2), (3, 1), (2, 3)]
    assert np.array_equal(out["pixel_values"], want["pixel_values"])
    assert processor.apply_chat_template(messages).count("<|image|>") == 4
    # Inline and separately passed images mix, in order of the parts.
    mixed = [user(image(), image(b), image())]
    out = processor(mixed, images=[a, c])
    assert out["grids"] == [(1, 1), (2, 2), (3, 1)]


def test_image_count_mismatch(processor):
    with pytest.raises(ProcessorError, match=r"2 <\|image\|> placeholders but 1 images"):
        processor(text="<|image|> and <|image|>", images=[png(20, 20)])
    with pytest.raises(ProcessorError, match=r"0 <\|image\|> placeholders but 1 images"):
        processor(text="no placeholder", images=png(20, 20))
    with pytest.raises(ProcessorError, match=r"1 image parts .* but 0 images"):
        processor(messages=[user(image(), text("?"))])
    with pytest.raises(ProcessorError, match=r"1 image parts .* but 2 images"):
        processor(messages=[user(image())], images=[png(20, 20), png(20, 20)])
    with pytest.raises(ProcessorError, match="either text or messages"):
        processor(text="x", messages=[{"role": "user", "content": "x"}])


def test_bad_image_error_names_source(processor, tmp_path):
    from mlx_llama4.images import ImageError

    with pytest.raises(ImageError, match="missing.png"):
        processor(text="<|image|>", images=[tmp_path / "missing.png"])


def test_48_images(processor):
    small = np.full((150, 200, 3), 30, np.uint8)  # 1 tile
    wide = np.full((100, 700, 3), 200, np.uint8)  # 1 x 3 grid + global tile
    images = [small if i % 2 else wide for i in range(48)]
    content = []
    for i in range(48):
        content += [text(f"Image {i}: "), image()]
    messages = [user(*content, text("Compare them."))]
    out = processor(messages=messages, images=images)
    placeholders = processor.encode(processor.apply_chat_template(messages))  # one <|image|> per image
    assert out["grids"] == [(1, 1) if i % 2 else (1, 3) for i in range(48)]
    assert out["pixel_values"].shape == (24 * 1 + 24 * 4, 3, 336, 336)
    assert placeholders.count(IMAGE) == 48
    expected = len(placeholders) - 48 + 24 * 147 + 24 * (145 * 3 + 147)
    ids = np.asarray(ids_of(out))
    assert len(ids) == expected
    assert (ids == PATCH).sum() == out["pixel_values"].shape[0] * 144
    assert (ids == IMAGE_START).sum() == (ids == IMAGE_END).sum() == (ids == IMAGE).sum() == 48


# ---- tokenizer facts -----------------------------------------------------------------------------------


def test_special_ids(processor):
    assert processor.bos_token_id == BOS
    assert set(processor.eos_token_ids) == {EOT, EOM, EOS}
    assert processor.image_token_id == PATCH
    assert processor.tokens_per_tile == 144
    text = "Hello <|eot|> wörld"
    assert processor.decode(processor.encode(text)) == text
    assert processor.decode(np.asarray([[BOS, 19873]])) == "<|begin_of_text|>Hello"


# ---- checkpoint folders: template spellings, image configs, small vocabularies -------------------------

TINY_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>",
    "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>", "<|image|>", "<|patch|>",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_tokenizer_json(tmp_path_factory) -> Path:
    """A word-level tokenizer with Llama 4's special-token names at other ids (no <|eom|>)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = ["<unk>", "user", "assistant", "system", "hello", "world", "look", "at", "this"]
    specials = list(reversed(TINY_SPECIALS))  # <|patch|> gets a small id, not 200092
    vocab = {token: i for i, token in enumerate(words + specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    path = tmp_path_factory.mktemp("tiny-tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def make_folder(tmp_path: Path, tokenizer_json: Path, files: dict) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.symlink(tokenizer_json, folder / "tokenizer.json")
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "pad_token": "<|finetune_right_pad_id|>"}
MSG = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(
    "files,marker",
    [
        ({"chat_template.jinja": "JINJA{{ messages[0]['content'] }}"}, "JINJA"),
        ({"chat_template.json": {"chat_template": "JSON{{ messages[0]['content'] }}"}}, "JSON"),
        ({"tokenizer_config.json": {**CONFIG, "chat_template": "CFG{{ messages[0]['content'] }}"}}, "CFG"),
        (
            {
                "tokenizer_config.json": {
                    "chat_template": [
                        {"name": "tool_use", "template": "TOOL"},
                        {"name": "default", "template": "NAMED{{ bos_token }}"},
                    ]
                }
            },
            "NAMED<|begin_of_text|>",
        ),
        (
            {
                "chat_template.jinja": "JINJA",
                "chat_template.json": {"chat_template": "JSON"},
                "tokenizer_config.json": {"chat_template": "CFG"},
            },
            "JINJA",
        ),
        ({"chat_template.json": {"chat_template": "JSON"}, "tokenizer_config.json": {"chat_template": "CFG"}}, "JSON"),
    ],
)
def test_chat_template_spellings(tmp_path, tiny_tokenizer_json, files, marker):
    processor = load_processor(make_folder(tmp_path, tiny_tokenizer_json, files))
    assert processor.apply_chat_template(MSG).startswith(marker)


def test_reference_template_when_none_shipped(tmp_path, tiny_tokenizer_json):
    processor = load_processor(make_folder(tmp_path, tiny_tokenizer_json, {"tokenizer_config.json": CONFIG}))
    assert processor.chat_template == REFERENCE_CHAT_TEMPLATE
    assert processor.apply_chat_template(MSG).startswith("<|begin_of_text|><|header_start|>user<|header_end|>\n\nhello")


def test_small_vocabulary_ids_by_name(tmp_path, tiny_tokenizer_json):
    processor = load_processor(make_folder(tmp_path, tiny_tokenizer_json, {"tokenizer_config.json": CONFIG}))
    vocab = processor.tokenizer.get_vocab()
    assert processor.image_token_id == vocab["<|patch|>"] != PATCH
    assert processor.bos_token_id == vocab["<|begin_of_text|>"]
    assert processor.tokenizer.pad_token is None  # <|finetune_right_pad_id|> is not in the vocabulary: not added
    assert len(processor.tokenizer) == len(vocab)
    assert processor.eos_token_ids == [vocab["<|eot|>"], vocab["<|end_of_text|>"]]  # no <|eom|> here
    out = processor(text="look at this <|image|>", images=[np.zeros((150, 200, 3), np.uint8)])
    ids = ids_of(out)
    assert ids[0] == vocab["<|begin_of_text|>"] and ids[-1] == vocab["<|image_end|>"]
    assert ids.count(vocab["<|patch|>"]) == 144 and ids[4] == vocab["<|image_start|>"]


PREPROCESSOR = {
    "image_processor_type": "Llama4ImageProcessorFast",
    "size": {"height": 224, "width": 224},
    "max_patches": 4,
    "resize_to_max_canvas": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "rescale_factor": 0.00392156862745098,
}


@pytest.mark.parametrize(
    "files",
    [
        {
            "preprocessor_config.json": PREPROCESSOR,
            "processor_config.json": {"patch_size": 16, "processor_class": "Llama4Processor"},
        },
        {"processor_config.json": {"image_processor": PREPROCESSOR, "patch_size": 16, "pixel_shuffle_ratio": 0.5}},
        {  # both: the nested transformers-5 settings win
            "preprocessor_config.json": {**PREPROCESSOR, "size": {"height": 336, "width": 336}, "max_patches": 16},
            "processor_config.json": {"image_processor": PREPROCESSOR, "patch_size": 16},
        },
    ],
)
def test_image_settings_from_either_config(tmp_path, tiny_tokenizer_json, files):
    processor = load_processor(make_folder(tmp_path, tiny_tokenizer_json, files))
    settings = processor.image_settings
    assert (settings.size, settings.max_patches, settings.resize_to_max_canvas) == (224, 4, True)
    assert processor.tokens_per_tile == (224 // 16) ** 2 // 4 == 49
    out = processor(text="<|image|>", images=[np.zeros((100, 100, 3), np.uint8)])
    assert out["grids"] == [(2, 2)] and out["pixel_values"].shape == (5, 3, 224, 224)  # max canvas: 2 x 2
    assert len(ids_of(out)) == 1 + 50 * 4 + 49 + 3
    assert load_processor(tmp_path / "ckpt", tokens_per_tile=7).tokens_per_tile == 7  # the model config's count wins


def test_defaults_without_image_configs(tmp_path, tiny_tokenizer_json):
    processor = load_processor(make_folder(tmp_path, tiny_tokenizer_json, {}))
    assert processor.image_settings == ImageSettings()
    assert processor.tokens_per_tile == 144


def test_save_pretrained_round_trip(tmp_path, tiny_tokenizer_json):
    files = {
        "tokenizer_config.json": {**CONFIG, "chat_template": "OLD"},
        "preprocessor_config.json": {**PREPROCESSOR, "resize_to_max_canvas": False},
    }
    original = load_processor(make_folder(tmp_path, tiny_tokenizer_json, files))
    original.chat_template = REFERENCE_CHAT_TEMPLATE
    saved = original.save_pretrained(tmp_path / "saved")
    names = {p.name for p in saved.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"} <= names
    assert "chat_template" not in json.loads((saved / "tokenizer_config.json").read_text())
    reloaded = load_processor(saved)
    assert reloaded.chat_template == REFERENCE_CHAT_TEMPLATE
    assert reloaded.image_settings == original.image_settings
    assert reloaded.tokens_per_tile == original.tokens_per_tile
    messages = [user(image(), text("look at this"))]
    picture = np.zeros((300, 500, 3), np.uint8)
    a, b = original(messages, images=[picture]), reloaded(messages, images=[picture])
    assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["pixel_values"], b["pixel_values"])
