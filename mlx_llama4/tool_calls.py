"""Tool calls in Llama 4 replies: one parser for the forms the checkpoints emit, whole or while streaming.

The forms, each possibly after a sentence of prose:

- Meta's pythonic list (``models/llama4/prompt_format.md`` in Meta's llama-models), parallel calls native:
  ``[get_weather(city="San Francisco"), get_weather(city="Seattle")]``;
- the Hugging Face chat template's JSON, one object per call written back to back after the python tags:
  ``<|python_start|><|python_end|>{"name": "get_weather", "parameters": {"city": "Seattle"}}``;
- JSON ``{"name": ..., "parameters" | "arguments": {...}}`` alone or in a list, with or without the tags.

Argument values must be literals: strings, numbers, ``true`` / ``false`` / ``null`` and Python's ``True`` /
``False`` / ``None``, lists, tuples and dicts. They are read by the small recursive-descent parser below, whose
string and number tokens are decoded by ``json`` or ``ast.literal_eval``: nothing is ever evaluated. A bracket
that does not open a well-formed call (a non-literal argument, a positional one, a name that is not one of the
known tools, prose such as ``[1]`` or ``[see(this)]``) stays content, character for character. The special
tokens ``<|python_start|>``, ``<|python_end|>`` and the end tokens are dropped from content; ``stream_generate``'s
text carries them as text (mlx-lm's detokenizer does not skip special tokens), so no separate signal is needed.

Streaming (``ToolCallParser.feed``) emits OpenAI chat-completion deltas: content as soon as it cannot be the start
of a call, and each call once its block (a pythonic list, a JSON object or a JSON list) has closed and parsed:
first ``{"index", "id", "type": "function", "function": {"name", "arguments": ""}}``, then its ``arguments``
(a JSON object as a string). A call is never sent before its block is known to be valid, because an OpenAI stream
cannot take back a delta: a non-literal value late in a block would otherwise leave a half-sent call that the
whole-text parse rejects. Whitespace around a call block is not content. Feeding a text in any pieces gives the
same deltas' concatenation as ``parse_tool_calls`` on the whole text.
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

# Special tokens that reach the parser as text and are never content.
MARKERS = ("<|python_start|>", "<|python_end|>", "<|eot|>", "<|eom|>", "<|end_of_text|>")
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS))

_LITERAL_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_CALL_KEYS = ("name", "parameters", "arguments", "type")
_ARGUMENT_KEYS = ("parameters", "arguments")

_PUNCTUATION = "[](){},:=+-"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD_TAIL = re.compile(r"[\w.+-]*\Z")  # what may still turn out to belong to a name or number
_NUMBER = re.compile(r"(?:0[xXoObB][0-9a-fA-F_]+|\d[\d_]*(?:\.[\d_]*)?(?:[eE][+-]?\d[\d_]*)?)[jJ]?")
_STRINGS = {
    '"""': re.compile(r'"""(?:[^"\\]|\\.|"(?!""))*"""', re.S),
    "'''": re.compile(r"'''(?:[^'\\]|\\.|'(?!''))*'''", re.S),
    '"': re.compile(r'"(?:[^"\\\n]|\\.)*"', re.S),
    "'": re.compile(r"'(?:[^'\\\n]|\\.)*'", re.S),
}
# A one-line string not closed yet, up to the end of the text (it may still close).
_OPEN_STRINGS = {'"': re.compile(r'"(?:[^"\\\n]|\\.)*\\?\Z', re.S), "'": re.compile(r"'(?:[^'\\\n]|\\.)*\\?\Z", re.S)}


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; ``arguments`` is a JSON object as a string (OpenAI's ``function.arguments``)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_calls(text: str, tools: Optional[Iterable[Any]] = None) -> tuple[str, list[ToolCall]]:
    """(content, tool calls) of a whole reply; ``tools`` as for ``ToolCallParser``."""
    parser = ToolCallParser(tools)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.tool_calls


class ToolCallParser:
    """Splits a streamed reply into content and tool calls, as OpenAI chat-completion deltas.

    ``tools``: the tools offered (names, or OpenAI / Hugging Face tool specs); when given, only calls to them
    are taken, so prose that merely looks like a call stays content. Without them any identifier is a name.
    ``feed(text)`` and then ``finish()`` return lists of deltas, ``{"content": str}`` or
    ``{"tool_calls": [{"index", ...}]}``; ``content`` and ``tool_calls`` hold everything so far.
    """

    def __init__(self, tools: Optional[Iterable[Any]] = None):
        self._names = None if tools is None else {spec["name"] for spec in function_specs(tools)}
        self._raw = ""  # a tail that may be the start of a special token
        self._pending = ""  # text not decided yet: held whitespace, then a block that may still become a call
        # After a call block: the whitespace that separated it from earlier content, put back only if more
        # content follows (whitespace around call blocks is not content); None elsewhere.
        self._gap: Optional[str] = None
        self._block: Optional[_Block] = None  # the call block being read, which starts in _pending
        self.content = ""
        self.tool_calls: list[ToolCall] = []

    def feed(self, text: str) -> list[dict]:
        return self._scan(self._drop_markers(text, final=False), final=False)

    def finish(self) -> list[dict]:
        """Decide what is left: a block that never closed is content."""
        return self._scan(self._drop_markers("", final=True), final=True)

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        """OpenAI's finish reason for a reply that ended with generation's ``reason`` ("stop" or "length")."""
        return "tool_calls" if reason == "stop" and self.tool_calls else reason

    def _drop_markers(self, text: str, final: bool) -> str:
        text = _MARKER_RE.sub("", self._raw + text)
        keep = 0 if final else _marker_prefix_length(text)
        self._raw = text[len(text) - keep :]
        return text[: len(text) - keep]

    def _scan(self, text: str, final: bool) -> list[dict]:
        deltas: list[dict] = []
        pending = self._pending + text
        while True:
            if self._block is None:
                if self._gap is not None:
                    pending = pending.lstrip()
                    if not pending:
                        break
                start = _first_bracket(pending)
                if start < 0:
                    prose = pending if final else pending[: len(pending.rstrip())]
                    self._emit_content(prose, deltas)
                    pending = pending[len(prose) :]
                    break
                prose = pending[:start].rstrip()  # its trailing whitespace is not content if a call follows
                self._emit_content(prose, deltas)
                pending = pending[len(prose) :]
                self._block = _Block(start - len(prose), self._names)
            try:
                done = self._block.advance(pending, final)
            except _Invalid as bad:  # the text up to the offending token is prose; look for calls after it
                prose = pending[: len(pending[: bad.at].rstrip())]
                self._emit_content(prose, deltas)
                pending = pending[len(prose) :]
                self._block = None
                continue
            if done is None:
                break
            calls, end = done
            if self._gap is None:
                self._gap = pending[: self._block.start] if self.content else ""
            for name, arguments in calls:
                self._emit_call(name, arguments, deltas)
            pending = pending[end:]
            self._block = None
        self._pending = pending
        return deltas

    def _emit_content(self, text: str, deltas: list[dict]) -> None:
        if text:
            if self._gap is not None:
                text, self._gap = self._gap + text, None
            self.content += text
            deltas.append({"content": text})

    def _emit_call(self, name: str, arguments: dict, deltas: list[dict]) -> None:
        call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False))
        index = len(self.tool_calls)
        self.tool_calls.append(call)
        deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                       "function": {"name": name, "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})


def _marker_prefix_length(text: str) -> int:
    """Length of the end of ``text`` that may be the start of a special token (none has a "<" inside)."""
    at = text.rfind("<")
    return len(text) - at if at >= 0 and any(m.startswith(text[at:]) for m in MARKERS) else 0


def _first_bracket(text: str) -> int:
    found = [i for i in (text.find("["), text.find("{")) if i >= 0]
    return min(found, default=-1)


# ------------------------------------------------------------------------------------------------
# Parsing one call block
# ------------------------------------------------------------------------------------------------


class _NeedMore(Exception):
    """The text so far may be the start of a call block: wait for more. ``until``: only these characters can
    change that (a long string argument is not scanned again for every piece); empty: any can."""

    def __init__(self, until: str = ""):
        self.until = until


class _Invalid(Exception):
    """Not a call block; ``at`` is where the offending token starts."""

    def __init__(self, at: int):
        self.at = at


class _Token(NamedTuple):
    kind: str  # "str", "num", "name", or the punctuation character itself
    value: Any
    start: int
    end: int


_PEEK, _NEXT = "peek", "next"  # what the parser asks for: the next token, kept or consumed


class _Block:
    """Incremental recursive-descent parser of one call block starting at ``start`` (a ``[`` or ``{``).

    The parser is a generator that asks for tokens (``yield _PEEK`` / ``yield _NEXT``), so it waits for the
    text to grow without parsing it again. ``advance(text, final)`` returns ([(name, arguments)], end) once the
    block has closed, None while it may still become one (never when ``final``), or raises ``_Invalid``.
    A prefix of a valid block is never ``_Invalid``, so streaming can wait safely.
    """

    def __init__(self, start: int, names: Optional[set[str]]):
        self.start = self.pos = start  # the block's first character; the next token's start
        self.names = names
        self._lookahead: Optional[_Token] = None
        self._until, self._seen = "", 0  # the last _NeedMore's characters, and how much text it had seen
        self._steps = self._parse()
        self._request = next(self._steps)

    def advance(self, text: str, final: bool) -> Optional[tuple[list[tuple[str, dict]], int]]:
        while True:
            if self._lookahead is None:
                if self._until and not final and not any(c in text[self._seen :] for c in self._until):
                    self._seen = len(text)
                    return None
                try:
                    self._lookahead = _lex(text, self.pos, final)
                except _NeedMore as wait:
                    self._until, self._seen = wait.until, len(text)
                    return None
                self._until = ""
            token = self._lookahead
            if self._request is _NEXT:
                self._lookahead, self.pos = None, token.end
            try:
                self._request = self._steps.send(token)
            except StopIteration as done:
                return done.value, token.end

    # ---- grammar ---------------------------------------------------------------------------------

    def _parse(self):
        first = yield _PEEK
        if first.kind == "{":
            return [(yield from self._json_call())]
        yield from self._expect("[")
        first = yield _PEEK
        if first.kind == "name":
            return (yield from self._items("]", self._python_call))
        if first.kind == "{":
            return (yield from self._items("]", self._json_call))
        raise _Invalid(first.start)

    def _expect(self, punct: str):
        token = yield _NEXT
        if token.kind != punct:
            raise _Invalid(token.start)

    def _items(self, close: str, item: Callable):
        """``item``s separated by commas up to ``close`` (a trailing comma allowed), the opening already read."""
        out = []
        while True:
            if (yield _PEEK).kind == close:
                yield _NEXT
                return out
            out.append((yield from item()))
            token = yield _NEXT
            if token.kind == close:
                return out
            if token.kind != ",":
                raise _Invalid(token.start)

    def _known(self, name: Any) -> bool:
        return isinstance(name, str) and (name.isidentifier() if self.names is None else name in self.names)

    def _python_call(self):
        """``name(key=value, ...)``: keyword arguments only."""
        name = yield _NEXT
        if name.kind != "name" or not self._known(name.value):
            raise _Invalid(name.start)
        yield from self._expect("(")
        arguments: dict = {}

        def keyword():
            key = yield _NEXT
            if key.kind != "name" or key.value in arguments:
                raise _Invalid(key.start)
            yield from self._expect("=")
            arguments[key.value] = yield from self._value()

        yield from self._items(")", keyword)
        return name.value, arguments

    def _json_call(self):
        """``{"name": ..., "parameters" | "arguments": {...}}``, optionally with ``"type": "function"``. Arguments
        given as a string holding a JSON object are accepted: the Hugging Face template renders OpenAI-style
        history that way."""
        yield from self._expect("{")
        fields: dict = {}

        def field():
            key = yield _NEXT
            if (key.kind != "str" or key.value not in _CALL_KEYS or key.value in fields
                    or (key.value in _ARGUMENT_KEYS and fields.keys() & set(_ARGUMENT_KEYS))):
                raise _Invalid(key.start)
            yield from self._expect(":")
            at = (yield _PEEK).start
            value = yield from self._value()
            if key.value == "name" and not self._known(value):
                raise _Invalid(at)
            if key.value == "type" and value != "function":
                raise _Invalid(at)
            if key.value in _ARGUMENT_KEYS:
                value = _json_object(value) if isinstance(value, str) else value
                if not isinstance(value, dict):
                    raise _Invalid(at)
            fields[key.value] = value

        yield from self._items("}", field)
        if "name" not in fields or not fields.keys() & set(_ARGUMENT_KEYS):
            raise _Invalid(self.pos - 1)  # the closing brace
        return fields["name"], fields.get("parameters", fields.get("arguments"))

    def _value(self):
        token = yield _NEXT
        if token.kind in ("str", "num"):
            return token.value
        if token.kind == "name":
            if token.value in _LITERAL_NAMES:
                return _LITERAL_NAMES[token.value]
            raise _Invalid(token.start)
        if token.kind in ("+", "-"):
            number = yield _NEXT
            if number.kind != "num":
                raise _Invalid(number.start)
            return -number.value if token.kind == "-" else number.value
        if token.kind == "[":
            return (yield from self._items("]", self._value))
        if token.kind == "{":
            return dict((yield from self._items("}", self._pair)))
        if token.kind == "(":  # a parenthesised value, or a tuple (a JSON list)
            if (yield _PEEK).kind == ")":
                yield _NEXT
                return []
            first = yield from self._value()
            after = yield _NEXT
            if after.kind == ")":
                return first
            if after.kind != ",":
                raise _Invalid(after.start)
            return [first, *(yield from self._items(")", self._value))]
        raise _Invalid(token.start)

    def _pair(self):
        key = yield _NEXT
        if key.kind != "str":  # JSON object keys are strings
            raise _Invalid(key.start)
        yield from self._expect(":")
        return key.value, (yield from self._value())


def _lex(text: str, pos: int, final: bool) -> _Token:
    """The token at ``pos`` (after whitespace). A name or number that may still grow at the end of the text is
    ``_NeedMore`` unless ``final``."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos == len(text):
        if final:
            raise _Invalid(pos)
        raise _NeedMore
    char = text[pos]
    if char in _PUNCTUATION:
        return _Token(char, char, pos, pos + 1)
    if char in "\"'":
        kind, match = "str", _match_string(text, pos, final)
    elif char.isdigit():
        kind, match = "num", _NUMBER.match(text, pos)
    elif _NAME.match(text, pos):
        kind, match = "name", _NAME.match(text, pos)
    else:
        raise _Invalid(pos)
    if not final and kind != "str" and _WORD_TAIL.match(text, match.end()):
        raise _NeedMore  # a name or number may go on ("2.5e" -> "2.5e1")
    raw = match.group()
    value = raw if kind == "name" else _decode_literal(raw, pos)
    return _Token(kind, value, pos, match.end())


def _match_string(text: str, pos: int, final: bool) -> re.Match:
    quote = text[pos]
    if text.startswith(quote * 3, pos):
        match = _STRINGS[quote * 3].match(text, pos)
    elif not final and text[pos:] == quote * 2:
        raise _NeedMore  # an empty string, or the start of a triple-quoted one
    else:
        match = _STRINGS[quote].match(text, pos)
    if match:
        return match
    if not final and text.startswith(quote * 3, pos):
        raise _NeedMore(quote)
    if not final and _OPEN_STRINGS[quote].match(text, pos):
        raise _NeedMore(quote + "\n")
    raise _Invalid(pos)


def _decode_literal(raw: str, pos: int) -> Any:
    """A string or number token's value: JSON first, then Python's literal syntax (never evaluated)."""
    try:
        value = json.loads(raw)
    except ValueError:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes such as "\d"
                value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise _Invalid(pos) from None
    if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)):
        raise _Invalid(pos)
    return value


def _json_object(text: str) -> Optional[dict]:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------------


def function_specs(tools: Iterable[Any]) -> list[dict]:
    """``[{"name", "parameters"}]`` of tools given as names, OpenAI specs (``{"type": "function", "function":
    {...}}``) or Hugging Face / Meta specs (``{"name", "description", "parameters"}``)."""
    specs = []
    for tool in tools:
        if isinstance(tool, str):
            tool = {"name": tool}
        if not isinstance(tool, Mapping):
            raise ValueError(f"a tool must be a name or a JSON spec with a 'name', got {type(tool).__name__}")
        function = tool.get("function", tool)
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"a tool spec has no 'name': {dict(tool)!r}")
        specs.append({"name": name, "parameters": function.get("parameters") or {"type": "object"}})
    return specs


def tool_call_schema(tools: Iterable[Any], choice: Any = "required", parallel: bool = False) -> dict:
    """The JSON schema of a reply that must call a tool, in the checkpoint's JSON form
    ``{"name": <tool>, "parameters": <its parameters>}``: for OpenAI's ``tool_choice`` ``"required"`` any of
    ``tools``, for a named function (its name or ``{"type": "function", "function": {"name": ...}}``) that one.
    With ``parallel`` the reply is a non-empty list of calls. Enforce it with ``structured.JSONConstraint``;
    ``parse_tool_calls`` reads the result."""
    specs = function_specs(tools)
    if isinstance(choice, Mapping):
        choice = (choice.get("function") or {}).get("name")
    if choice in (None, "auto", "none"):
        raise ValueError(f"tool_choice {choice!r} does not force a call; only 'required' or a function name does")
    if choice != "required":
        specs = [spec for spec in specs if spec["name"] == choice]
        if not specs:
            raise ValueError(f"tool_choice names {choice!r}, which is not among the tools "
                             f"{[s['name'] for s in function_specs(tools)]}")
    if not specs:
        raise ValueError("tool_choice 'required' needs at least one tool")
    call = {"anyOf": [
        {"type": "object",
         "properties": {"name": {"const": spec["name"]}, "parameters": spec["parameters"]},
         "required": ["name", "parameters"], "additionalProperties": False}
        for spec in specs
    ]}
    return {"type": "array", "items": call, "minItems": 1} if parallel else call
