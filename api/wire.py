"""Wire models for the Messages API (pydantic v2), after the official SDK's types.

Requests ignore unknown fields; every number is bounded; string content is normalised to a list of text
blocks on the way in. `parse_request` turns a validation failure into one `InvalidRequestError` naming the
field path (`messages.0.content.1.source.media_type: ...`), never echoing large inputs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError

from kawai.api.blocks import client_tools, degrade_blocks, degrade_tool_result_parts
from kawai.api.errors import InvalidRequestError

MAX_MESSAGES = 100_000
MAX_TOOLS = 1_000
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 256
MAX_STOP_SEQUENCES = 64  # engine.sampling's limits
MAX_STOP_CHARS = 1024
MAX_TOKENS_LIMIT = 1 << 24  # checked again against the model's context
MAX_TOP_K = 1 << 20
MAX_ERROR_CHARS = 400

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ---- content blocks ---------------------------------------------------------------------------------


class TextBlock(_In):
    type: Literal["text"]
    text: str


class Base64ImageSource(_In):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class UrlImageSource(_In):
    type: Literal["url"]
    url: Annotated[str, Field(min_length=1, max_length=8192)]


class ImageBlock(_In):
    type: Literal["image"]
    source: Annotated[Union[Base64ImageSource, UrlImageSource], Field(discriminator="type")]


def _text_to_blocks(value: Any) -> Any:
    """A plain string stands for one text block."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


def _message_blocks(value: Any) -> Any:
    """Block types we cannot take as such become text (api/blocks.py): never a 400 that stays in history."""
    return degrade_blocks(_text_to_blocks(value))


def _tool_result_parts(value: Any) -> Any:
    return degrade_tool_result_parts(_text_to_blocks(value))


ToolResultPart = Annotated[Union[TextBlock, ImageBlock], Field(discriminator="type")]


class ToolResultBlock(_In):
    type: Literal["tool_result"]
    tool_use_id: Id
    content: Annotated[list[ToolResultPart], BeforeValidator(_tool_result_parts)] = []
    is_error: StrictBool = False


ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]  # the Anthropic API's rule


class ToolUseBlock(_In):
    type: Literal["tool_use"]
    id: Id
    name: ToolName  # a call in the history names a tool like a definition does
    input: dict[str, Any]


class ThinkingBlock(_In):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(_In):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    Union[TextBlock, ImageBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock],
    Field(discriminator="type"),
]
Content = Annotated[list[ContentBlock], BeforeValidator(_message_blocks)]


class Message(_In):
    role: Literal["user", "assistant", "system"]  # "system" mid-conversation: newer clients send it
    content: Content


# ---- tools, tool choice, thinking -------------------------------------------------------------------


class Tool(_In):
    name: ToolName
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    strict: StrictBool | None = None  # true: arguments always valid against input_schema (api/structured.py)


class _ToolChoiceBase(_In):
    disable_parallel_tool_use: StrictBool = False


class ToolChoiceAuto(_ToolChoiceBase):
    type: Literal["auto"]


class ToolChoiceAny(_ToolChoiceBase):
    type: Literal["any"]


class ToolChoiceNone(_ToolChoiceBase):
    type: Literal["none"]


class ToolChoiceTool(_ToolChoiceBase):
    type: Literal["tool"]
    name: Name


ToolChoice = Annotated[
    Union[ToolChoiceAuto, ToolChoiceAny, ToolChoiceNone, ToolChoiceTool], Field(discriminator="type")
]


ThinkingDisplay = Literal["summarized", "omitted"]  # omitted: thinking blocks come back empty, signed


class ThinkingEnabled(_In):
    type: Literal["enabled"]
    budget_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_LIMIT)]
    display: ThinkingDisplay | None = None


class ThinkingDisabled(_In):
    type: Literal["disabled"]


class ThinkingAdaptive(_In):
    type: Literal["adaptive"]
    display: ThinkingDisplay | None = None


Thinking = Annotated[Union[ThinkingEnabled, ThinkingDisabled, ThinkingAdaptive], Field(discriminator="type")]


class JsonSchemaFormat(_In):
    """Structured output: the reply's text is JSON valid against `schema` (api/structured.py)."""

    type: Literal["json_schema"]
    schema_: Annotated[dict[str, Any], Field(alias="schema")]


class OutputConfig(_In):
    format: JsonSchemaFormat | None = None
    effort: str | None = None  # accepted, ignored


class Metadata(_In):
    user_id: Annotated[str, Field(max_length=MAX_ID_CHARS)] | None = None


# ---- requests ---------------------------------------------------------------------------------------


class CountTokensRequest(_In):
    """The prompt part of a request: what `/v1/messages/count_tokens` takes."""

    model: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: Annotated[list[TextBlock], BeforeValidator(_text_to_blocks)] = []
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS), BeforeValidator(client_tools)] = []
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    @property
    def thinking_on(self) -> bool:
        return isinstance(self.thinking, (ThinkingEnabled, ThinkingAdaptive))


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS_LIMIT)]  # 0: pre-warm the prompt cache
    stream: StrictBool = False
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_K)] | None = None
    stop_sequences: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_SEQUENCES)
    ] = []
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    output_format: JsonSchemaFormat | None = None  # the beta spelling of output_config.format

    @property
    def response_format(self) -> JsonSchemaFormat | None:
        return self.output_config.format if self.output_config and self.output_config.format else self.output_format


def parse_request(model_cls: type[_In], data: Any) -> Any:
    """Validate a decoded JSON body; one clear 400 naming the field on failure."""
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise InvalidRequestError(describe_validation_error(e, data)) from None


def describe_validation_error(err: ValidationError, data: Any) -> str:
    first = err.errors(include_url=False, include_input=False)[0]
    path = _field_path(first["loc"], data)
    message = first["msg"]
    if first["type"] == "union_tag_invalid":
        tag = str(first.get("ctx", {}).get("tag", ""))[:40]
        message = f"unsupported type {tag!r}; expected one of {first.get('ctx', {}).get('expected_tags', '')}"
    elif first["type"] == "union_tag_not_found":
        message = "missing 'type'"
    text = f"{path}: {message}" if path else message
    return text[:MAX_ERROR_CHARS]


def _field_path(loc: tuple, data: Any) -> str:
    """Join the location into `a.0.b`, dropping pydantic's union tags and type labels.

    Walks the request body alongside the location: a segment that is not a key (or index) of the value
    reached so far is a label pydantic inserted (`list[...]`, a discriminator tag) — except the last
    segment, which names a missing field.
    """
    parts: list[str] = []
    current = data
    for i, seg in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(current, dict) and current.get("type") == seg and not last:
            continue  # the discriminator tag pydantic adds after a union position
        if isinstance(current, dict) and isinstance(seg, str) and seg in current:
            current = current[seg]
        elif isinstance(current, list) and isinstance(seg, int) and 0 <= seg < len(current):
            current = current[seg]
        elif not last:
            continue
        parts.append(str(seg))
    return ".".join(parts)


# ---- responses --------------------------------------------------------------------------------------
# What the server sends, after the SDK's types (`anthropic.types.Message`, `ModelInfo`, ...). Content
# blocks stay plain dicts (built incrementally by api/content.py); everything around them is typed.


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(_Out):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class MessageResponse(_Out):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[dict[str, Any]]
    model: str
    stop_reason: Literal[
        "end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded"
    ] | None
    stop_sequence: str | None
    usage: Usage


class TokenCount(_Out):
    input_tokens: int


class ModelInfo(_Out):
    """Anthropic's ModelInfo and OpenAI's Model in one object (their field names do not overlap), so
    GET /v1/models answers both SDKs."""

    type: Literal["model"] = "model"
    id: str
    display_name: str
    created_at: str  # RFC 3339, UTC
    lifecycle: Literal["active"] = "active"
    max_input_tokens: int
    max_tokens: int
    object: Literal["model"] = "model"  # OpenAI
    created: int  # OpenAI: the same time, in Unix seconds
    owned_by: str = "kawai"  # OpenAI


class ModelList(_Out):
    object: Literal["list"] = "list"  # OpenAI
    data: list[ModelInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None
