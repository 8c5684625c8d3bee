"""The demo tools (``mlx_llama4.demo_tools``) run by the app, locally and safely, when the model calls them.

``run_tool`` never raises for what the model wrote: an unknown tool, missing or wrong arguments, a bad
expression all come back as the result text ("error: ..."), which the model reads and the chat shows.
The calculator parses with ``ast`` and evaluates numbers and ``+ - * / **``, parentheses and a sign, nothing
else (no names, no calls, no ``eval``); numbers are bounded so that an expression cannot run for ever.
``draw_shape`` saves a small PNG in Gradio's upload folder, where the chat can show it and the browser can
send it back with the history.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageDraw

from mlx_llama4.demo_tools import COLOURS, SHAPES, TOOLS

MAX_LENGTH = 500  # characters of an expression
MAX_BITS = 14_000  # the largest whole number a step may make (4,200 digits; str() takes 4,300): 9 ** 9 ** 9 never ends
DRAWING_SIZE = 160  # pixels, square
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Pow: operator.pow}


class ToolError(ValueError):
    """What the model asked of a tool cannot be done; the message goes back to it as the result."""


@dataclass(frozen=True)
class ToolUse:
    """One call the model made in a turn, and what came of it (``image``: a drawing's file)."""

    name: str
    arguments: dict
    result: str
    image: Optional[str] = None
    failed: bool = False


def calculator(expression: str) -> str:
    """The value of an arithmetic ``expression`` ("17 * (3 + 4) ** 2"), as a whole number where it is one."""
    if not isinstance(expression, str):
        raise ToolError(f"expression must be a string, got {expression!r}")
    if len(expression) > MAX_LENGTH:
        raise ToolError(f"the expression is longer than {MAX_LENGTH} characters")
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    except SyntaxError:
        raise ToolError(f"{expression!r} is not an arithmetic expression") from None
    except RecursionError:  # "- - - ... 1", nested too deep for Python's parser or for _evaluate
        raise ToolError("the expression is nested too deeply") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError(f"{expression!r} has no finite value")
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(left) > 1 and abs(right) * math.log2(abs(left)) > MAX_BITS:
            raise ToolError("the result is too large")
        try:
            value = _OPERATORS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("the result is too large") from None
        if isinstance(value, complex) or (isinstance(value, int) and value.bit_length() > MAX_BITS):
            raise ToolError("the result is too large" if isinstance(value, int) else "the result is not a real number")
        return value
    raise ToolError(f"only numbers, + - * / ** and parentheses are allowed, not {ast.unparse(node)!r}")


def random_number(low: int, high: int) -> str:
    """A random whole number from ``low`` to ``high``, both included."""
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ToolError(f"{name} must be a whole number, got {value!r}")
    if low > high:
        raise ToolError(f"low ({low}) is above high ({high})")
    return str(random.randint(low, high))


def draw_shape(shape: str, colour: str, folder: Path) -> Path:
    """A PNG of one ``colour`` ``shape`` on white, saved in a new subfolder of ``folder``."""
    shape, colour = str(shape).strip().lower(), str(colour).strip().lower()
    if shape not in SHAPES:
        raise ToolError(f"I can draw a {', a '.join(SHAPES)}, not a {shape!r}")
    if colour not in COLOURS:
        raise ToolError(f"the colours are {', '.join(COLOURS)}, not {colour!r}")
    image = Image.new("RGB", (DRAWING_SIZE, DRAWING_SIZE), "white")
    draw = ImageDraw.Draw(image)
    c, r = DRAWING_SIZE / 2, DRAWING_SIZE * 0.4
    if shape == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=COLOURS[colour])
    else:  # a regular polygon; a star's every other corner drawn in to 0.42 of the radius
        corners = {"square": 4, "triangle": 3, "star": 10}[shape]
        turn = math.pi / 4 if shape == "square" else -math.pi / 2
        radii = [r if shape != "star" or k % 2 == 0 else 0.42 * r for k in range(corners)]
        draw.polygon([(c + radii[k] * math.cos(turn + 2 * math.pi * k / corners),
                       c + radii[k] * math.sin(turn + 2 * math.pi * k / corners)) for k in range(corners)],
                     fill=COLOURS[colour])
    path = folder / "drawings" / uuid.uuid4().hex / f"{colour}_{shape}.png"
    path.parent.mkdir(parents=True)
    image.save(path)
    return path


def run_tool(name: str, arguments: Any, folder: Path) -> ToolUse:
    """Run the tool ``name`` with ``arguments`` (a dict, as the model wrote them); drawings go under ``folder``."""
    args = arguments if isinstance(arguments, dict) else {}
    try:
        if name not in TOOLS:
            raise ToolError(f"there is no tool {name!r}; the tools are {', '.join(TOOLS)}")
        if not isinstance(arguments, dict):
            raise ToolError(f"the arguments must be an object, got {arguments!r}")
        expected = list(TOOLS[name]["function"]["parameters"]["properties"])
        if set(args) != set(expected):
            raise ToolError(f"{name} takes {', '.join(expected)}; got {', '.join(args) or 'nothing'}")
        if name == "draw_shape":
            path = draw_shape(args["shape"], args["colour"], folder)
            return ToolUse(name, args, path.name, image=str(path))
        return ToolUse(name, args, calculator(**args) if name == "calculator" else random_number(**args))
    except ToolError as e:
        return ToolUse(name, args, f"error: {e}", failed=True)
