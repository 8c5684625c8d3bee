"""The chat template: rendering Hugging Face chat messages into Llama 4 prompt text.

Templates come with checkpoints (``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``)
and are rendered by transformers, in its immutable sandbox; the published Llama 4 template is the fallback.
Image parts of messages become ``{"type": "image"}`` (rendered as ``<|image|>``), and their inline sources are
collected in order for the processor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

from .prompt import ProcessorError

# The Llama 4 chat template (``chat_template`` in transformers' processing_llama4.py; docs/architecture.md, "Chat
# template and BOS"), used when a checkpoint ships none. It is data, not code: the string the published checkpoints
# carry. In the original, the `'system' %}` line ends with four
# spaces; they are restored below instead of being kept in the source, where editors strip them.
REFERENCE_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content']|trim %}
    {%- else %}
        {#- FIXME: The processor requires an array, always. #}
        {%- set system_message = messages[0]['content'][0]['text']|trim %}
    {%- endif %}
    {%- set messages = messages[1:] %}
    {%- set user_supplied_system_message = true %}
{%- else %}
    {%- set system_message = "" %}
    {%- set user_supplied_system_message = false %}
{%- endif %}

{#- System message if the user supplied one #}
{%- if user_supplied_system_message %}
    {{- "<|header_start|>system<|header_end|>

" }}
    {%- if tools is not none %}
        {{- "Environment: ipython
" }}
    {%- endif %}
    {%- if tools is not none and not tools_in_user_message %}
        {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
        {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
        {{- "Do not use variables.

" }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) }}
            {{- "

" }}
        {%- endfor %}
    {%- endif %}
    {{- system_message }}
    {{- "<|eot|>" }}
{%- endif %}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|header_start|>user<|header_end|>

' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.

" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.

" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "

" }}
    {%- endfor %}
    {{- first_user_message + "<|eot|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
    {{- '<|header_start|>' + message['role'] + '<|header_end|>

' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- "<|eot|>" }}
    {%- elif 'tool_calls' in message and message.tool_calls|length > 0 %}
       {{- '<|header_start|>assistant<|header_end|>

' -}}
       {{- '<|python_start|>' }}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for content in message['content'] %}
                {%- if content['type'] == 'image' %}
                    {{- '<|image|>' }}
                {%- elif content['type'] == 'text' %}
                    {{- content['text'] }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
       {{- '<|python_end|>' }}
        {%- for tool_call in message.tool_calls %}
           {{- '{"name": "' + tool_call.function.name + '", ' }}
           {{- '"parameters": ' }}
           {{- tool_call.function.arguments | tojson }}
           {{- "}" }}
        {%- endfor %}
       {{- "<|eot|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|header_start|>ipython<|header_end|>

" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|header_start|>assistant<|header_end|>

' }}
{%- endif %}
""".replace("'system' %}\n", "'system' %}    \n", 1)

KNOWN_ROLES = ("system", "user", "assistant", "ipython", "tool")
TOOL_ROLES = ("ipython", "tool")  # tool results: any JSON content, which the template writes with tojson
# Keys of a message content part that carry the image itself (Hugging Face, OpenAI and local spellings).
_IMAGE_SOURCE_KEYS = ("image", "image_url", "url", "path")
_IMAGE_PART_TYPES = ("image", "image_url", "input_image")


def render_chat_template(tokenizer, source: str, messages: list[dict], add_generation_prompt: bool,
                         **variables) -> str:
    """Render normalised messages (see ``split_messages``) with a template and its extra variables (``bos_token``,
    ``tools``, ``date_string``, ...).

    transformers renders it (``apply_chat_template(tokenize=False)``): its immutable sandbox, its helpers
    (``raise_exception``, ``tojson``, ``strftime_now``, ``{% generation %}``) and the hardening of its newer
    releases (template inputs rebuilt from plain types), so a template renders here exactly as it does there.
    """
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateSyntaxError as exc:
        raise ProcessorError(f"chat template does not compile: {exc}") from None


def _as_dict(value: Any, where: str, what: str) -> dict:
    """A message or content part as a dict: dicts as they are, pydantic models and dataclasses converted; None values
    dropped (OpenAI-style APIs send ``content=None`` or ``tool_calls=None``, which templates treat as present)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif callable(getattr(value, "model_dump", None)):
        value = value.model_dump()
    if not isinstance(value, Mapping):
        raise ProcessorError(f"{where}: {what}, got {type(value).__name__} {value!r:.60}")
    return {key: item for key, item in value.items() if item is not None}


def _image_part_source(part: Mapping) -> tuple[bool, Any]:
    """(is_image, source or None) for one content part."""
    kind = part.get("type")
    if kind not in _IMAGE_PART_TYPES and not (kind is None and any(k in part for k in _IMAGE_SOURCE_KEYS)):
        return False, None
    for key in _IMAGE_SOURCE_KEYS:
        value = part.get(key)
        if isinstance(value, Mapping):  # OpenAI: {"type": "image_url", "image_url": {"url": ...}}
            value = value.get("url", value.get("path"))
        if value is not None:
            return True, value
    return True, None


def user_turn(text: str, images: int = 0) -> dict:
    """One user message: ``images`` image parts (their images given separately), then the text."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]}


def split_messages(messages: Any) -> tuple[list[dict], list[Any]]:
    """Check and normalise chat messages for the template and collect their images in order.

    Returns (messages with every image part replaced by ``{"type": "image"}``, one entry per image part:
    its inline source, or None when the image is supplied separately). A plain string is one user turn;
    string parts of a content list are text parts. Anything the template would trip over or silently drop (no
    messages, a message that is not a dict, an unknown role, a missing or mistyped content, a part of an unknown
    type) is a ``ProcessorError`` naming the message (and part) by index.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if isinstance(messages, Mapping):
        messages = [messages]
    if not isinstance(messages, Iterable) or isinstance(messages, (bytes, bytearray)):
        raise ProcessorError(f"chat messages must be a list of dicts with 'role' and 'content', got "
                             f"{type(messages).__name__}")
    out: list[dict] = []
    sources: list[Any] = []
    for i, raw in enumerate(messages):
        message = _as_dict(raw, f"message {i}", "a chat message must be a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in KNOWN_ROLES:
            problem = "no 'role'" if role is None else f"unknown role {role!r}"
            raise ProcessorError(f"message {i}: {problem}; the roles are {', '.join(KNOWN_ROLES)}")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise ProcessorError(f"message {i} ({role}): no 'content'")
        if isinstance(content, (list, tuple)):
            message["content"] = _parts(content, f"message {i} ({role})", sources, strict=role not in TOOL_ROLES)
        elif not isinstance(content, str) and content is not None and role not in TOOL_ROLES:
            raise ProcessorError(f"message {i} ({role}): 'content' must be a string or a list of parts, got "
                                 f"{type(content).__name__}")
        out.append(message)
    if not out:
        raise ProcessorError("no chat messages: give at least one message")
    return out, sources


def _parts(content: Sequence, where: str, sources: list, strict: bool) -> list:
    """A content list for the template: strings become text parts, image parts ``{"type": "image"}`` (their
    sources appended to ``sources``). ``strict`` (not for tool results, which the template writes as JSON): every
    part must be a text part with a string ``text`` or an image part."""
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        if not strict and not isinstance(part, Mapping):
            parts.append(part)
            continue
        part = _as_dict(part, f"{where}, part {j}", "a content part must be a string or a dict with a 'type'")
        is_image, source = _image_part_source(part)
        if is_image:
            parts.append({"type": "image"})
            sources.append(source)
            continue
        if strict:
            kind = part.get("type")
            if kind != "text":
                problem = "no 'type'" if kind is None else f"unknown type {kind!r}"
                raise ProcessorError(f"{where}, part {j}: {problem}; the part types are text, "
                                     f"{', '.join(_IMAGE_PART_TYPES)}")
            if not isinstance(part.get("text"), str):
                raise ProcessorError(f"{where}, part {j}: a text part needs a string 'text'")
        parts.append(part)
    return parts
