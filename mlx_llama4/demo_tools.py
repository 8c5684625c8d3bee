"""The demo model's tools, as it is trained to call them: their specs, the one source for the training chats
(``training/tool_chats.py``) and for the app that offers and runs them (``app/tools.py``).

Specs are in OpenAI's function format, ``{"type": "function", "function": {"name", "description",
"parameters"}}``, which the chat template writes into the prompt. They are deliberately plain (no enum of the
shapes and colours, no example expression): the training notes why. ``SHAPES`` and ``COLOURS`` are the demo
world's names, which ``draw_shape`` accepts.
"""

from __future__ import annotations

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {  # name -> RGB
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "orange": (245, 135, 20),
    "purple": (140, 50, 180),
}


def _tool(name: str, description: str, properties: dict) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(properties)}}}


TOOLS = {
    "calculator": _tool("calculator", "Work out an arithmetic expression.", {"expression": {"type": "string"}}),
    "draw_shape": _tool("draw_shape", "Draw a shape in a colour.",
                        {"shape": {"type": "string"}, "colour": {"type": "string"}}),
    "random_number": _tool("random_number", "Pick a random whole number from low to high.",
                           {"low": {"type": "integer"}, "high": {"type": "integer"}}),
}
TOOL_NAMES = tuple(TOOLS)
