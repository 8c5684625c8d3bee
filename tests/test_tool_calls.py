"""The tool-call parser on golden replies in every form Llama 4 checkpoints emit, whole and streamed in pieces.

Each golden reply is parsed whole, then streamed split at every character boundary, one character at a time and
in random token-like pieces; the streamed deltas, assembled the way an OpenAI client does, must equal the whole
parse. The forms: Meta's pythonic list (``models/llama4/prompt_format.md`` in llama-models), the Hugging Face
chat template's JSON after ``<|python_start|><|python_end|>``, JSON objects or lists with or without the tags,
each possibly after prose.
"""

import json
import random

import pytest

from mlx_llama4.tool_calls import ToolCallParser, function_specs, parse_tool_calls, tool_call_schema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

# (reply, tools or None, content, [(name, arguments)])
GOLDEN = [
    # Meta's two-call example (prompt_format.md, "Zero shot function calling - system message").
    ('[get_weather(city="San Francisco"), get_weather(city="Seattle")]<|eot|>', None, "",
     [("get_weather", {"city": "San Francisco"}), ("get_weather", {"city": "Seattle"})]),
    ('[get_weather(city="San Francisco"), get_time(zone="PST")]<|eot|>', None, "",
     [("get_weather", {"city": "San Francisco"}), ("get_time", {"zone": "PST"})]),
    # Meta's user-message example: an integer and a single-quoted string.
    ("[get_user_info(user_id=7890, special='black')]<|eot|>", None, "",
     [("get_user_info", {"user_id": 7890, "special": "black"})]),
    # The Hugging Face template's form, one call and two calls back to back.
    ('<|python_start|><|python_end|>{"name": "get_weather", "parameters": {"city": "Seattle"}}<|eot|>', None, "",
     [("get_weather", {"city": "Seattle"})]),
    ('<|python_start|><|python_end|>{"name": "get_weather", "parameters": {"city": "Oslo"}}'
     '{"name": "get_time", "parameters": {"zone": "CET"}}<|eom|>', None, "",
     [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]),
    # JSON inside the tags, "arguments" instead of "parameters".
    ('<|python_start|>{"name": "get_weather", "arguments": {"city": "Paris"}}<|python_end|><|eom|>', None, "",
     [("get_weather", {"city": "Paris"})]),
    # JSON alone, a JSON list, Llama 3's "type": "function".
    ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', None, "",
     [("get_weather", {"city": "Paris", "days": 3})]),
    ('[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "arguments": {"zone": "CET"}}]',
     None, "", [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    ('{"type": "function", "name": "get_time", "parameters": {"zone": "UTC"}}', None, "",
     [("get_time", {"zone": "UTC"})]),
    # Arguments as a string holding JSON, as the template renders OpenAI-style history.
    ('{"name": "get_weather", "parameters": "{\\"city\\": \\"Rome\\"}"}', None, "",
     [("get_weather", {"city": "Rome"})]),
    # Prose before the call, in both forms; prose after a call.
    ('Let me check the weather: [get_weather(city="New York")]', None, "Let me check the weather:",
     [("get_weather", {"city": "New York"})]),
    ('I\'ll look that up.\n\n<|python_start|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
     "I'll look that up.", [("get_weather", {"city": "Oslo"})]),
    ('[get_weather(city="Paris")]\nChecking now.', None, "Checking now.", [("get_weather", {"city": "Paris"})]),
    ("I think [a] b [get_time(zone='UTC')] c", None, "I think [a] b c", [("get_time", {"zone": "UTC"})]),
    # Nested dicts and lists, tuples, negative and float numbers.
    ('[search(filters={"tags": ["a", "b"], "range": {"min": -1, "max": 2.5e1}}, ids=[[1, 2], [3]], pair=(1, "x"))]',
     None, "", [("search", {"filters": {"tags": ["a", "b"], "range": {"min": -1, "max": 25.0}},
                            "ids": [[1, 2], [3]], "pair": [1, "x"]})]),
    ('{"name": "search", "parameters": {"q": {"all": [{"k": [1, {"deep": [true]}]}]}}}', None, "",
     [("search", {"q": {"all": [{"k": [1, {"deep": [True]}]}]}})]),
    # JSON's and Python's literals.
    ("[set_flags(a=true, b=false, c=null, d=True, e=False, f=None)]", None, "",
     [("set_flags", {"a": True, "b": False, "c": None, "d": True, "e": False, "f": None})]),
    ('{"name": "set_flags", "parameters": {"a": True, "b": None, "c": false}}', None, "",
     [("set_flags", {"a": True, "b": None, "c": False})]),
    # Strings holding brackets, quotes, escapes, unicode; a triple-quoted string; no arguments.
    ('[note(text="a ] tricky ) \\"quoted\\" [string], \\u00e9t\\u00e9 😀", more=\'it\\\'s\')]', None, "",
     [("note", {"text": 'a ] tricky ) "quoted" [string], été 😀', "more": "it's"})]),
    ('[run(code="""print(1)\nprint("[x]")""")]', None, "", [("run", {"code": 'print(1)\nprint("[x]")'})]),
    ("[get_time()]", None, "", [("get_time", {})]),
    ("[calc(a=1e-3, b=-0.5, c=+7, d=1_000, e=0x1F, f=2.)]", None, "",
     [("calc", {"a": 0.001, "b": -0.5, "c": 7, "d": 1000, "e": 31, "f": 2.0})]),
    # Not calls: content, character for character (special tokens aside), never evaluated.
    ('[f(x=open("/etc/passwd"))]', None, '[f(x=open("/etc/passwd"))]', []),
    ('f(x=open("/etc/passwd"))', None, 'f(x=open("/etc/passwd"))', []),
    ('[get_weather(city="Paris"), f(x=open("/etc/passwd"))]<|eot|>', None,
     '[get_weather(city="Paris"), f(x=open("/etc/passwd"))]', []),
    ('[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"x": os.environ}}]', None,
     '[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"x": os.environ}}]', []),
    ('Use a list like [1, 2, 3] or {"a": 1}; see [the docs](https://x.y), [see(this)] and [].', None,
     'Use a list like [1, 2, 3] or {"a": 1}; see [the docs](https://x.y), [see(this)] and [].', []),
    ('[get_weather("Paris")]', None, '[get_weather("Paris")]', []),
    ("[get_weather(city=Paris)]", None, "[get_weather(city=Paris)]", []),  # a variable, not a literal
    ('{"name": "get_weather", "parameters": {"city": paris}}', None,
     '{"name": "get_weather", "parameters": {"city": paris}}', []),
    ('{"name": "Alice", "age": 3}', None, '{"name": "Alice", "age": 3}', []),
    ("x < y, a <|b and [c] {d}\n", None, "x < y, a <|b and [c] {d}\n", []),
    # Cut by max_tokens inside a call: content.
    ('Sure. [get_weather(city="Par', None, 'Sure. [get_weather(city="Par', []),
    # Known tools: prose that looks like a call to something else stays content.
    ('[see(x=1)] then [get_weather(city="Paris")]', [WEATHER], "[see(x=1)] then",
     [("get_weather", {"city": "Paris"})]),
    ('{"name": "lookup", "parameters": {}}', ["get_weather"], '{"name": "lookup", "parameters": {}}', []),
]


def _assemble(deltas):
    """Content and calls from OpenAI deltas, as a client accumulates them; checks the delta shapes."""
    content, calls = "", {}
    for delta in deltas:
        assert set(delta) in ({"content"}, {"tool_calls"}), delta
        if "content" in delta:
            assert delta["content"]
            content += delta["content"]
            continue
        (part,) = delta["tool_calls"]
        index = part["index"]
        if index not in calls:  # the first delta of a call names it
            assert index == len(calls) and part["type"] == "function" and part["id"].startswith("call_")
            calls[index] = {"id": part["id"], "name": part["function"]["name"], "arguments": ""}
        else:
            assert "id" not in part and "name" not in part["function"]
        calls[index]["arguments"] += part["function"]["arguments"]
    return content, [calls[i] for i in range(len(calls))]


def _stream(pieces, tools):
    parser = ToolCallParser(tools)
    deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
    content, calls = _assemble(deltas)
    assert content == parser.content
    assert [(c["id"], c["name"], c["arguments"]) for c in calls] == [
        (c.id, c.name, c.arguments) for c in parser.tool_calls]
    return content, [(c["name"], c["arguments"]) for c in calls]


def _splits(text):
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    rng = random.Random(len(text))
    for _ in range(20):  # token-like pieces of 1 to 6 characters
        pieces, at = [], 0
        while at < len(text):
            n = rng.randint(1, 6)
            pieces.append(text[at : at + n])
            at += n
        yield pieces


@pytest.mark.parametrize("reply, tools, content, calls", GOLDEN, ids=[g[0][:40] for g in GOLDEN])
def test_golden_reply_whole(reply, tools, content, calls):
    got_content, got_calls = parse_tool_calls(reply, tools)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert [c.arguments for c in got_calls] == [json.dumps(a, ensure_ascii=False) for _, a in calls]
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("reply, tools, content, calls", GOLDEN, ids=[g[0][:40] for g in GOLDEN])
def test_golden_reply_streamed_in_any_pieces(reply, tools, content, calls):
    expected = (content, [(name, json.dumps(a, ensure_ascii=False)) for name, a in calls])
    for pieces in _splits(reply):
        assert _stream(pieces, tools) == expected, pieces


def test_content_is_not_held_back_when_it_cannot_start_a_call():
    parser = ToolCallParser()
    sent = lambda deltas: "".join(d["content"] for d in deltas)  # noqa: E731
    assert sent(parser.feed("The answer is 4.")) == "The answer is 4."
    assert sent(parser.feed(" Lists look like [1, 2] and")) == " Lists look like [1, 2] and"
    # A possible call start, trailing whitespace (it may precede a call) and a possible special token wait.
    assert sent(parser.feed(" [get_")) == ""
    assert sent(parser.feed("weather(")) == ""
    assert sent(parser.feed("x) <|py")) == " [get_weather(x)"
    assert sent(parser.feed("thon_start|>")) == ""
    assert sent(parser.finish()) == " "


def test_a_call_is_sent_when_its_block_closes_not_at_the_end():
    parser = ToolCallParser()
    assert parser.feed("[get_weather(city='Paris')") == []
    deltas = parser.feed("]")
    (first,), (second,) = (d["tool_calls"] for d in deltas)
    assert first == {"index": 0, "id": first["id"], "type": "function",
                     "function": {"name": "get_weather", "arguments": ""}}
    assert second == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert parser.feed('{"name": "get_time", "parameters": {}}')[0]["tool_calls"][0]["index"] == 1
    assert parser.finish() == []
    assert parser.finish_reason("stop") == "tool_calls"
    assert parser.finish_reason("length") == "length"
    assert ToolCallParser().finish_reason("stop") == "stop"
    assert parser.tool_calls[0].to_openai() == {
        "id": first["id"], "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.mark.parametrize("arguments, waits_per_piece", [
    ({"text": "x" * 20000}, False),  # a long string is not even scanned again until a quote arrives
    ({"rows": [{"id": i, "name": f"row {i}", "tags": ["a", "b"], "ok": True} for i in range(300)]}, True),
])
def test_streaming_reads_each_token_about_once(monkeypatch, arguments, waits_per_piece):
    """A long call streamed in small pieces is not parsed again from its start for every piece."""
    import mlx_llama4.tool_calls as tool_calls

    lexed = 0

    def counting_lex(*args):
        nonlocal lexed
        lexed += 1
        return real_lex(*args)

    real_lex = tool_calls._lex
    monkeypatch.setattr(tool_calls, "_lex", counting_lex)
    text = json.dumps({"name": "save", "parameters": arguments})
    assert parse_tool_calls(text)[1][0].arguments == json.dumps(arguments)
    whole, lexed = lexed, 0
    parser = ToolCallParser()
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    for piece in pieces:
        parser.feed(piece)
    parser.finish()
    assert parser.tool_calls[0].arguments == json.dumps(arguments)
    assert lexed <= whole + (len(pieces) if waits_per_piece else 20)


def test_non_literal_arguments_are_never_evaluated(tmp_path):
    marker = tmp_path / "evaluated"
    reply = f'[f(x=__import__("pathlib").Path({str(marker)!r}).touch())]'
    for text in (reply, reply.replace("[", "", 1)[:-1]):
        assert parse_tool_calls(text) == (text, [])
    assert not marker.exists()


def test_function_specs_accept_names_openai_and_flat_specs():
    flat = {"name": "get_time", "description": "", "parameters": {"type": "object"}}
    assert function_specs(["a", WEATHER, flat]) == [
        {"name": "a", "parameters": {"type": "object"}},
        {"name": "get_weather", "parameters": WEATHER["function"]["parameters"]},
        {"name": "get_time", "parameters": {"type": "object"}}]
    with pytest.raises(ValueError, match="no 'name'"):
        function_specs([{"type": "function", "function": {"parameters": {}}}])


def test_tool_call_schema():
    time = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}
    tools = [WEATHER, time]
    required = tool_call_schema(tools)
    assert [option["properties"]["name"] for option in required["anyOf"]] == [{"const": "get_weather"},
                                                                              {"const": "get_time"}]
    assert required["anyOf"][0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    named = tool_call_schema(tools, {"type": "function", "function": {"name": "get_time"}})
    assert [option["properties"]["name"] for option in named["anyOf"]] == [{"const": "get_time"}]
    assert tool_call_schema(tools, "get_time", parallel=True) == {"type": "array", "items": named, "minItems": 1}
    with pytest.raises(ValueError, match="'lookup', which is not among the tools"):
        tool_call_schema(tools, "lookup")
    with pytest.raises(ValueError, match="does not force a call"):
        tool_call_schema(tools, "auto")
