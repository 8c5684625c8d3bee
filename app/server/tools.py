"""Tool calling as both APIs (OpenAI chat completions, Anthropic messages) share it.

- The tools offered reach the prompt through the checkpoint's chat template (``tools=``), in OpenAI's function
  format ``{"type": "function", "function": {"name", "description", "parameters"}}``, the format transformers'
  chat templates take; Llama 4's template writes each spec as JSON into the first user message. ``tool_choice``
  "none" leaves them out of the prompt entirely, and the reply is then not searched for calls.
- "required" or a named function constrains decoding (``mlx_llama4.tool_calls.tool_call_schema``) to one call
  in the checkpoint's own JSON form, ``{"name": ..., "parameters": {...}}``: the form its template writes past
  calls in, so a forced call reads exactly like a call in the history. (A list of calls would be a form the
  template never writes, so a forced reply is one call; an "auto" reply may hold several.)
- A past call goes back to the template with its arguments as an object, which the template writes with
  ``tojson``: the model reads back the very JSON it wrote, not a JSON string inside JSON.
- Replies are split into text and calls by ``mlx_llama4.tool_calls.ToolCallParser``, whole or streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from mlx_llama4.tool_calls import ToolCallParser, tool_call_schema

from .engine_client import JSONOutput
from .errors import APIError

ToolChoice = Union[str, dict, None]  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools do: ``offered`` go into the prompt and are looked for in the reply (None: no
    tools in play); ``forced`` is the JSON schema a reply must follow to call one (None: the model chooses)."""

    offered: Optional[list[dict]] = None
    forced: Optional[JSONOutput] = None


def plan_tools(tools: Optional[list[dict]], choice: ToolChoice, field: str = "tool_choice") -> ToolPlan:
    """The plan for OpenAI-format ``tools`` and an OpenAI-style ``choice``; a 400 naming ``field`` when the
    choice cannot be met (no tools to require, a name not among them)."""
    if choice == "none" or (not tools and choice in (None, "auto")):
        return ToolPlan()
    if not tools:
        raise APIError(400, f"{field}: {choice!r} needs tools to choose from, and the request has none", param=field)
    if choice in (None, "auto"):
        return ToolPlan(tools)
    try:
        return ToolPlan(tools, JSONOutput(tool_call_schema(tools, choice), field))
    except ValueError as e:
        raise APIError(400, f"{field}: {e}", param=field) from None


def template_call(name: str, arguments: dict) -> dict:
    """A past call as the chat template reads it (``tool_calls`` of an assistant message)."""
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def check_tools_fit(messages: list[dict], plan: ToolPlan, field: str) -> None:
    """Llama 4's template writes the tools as text in front of the first user turn's content, which must then
    be text (its images would be lost); a 400 naming ``field`` otherwise."""
    if plan.offered is None:
        return
    first = next((m for m in messages if m["role"] != "system"), None)
    if first is not None and not isinstance(first["content"], str):
        raise APIError(400, f"{field}: the first user message holds an image, and the chat template writes the "
                            "tools as text in front of that message's content; send the image in a later message",
                       param=field)


def with_json_output(plan: ToolPlan, response_schema: Optional[dict], field: str) -> Optional[JSONOutput]:
    """The one JSON schema the reply follows: a forced call's or the response format's (not both)."""
    if plan.forced is not None and response_schema is not None:
        raise APIError(400, f"{field}: a JSON response format cannot be combined with a forced tool call "
                            f"({plan.forced.field})", param=field)
    if response_schema is not None:
        return JSONOutput(response_schema, field)
    return plan.forced


def parse_reply(text: str, plan: ToolPlan) -> ToolCallParser:
    """A whole reply split into ``content`` and ``tool_calls`` (``finish_reason`` maps the engine's)."""
    parser = ToolCallParser(plan.offered)
    parser.feed(text)
    parser.finish()
    return parser
