"""Synthetic training data for the demo model: pictures of simple shapes and short chats about them.

Everything is generated on the fly from a ``random.Random`` (seeded by the caller), with Pillow only:

- an image of 1 to 3 shapes (circle, square, triangle, star) in named colours
  on a light background, at varied sizes and aspect ratios so that images tile into several 112-px tiles;
  the shapes sit in distinct left-to-right slots, so "left", "middle", "right" and "from left to right"
  are well defined;
- a chat in the Hugging Face message format asking, in several phrasings, for the shape, the colour, the
  count, the position or a one-line description, with short deterministic answers that tests can check by
  string matching; plus text-only skills (greetings, what the model is, small additions), multi-turn
  follow-ups, and chats that show a second picture later on (questions are about the newest).

The answer strings are the contract with ``tests/test_demo.py``: :func:`shape_answer`, :func:`colour_answer`,
:func:`count_answer`, :func:`position_answer` and :func:`describe_answer` give them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from mlx_llama4.demo_tools import COLOURS, SHAPES  # the demo world's names, shared with the app

COLOUR_NAMES = tuple(COLOURS)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
POSITIONS = ("left", "middle", "right")

IDENTITY = (
    "I am a tiny demonstration model trained on pictures of simple shapes. I am not Llama 4 and know little else."
)
GREETING = "Hello! Show me a picture of shapes and ask me about it."


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOUR_NAMES
    cx: float  # centre, in pixels
    cy: float
    size: float  # radius of the circumscribed circle, in pixels
    position: str  # "left", "middle" or "right" (its third of the image)


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    shapes: tuple[Shape, ...]  # left to right


# ----------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------


def _jitter_colour(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a in corners]
    if kind == "diamond":  # a rhombus standing on a corner, taller than wide
        return [(cx, cy - r), (cx + 0.62 * r, cy), (cx, cy + r), (cx - 0.62 * r, cy)]
    if kind == "triangle":  # pointing up (+- a little), centroid at the centre
        corners = [(-math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
        return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a in corners]
    if kind == "star":
        points = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5 + angle
            rr = r if k % 2 == 0 else 0.42 * r
            points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return points
    raise ValueError(kind)


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill, rng: random.Random):
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    angle = 0.0
    if kind in ("square", "triangle", "star"):
        angle = rng.uniform(-0.2, 0.2)
    draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)


def random_scene(rng: random.Random, count: int | None = None, kind: str | None = None,
                 colour: str | None = None) -> Scene:
    """An image of ``count`` (1-3) shapes in distinct horizontal slots; ``kind``/``colour`` fix the first shape.

    Sizes run from about 48 to 480 px a side with aspect ratios up to 3:1, so with 112-px tiles and up to
    4 tiles the images use 1x1, 1x2, 2x1, 1x3, 3x1, 2x2, 1x4 and 4x1 grids.
    """
    count = count or rng.choice((1, 1, 2, 3))
    aspect = math.exp(rng.uniform(math.log(1 / 2.5), math.log(3.0)))  # width / height
    if count >= 2:
        aspect = max(aspect, 0.9 + 0.4 * (count - 1))  # room for side-by-side shapes
    if rng.random() < 0.8:  # mostly small images (1-3 tiles: cheap to train on), some large ones (4 tiles)
        area = math.exp(rng.uniform(math.log(56 * 56), math.log(140 * 140)))
    else:
        area = math.exp(rng.uniform(math.log(140 * 140), math.log(400 * 400)))
    width = int(round(math.sqrt(area * aspect)))
    height = int(round(math.sqrt(area / aspect)))
    width, height = max(48, min(width, 480)), max(48, min(height, 480))
    shade = rng.randint(225, 255)
    background = _jitter_colour((shade, shade, shade), rng, 6)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)

    slots = sorted(rng.sample(range(3), count)) if count < 3 else [0, 1, 2]
    slot_w = width / 3
    shapes = []
    for i, slot in enumerate(slots):
        k = kind if (i == 0 and kind) else rng.choice(SHAPES)
        c = colour if (i == 0 and colour) else rng.choice(COLOUR_NAMES)
        if count == 1:  # a lone shape is large: it may spill over its third, its centre decides the position
            max_r = min(width * 0.42, height * 0.42)
        else:
            max_r = min(slot_w * 0.47, height * 0.44)
        r = max(rng.uniform(0.75, 1.0) * max_r, 11.0)
        cx = (slot + 0.5) * slot_w + rng.uniform(-0.2, 0.2) * slot_w
        cx = min(max(cx, r + 1), width - r - 1) if width > 2 * r + 2 else width / 2
        if count == 1:
            slot = min(2, int(cx / slot_w))
        cy = height / 2 + rng.uniform(-1, 1) * max(0.0, height / 2 - r - 2)
        fill = _jitter_colour(COLOURS[c], rng)
        draw_shape(draw, k, cx, cy, r, fill, rng)
        shapes.append(Shape(k, c, cx, cy, r, POSITIONS[slot]))
    return Scene(image, tuple(shapes))


# ----------------------------------------------------------------------------------------------------
# Answers (the strings tests check)
# ----------------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(shape: Shape) -> str:
    return f"{_article(shape.colour)} {shape.colour} {shape.kind}"


def shape_answer(scene: Scene) -> str:
    kinds = [s.kind for s in scene.shapes]
    if len(kinds) == 1:
        return f"It is {_article(kinds[0])} {kinds[0]}."
    return "They are " + _join([f"{_article(k)} {k}" for k in kinds]) + "."


def colour_answer(scene: Scene) -> str:
    colours = [s.colour for s in scene.shapes]
    if len(colours) == 1:
        return f"It is {colours[0]}."
    return "They are " + _join(colours) + "."


def count_answer(scene: Scene) -> str:
    n = len(scene.shapes)
    return "There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."


def position_answer(scene: Scene) -> str:
    if len(scene.shapes) == 1:
        where = scene.shapes[0].position
        return "It is in the middle." if where == "middle" else f"It is on the {where}."
    parts = []
    for s in scene.shapes:
        where = "in the middle" if s.position == "middle" else f"on the {s.position}"
        parts.append(f"the {s.kind} is {where}")
    text = _join(parts)
    return text[0].upper() + text[1:] + "."


def describe_answer(scene: Scene) -> str:
    text = _join([noun_phrase(s) for s in scene.shapes])
    return text[0].upper() + text[1:] + "."


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------------

SHAPE_QUESTIONS = (
    "What shape is this?",
    "What shape do you see?",
    "Which shape is in the picture?",
    "What kind of shape is shown?",
    "Name the shape.",
    "What shapes are in the image?",
)
COLOUR_QUESTIONS = (
    "What colour is the shape?",
    "What color is it?",
    "Which colour is this shape?",
    "What colours do you see?",
    "Tell me the colour.",
    "What color are the shapes?",
)
COUNT_QUESTIONS = (
    "How many shapes are there?",
    "How many shapes do you see?",
    "Count the shapes.",
    "How many objects are in the picture?",
    "What is the number of shapes?",
)
POSITION_QUESTIONS = (
    "Where is the shape?",
    "Where is it in the picture?",
    "Is the shape on the left or on the right?",
    "Where are the shapes?",
    "Where is everything placed?",
)
DESCRIBE_QUESTIONS = (
    "Describe the picture.",
    "Describe this image in one line.",
    "What is in this picture?",
    "What do you see?",
    "Give a short description.",
    "What is in the image?",
)
QUESTIONS = {
    "shape": (SHAPE_QUESTIONS, shape_answer),
    "colour": (COLOUR_QUESTIONS, colour_answer),
    "count": (COUNT_QUESTIONS, count_answer),
    "position": (POSITION_QUESTIONS, position_answer),
    "describe": (DESCRIBE_QUESTIONS, describe_answer),
}
FOLLOW_UPS = {
    "shape": ("And the shape?", "What shape?", "Which shape is it?"),
    "colour": ("And the colour?", "What colour?", "What color is it?"),
    "count": ("How many are there?", "And how many?", "Count them."),
    "position": ("Where is it?", "And where?", "Where are they?"),
    "describe": ("Describe it.", "Now describe the picture.", "Describe it in one line."),
}

GREETINGS = ("Hello!", "Hi", "Hi there!", "Hello", "Hey", "Good morning!", "hello", "hi!")
IDENTITY_QUESTIONS = (
    "Who are you?",
    "What are you?",
    "What model are you?",
    "Are you Llama 4?",
    "Tell me about yourself.",
    "What can you do?",
)
ADDITION_TEMPLATES = ("What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.", "{a} + {b} = ?")


def addition_answer(a: int, b: int) -> str:
    return f"{a} plus {b} is {a + b}."


def text_turn(rng: random.Random) -> tuple[str, str]:
    """A text-only (question, answer) pair."""
    roll = rng.random()
    if roll < 0.25:
        return rng.choice(GREETINGS), GREETING
    if roll < 0.45:
        return rng.choice(IDENTITY_QUESTIONS), IDENTITY
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return rng.choice(ADDITION_TEMPLATES).format(a=a, b=b), addition_answer(a, b)


def image_message(question: str, image_first: bool = True) -> dict:
    parts = [{"type": "image"}, {"type": "text", "text": question}]
    return {"role": "user", "content": parts if image_first else parts[::-1]}


def random_dialog(rng: random.Random) -> tuple[list[dict], list[Scene]]:
    """(messages with the assistant turns, the scenes whose images they show) for one training example.

    Questions are about the latest picture: one chat in five shows a second picture after the first one's
    questions, so that the model learns to answer about the newest image rather than an earlier one.
    """
    roll = rng.random()
    if roll < 0.10:  # text only, one or two turns
        messages: list[dict] = []
        for _ in range(rng.choice((1, 1, 2))):
            q, a = text_turn(rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages, []
    messages = []
    if rng.random() < 0.05:
        messages.append({"role": "system", "content": rng.choice(("You are a helpful assistant.", "Be brief."))})
    if rng.random() < 0.05:
        q, a = text_turn(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    scenes = [random_scene(rng)]
    messages += _image_turns(rng, scenes[0], rng.choice((0, 1, 2, 2, 3, 3, 4)))
    if rng.random() < 0.2:
        scenes.append(random_scene(rng))
        messages += _image_turns(rng, scenes[1], rng.choice((0, 1, 2)))
    return messages, scenes


def _image_turns(rng: random.Random, scene: Scene, follow_ups: int) -> list[dict]:
    """A question about a new picture of ``scene`` and its answer, then ``follow_ups`` text-only questions
    about it (several answers per image make the costly image tokens pay off)."""
    tasks = list(QUESTIONS)
    first = rng.choices(tasks, (3, 2, 3, 1.5, 2))[0]
    questions, answer = QUESTIONS[first]
    messages = [image_message(rng.choice(questions), rng.random() < 0.85),
                {"role": "assistant", "content": answer(scene)}]
    others = [t for t in tasks if t != first]
    rng.shuffle(others)
    for follow in others[:follow_ups]:
        text = rng.choice(FOLLOW_UPS[follow] + QUESTIONS[follow][0])
        messages += [{"role": "user", "content": text},
                     {"role": "assistant", "content": QUESTIONS[follow][1](scene)}]
    return messages


def corpus(rng: random.Random, n: int = 4000) -> list[str]:
    """Plain text of many dialogs (and some general words) for training the BPE tokenizer."""
    texts = []
    for _ in range(n):
        messages, _ = random_dialog(rng)
        for m in messages:
            c = m["content"]
            texts.append(c if isinstance(c, str) else " ".join(p.get("text", "") for p in c))
    texts += list(GREETINGS) + list(IDENTITY_QUESTIONS) + [IDENTITY, GREETING]
    texts += ["user\n\n", "assistant\n\n", "system\n\n", "ipython\n\n"] * 200  # chat-template headers
    return texts
