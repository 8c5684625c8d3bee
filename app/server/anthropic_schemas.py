"""Request bodies of Anthropic's Messages API (``POST /v1/messages``), validated with pydantic.

Field meanings follow Anthropic's reference (https://docs.anthropic.com/en/api/messages): ``system`` (a string
or text blocks), ``messages`` of ``user`` / ``assistant`` turns whose content is a string or blocks (``text``,
``image`` with a base64 or URL ``source``, ``tool_use`` in assistant turns, ``tool_result`` in user turns),
``max_tokens`` (required), ``stop_sequences``, ``temperature`` (0 to 1), ``top_p``, ``top_k``, ``stream``,
``tools`` (``name``, ``description``, ``input_schema``), ``tool_choice`` (``auto``, ``any``, ``tool``,
``none``) and structured output (``output_config.format``: ``{"type": "json_schema", "schema": {...}}``). As in
``openai_schemas``, validation is strict and names the field at fault, unknown fields
(``metadata``, ``cache_control``, ...) are ignored, and what the server cannot honour (extended thinking,
server tools, other block types) is refused with a message that says so.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .openai_schemas import TOOL_NAME

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ImageSource(_Body):
    """``{"type": "base64", "media_type", "data"}`` or ``{"type": "url", "url"}``."""

    type: Literal["base64", "url"]
    media_type: Optional[Literal[IMAGE_MEDIA_TYPES]] = None
    data: Optional[str] = None
    url: Optional[str] = None

    @model_validator(mode="after")
    def _has_its_payload(self):
        needed = ("media_type", "data") if self.type == "base64" else ("url",)
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} image source needs {' and '.join(repr(m) for m in missing)}")
        return self

    def as_url(self) -> str:
        """A URL for ``media.fetch_image``: base64 data as a ``data:`` URL."""
        return f"data:{self.media_type};base64,{self.data}" if self.type == "base64" else self.url


class Block(_Body):
    """One content block: ``text``, ``image``, ``tool_use`` or ``tool_result``, each with its own fields."""

    type: Literal["text", "image", "tool_use", "tool_result"]
    text: Optional[str] = None
    source: Optional[ImageSource] = None
    id: Optional[str] = None  # tool_use
    name: Optional[str] = None  # tool_use
    input: Optional[dict[str, Any]] = None  # tool_use
    tool_use_id: Optional[str] = None  # tool_result
    content: Optional[list["Block"]] = None  # tool_result: text blocks (a string is one)
    is_error: Optional[bool] = None  # tool_result: accepted; the result's text says what went wrong

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_blocks(cls, value):
        return [{"type": "text", "text": value}] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _has_its_payload(self):
        needed = {"text": ("text",), "image": ("source",), "tool_use": ("id", "name", "input"),
                  "tool_result": ("tool_use_id",)}[self.type]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.type} block needs {' and '.join(repr(m) for m in missing)}")
        if self.type == "tool_result" and any(block.type != "text" for block in self.content or []):
            raise ValueError("a tool_result can hold text only (the chat template writes a tool result as text)")
        return self

    def result_text(self) -> str:
        """A tool_result's text, its text blocks joined."""
        return "".join(block.text for block in self.content or [])


class Message(_Body):
    role: Literal["user", "assistant"]
    content: list[Block]

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_blocks(cls, value):
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of content blocks")
        return value

    @model_validator(mode="after")
    def _blocks_fit_the_role(self):
        allowed = ("text", "tool_use") if self.role == "assistant" else ("text", "image", "tool_result")
        wrong = next((block.type for block in self.content if block.type not in allowed), None)
        if wrong is not None:
            raise ValueError(f"{self.role} messages hold {', '.join(allowed)} blocks, not {wrong}")
        return self


class Tool(_Body):
    name: str = Field(pattern=TOOL_NAME)
    description: Optional[str] = None
    input_schema: dict[str, Any]
    type: Optional[Literal["custom"]] = None  # server tools (web search, ...) are Anthropic's own: refused


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: Optional[bool] = None  # accepted: a forced call is one call

    @model_validator(mode="after")
    def _tool_has_a_name(self):
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("'name' goes with type 'tool', and only with it")
        return self

    def as_openai(self) -> Any:
        """The same choice in OpenAI's terms (what ``tools.plan_tools`` reads)."""
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return {"any": "required"}.get(self.type, self.type)


class Thinking(_Body):
    type: Literal["enabled", "disabled"]

    @field_validator("type")
    @classmethod
    def _not_enabled(cls, value):
        if value == "enabled":
            raise ValueError("extended thinking is not supported by this model")
        return value


class JSONFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    format: Optional[JSONFormat] = None
    effort: Optional[str] = None  # accepted and ignored: the model has one effort


class MessagesRequest(_Body):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: Optional[str] = None
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    stream: Optional[bool] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[Thinking] = None
    output_config: Optional[OutputConfig] = None

    @field_validator("system", mode="before")
    @classmethod
    def _text_blocks(cls, value):
        """System text blocks joined as paragraphs."""
        if isinstance(value, list):
            texts = [block.get("text") if isinstance(block, dict) and block.get("type") == "text" else None
                     for block in value]
            if any(not isinstance(text, str) for text in texts):
                raise ValueError("must be a string or a list of text blocks")
            return "\n\n".join(texts)
        return value

    @field_validator("stop_sequences")
    @classmethod
    def _not_empty(cls, value):
        if value and any(s == "" for s in value):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def json_schema(self) -> Optional[dict]:
        """The JSON schema ``output_config.format`` asks the reply to follow, or None for free text."""
        output_format = self.output_config.format if self.output_config else None
        return output_format.schema_ if output_format else None

    def openai_tools(self) -> list[dict]:
        """The tools in OpenAI's function format, the one the chat template is given."""
        return [{"type": "function", "function": {"name": tool.name,
                                                  **({"description": tool.description} if tool.description else {}),
                                                  "parameters": tool.input_schema}}
                for tool in self.tools or []]
