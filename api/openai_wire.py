"""Wire models for OpenAI's chat completions (pydantic v2), after the official `openai` SDK's types, and
the translation of a request into the Messages pipeline's `MessagesRequest`.

Requests ignore unknown fields (`frequency_penalty`, `logit_bias`, `user`, ... are accepted and have no
effect); the fields below are validated and bounded like their Messages counterparts.

Mapping to Messages:
    system / developer messages      -> system
    user text + image_url parts      -> user text + image blocks (data: URLs -> base64, others -> url)
    assistant content + tool_calls   -> assistant text + tool_use blocks (arguments: a JSON object string)
    tool messages                    -> user tool_result blocks (consecutive ones in one user message)
    tools [{type: function, function: {name, description, parameters, strict}}] -> tools
    tool_choice none / auto / required / {function: {name}} -> none / auto / any / tool
    parallel_tool_calls false        -> disable_parallel_tool_use
    response_format json_object      -> output_config.format with schema {"type": "object"}
    response_format json_schema      -> output_config.format with its schema (always enforced)
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from kawai.api.errors import InvalidRequestError
from kawai.api.wire import (
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
    MAX_TOP_K,
    MessagesRequest,
    parse_request,
)

DATA_URL = re.compile(r"data:(?P<media_type>[\w/+.-]+);base64,(?P<data>.*)", re.DOTALL)


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ---- messages -------------------------------------------------------------------------------------


class TextPart(_In):
    type: Literal["text"]
    text: str


class ImageUrl(_In):
    url: Annotated[str, Field(min_length=1)]
    detail: str | None = None  # accepted, ignored: images are resized by the model's preprocessor


class ImagePart(_In):
    type: Literal["image_url"]
    image_url: ImageUrl


UserPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]
TextContent = Union[str, list[TextPart]]


class FunctionCall(_In):
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    arguments: str  # a JSON object, as text


class ToolCall(_In):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_In):
    role: Literal["system", "developer"]
    content: TextContent


class UserMessage(_In):
    role: Literal["user"]
    content: Union[str, list[UserPart]]


class AssistantMessage(_In):
    role: Literal["assistant"]
    content: TextContent | None = None
    tool_calls: list[ToolCall] = []


class ToolMessage(_In):
    role: Literal["tool"]
    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)]
    content: TextContent


ChatMessage = Annotated[
    Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")
]


# ---- tools, formats -------------------------------------------------------------------------------


class FunctionDef(_In):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
    description: str | None = None
    parameters: dict[str, Any] = {"type": "object", "properties": {}}
    strict: StrictBool | None = None


class FunctionTool(_In):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_In):
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


class NamedToolChoice(_In):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_In):
    name: Annotated[str, Field(max_length=MAX_NAME_CHARS)] = "response"
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = {"type": "object"}
    strict: StrictBool | None = None  # accepted: the schema is always enforced


class TextFormat(_In):
    type: Literal["text"]


class JsonObjectFormat(_In):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_In):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaResponseFormat], Field(discriminator="type")]


class StreamOptions(_In):
    include_usage: StrictBool = False


# ---- the request ----------------------------------------------------------------------------------

Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class ChatCompletionRequest(_In):
    model: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_K)] | None = None  # an extension, as in llama.cpp
    seed: Annotated[int, Field(strict=True, ge=-(1 << 63), lt=1 << 64)] | None = None
    n: Annotated[int, Field(strict=True)] | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] = []
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None

    @property
    def token_limit(self) -> int | None:
        """max_completion_tokens (the current name) or max_tokens (the deprecated one); None = the rest
        of the context window."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def to_messages_request(req: ChatCompletionRequest, max_tokens: int) -> MessagesRequest:
    """The same conversation as a Messages request (sampling is passed separately, see routes_openai)."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        if isinstance(m, SystemMessage):
            system.append(_text(m.content))
        elif isinstance(m, UserMessage):
            parts = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else [_user_part(p) for p in m.content]
            messages.append({"role": "user", "content": parts})
        elif isinstance(m, AssistantMessage):
            content: list[dict[str, Any]] = []
            if m.content:
                content.append({"type": "text", "text": _text(m.content)})
            content += [_tool_use(c, f"messages.{i}.tool_calls.{k}") for k, c in enumerate(m.tool_calls)]
            messages.append({"role": "assistant", "content": content})
        else:
            result = {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": _text(m.content)}
            if messages and messages[-1]["role"] == "user" and messages[-1].get("tool_results"):
                messages[-1]["content"].append(result)
            else:
                messages.append({"role": "user", "content": [result], "tool_results": True})
    for m in messages:
        m.pop("tool_results", None)
    body: dict[str, Any] = {
        "model": req.model,
        "max_tokens": max_tokens,
        "stream": req.stream,
        "messages": messages,
        "system": "\n\n".join(s for s in system if s),
        "tools": [_tool(t) for t in req.tools],
    }
    choice = _tool_choice(req)
    if choice is not None:
        body["tool_choice"] = choice
    fmt = req.response_format
    if isinstance(fmt, JsonObjectFormat):
        body["output_config"] = {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    elif isinstance(fmt, JsonSchemaResponseFormat):
        body["output_config"] = {"format": {"type": "json_schema", "schema": fmt.json_schema.schema_}}
    return parse_request(MessagesRequest, body)


def _text(content: TextContent) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _user_part(part: TextPart | ImagePart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    m = DATA_URL.fullmatch(part.image_url.url)
    if m is not None:
        source = {"type": "base64", "media_type": m["media_type"], "data": m["data"]}
    else:
        source = {"type": "url", "url": part.image_url.url}
    return {"type": "image", "source": source}


def _tool_use(call: ToolCall, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments) if call.function.arguments.strip() else {}
    except ValueError:
        raise InvalidRequestError(f"{where}.function.arguments: not valid JSON") from None
    if not isinstance(arguments, dict):
        raise InvalidRequestError(f"{where}.function.arguments: must be a JSON object")
    return {"type": "tool_use", "id": call.id, "name": call.function.name, "input": arguments}


def _tool(t: FunctionTool) -> dict[str, Any]:
    fn = t.function
    tool: dict[str, Any] = {"name": fn.name, "input_schema": fn.parameters, "strict": bool(fn.strict)}
    if fn.description:
        tool["description"] = fn.description
    return tool


def _tool_choice(req: ChatCompletionRequest) -> dict[str, Any] | None:
    one = {"disable_parallel_tool_use": True} if req.parallel_tool_calls is False else {}
    c = req.tool_choice
    if c is None:
        return {"type": "auto", **one} if one and req.tools else None
    if isinstance(c, NamedToolChoice):
        return {"type": "tool", "name": c.function.name, **one}
    return {"type": {"none": "none", "auto": "auto", "required": "any"}[c], **one}


# ---- responses ------------------------------------------------------------------------------------
# What the server sends, after the SDK's `ChatCompletion` and `ChatCompletionChunk`.


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Out):
    cached_tokens: int


class CompletionUsage(_Out):
    prompt_tokens: int  # the whole prompt, reused prefix included (OpenAI's convention)
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class OutFunction(_Out):
    name: str
    arguments: str


class OutToolCall(_Out):
    id: str
    type: Literal["function"] = "function"
    function: OutFunction


class OutMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[OutToolCall] | None = None
    reasoning_content: str | None = None  # a thinking block, as llama.cpp and vLLM name it


class Choice(_Out):
    index: int = 0
    message: OutMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None
