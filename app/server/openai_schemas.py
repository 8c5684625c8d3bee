"""Request bodies of the OpenAI API (chat completions and completions), validated with pydantic.

Validation is strict (a string is not a number, ``1.5`` is not a token count) and names the field at fault;
unknown fields are ignored, as OpenAI's API does. Fields that would change the answer but that this server
cannot honour (``n`` other than 1, tools, ``logit_bias``, JSON response formats, ``best_of``, ``suffix``) are
refused with a message that says so, never silently dropped. ``null`` means "the default" for every
optional field.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

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


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[list[ContentPart]] = None
    name: Optional[str] = None  # accepted and ignored

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_parts(cls, value):
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if value is not None and not isinstance(value, list):
            raise ValueError("must be a string or a list of content parts")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens; wins if both given
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None

    _no_tools = _refuse("tools", "tool calling is not supported by this server yet")
    _no_functions = _refuse("functions", "function calling is not supported by this server yet")

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(f"type {value.get('type')!r} is not supported; only 'text' is")
        return value

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
