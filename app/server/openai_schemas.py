"""Request bodies of the OpenAI API (chat completions and completions), validated with pydantic.

Validation is strict (a string is not a number, ``1.5`` is not a token count) and names the field at fault;
unknown fields are ignored, as OpenAI's API does. Fields that would change the answer but that this server
cannot honour (``n`` other than 1, ``logit_bias``, the legacy ``functions``, ``best_of``, ``suffix``) are
refused with a message that says so, never silently dropped. ``null`` means "the default" for every
optional field.

Chat messages follow OpenAI's reference (https://platform.openai.com/docs/api-reference/chat/create): an
assistant message may carry ``tool_calls`` (``function.arguments`` a JSON object as a string) with
``content: null``; a ``tool`` message carries a call's result and its ``tool_call_id``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from mlx_llama4.structured import json_schema_of

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; the legacy completions API allows 5


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _refuse(name: str, why: str):
    def check(cls, value):
        if value:
            raise ValueError(why)
        return value

    return field_validator(name)(check)


class StreamOptions(_Body):
    include_usage: Optional[bool] = None


class SamplingFields(_Body):
    """What chat completions and completions share: length, sampling, stop strings, streaming."""

    model: Optional[str] = None  # the served model when absent
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)  # 0 or -1: no top-k (mlx-lm's and vLLM's spellings)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    stop: Optional[list[str]] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    logit_bias: Optional[dict[str, Any]] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value):
        if value is not None and value != 1:
            raise ValueError(f"only n=1 is supported (got {value}); send separate requests for several replies")
        return value

    _no_logit_bias = _refuse("logit_bias", "logit_bias is not supported by this server")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ImageURL(_Body):
    url: str
    detail: Optional[str] = None  # accepted and ignored: the model always sees the image tiled as it was trained


class ContentPart(_Body):
    """``{"type": "text", "text": ...}`` or ``{"type": "image_url", "image_url": {"url": ...}}``."""

    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[ImageURL] = None

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value):
        return {"url": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _has_its_payload(self):
        if getattr(self, self.type) is None:
            raise ValueError(f"this part has type '{self.type}' but no '{self.type}' field")
        return self


TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionSpec(_Body):
    name: str = Field(pattern=TOOL_NAME)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema of the arguments object
    strict: Optional[bool] = None  # accepted: a forced call always follows the schema; an "auto" one is parsed


class ToolSpec(_Body):
    """``{"type": "function", "function": {"name", "description", "parameters"}}``."""

    type: Literal["function"]
    function: FunctionSpec


class FunctionCall(_Body):
    name: str
    arguments: Any  # a JSON object as a string (OpenAI's form), or the object itself; validated to a dict

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"must be a JSON object as a string; this is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"must be a JSON object (as a string), got {json.dumps(value)[:60]}")
        return value


class ToolCall(_Body):
    id: Optional[str] = None  # the template has no call ids: results follow their calls in order
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[list[ContentPart]] = None
    name: Optional[str] = None  # accepted and ignored
    tool_calls: Optional[list[ToolCall]] = None  # assistant messages: the calls it made
    tool_call_id: Optional[str] = None  # tool messages: the call answered (accepted; the order says it)

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_parts(cls, value):
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if value is not None and not isinstance(value, list):
            raise ValueError("must be a string or a list of content parts")
        return value

    @model_validator(mode="after")
    def _fits_its_role(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role} messages")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        if self.role == "tool" and any(part.type != "text" for part in self.content):
            raise ValueError("a tool result can hold text only (the chat template writes it as JSON text)")
        return self

    def text(self) -> str:
        """The text parts joined (the chat template joins them without a separator too)."""
        return "".join(part.text for part in self.content or [] if part.type == "text")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens; wins if both given
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[ToolSpec]] = None
    tool_choice: Optional[Any] = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: Optional[bool] = None  # accepted: a forced call is one call; "auto" takes what comes
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None

    _no_functions = _refuse("functions", "the legacy 'functions' field is not supported; send 'tools' instead")

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value):
        if value is None or value in ("none", "auto", "required"):
            return value
        function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ValueError("must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                             f"{{\"name\": ...}}}}, got {json.dumps(value)[:80]}")
        return {"type": "function", "function": {"name": function["name"]}}

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value):
        if value is None:
            return value
        if value.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', got {value.get('type')!r}")
        json_schema_of(value)  # a ValueError naming what is missing
        return value

    @property
    def json_schema(self) -> Optional[dict]:
        """The JSON schema ``response_format`` asks the reply to follow, or None for free text."""
        return json_schema_of(self.response_format)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value, info: ValidationInfo):
        if value and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value

    @property
    def reply_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    """A raw prompt: text (tokenized as it is, ``<|begin_of_text|>`` added if missing) or token ids."""

    prompt: Union[str, list[int]]
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    _no_suffix = _refuse("suffix", "suffix (fill-in-the-middle) is not supported by this server")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
            if len(value) != 1:
                raise ValueError(f"only one prompt per request is supported (got {len(value)})")
            value = value[0]
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise ValueError("must be a non-empty string or a non-empty list of token ids")

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, value):
        if value is not None and value != 1:
            raise ValueError(f"only best_of=1 is supported (got {value})")
        return value

    @property
    def reply_limit(self) -> Optional[int]:
        return self.max_tokens
