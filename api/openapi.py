"""The OpenAPI 3.1 document of the HTTP API, served at GET /openapi.json, generated from the wire models.

    document = openapi_document()          # a dict; create_app serializes it once per app

Request bodies are the request models' validation schemas (api/wire.py, api/openai_wire.py): what the
server accepts. Response bodies are the response models' serialization schemas: what it sends. Errors
have the Anthropic shape everywhere (`{"type": "error", "error": {"type", "message"}, "request_id"}`,
api/errors.py) except under /v1/chat/, which has OpenAI's (`{"error": {"message", "type", "param",
"code"}}`, api/routes_openai.py). Every route needs a token, sent as `x-api-key` or `Authorization:
Bearer` (api/auth.py), except GET /health and GET /openapi.json.

The document is a constant of the code: it names no model, tenant or setting of the server it comes
from, so it is open like /health (docs/security.md) and the same on every Kawai of one version.
The server is more lenient than the document in two documented ways: unknown fields are ignored, and
content block types the Anthropic API knows but a local model cannot run become text (api/blocks.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from kawai.api.openai_wire import ChatCompletion, ChatCompletionRequest
from kawai.api.routes_models import MAX_PAGE
from kawai.api.wire import (
    CountTokensRequest,
    MessageResponse,
    MessagesRequest,
    ModelInfo,
    ModelList,
    TokenCount,
)

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1"
REF = "#/components/schemas/{model}"


# ---- what the server sends that has no wire model of its own ----------------------------------------


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Doc):
    type: Literal[
        "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
        "request_too_large", "rate_limit_error", "api_error", "overloaded_error",
    ]  # api/errors.ERROR_TYPES' values (tests/api/test_openapi.py keeps them equal)
    message: str


class ErrorResponse(_Doc):
    """api/errors.error_body."""

    type: Literal["error"]
    error: ErrorDetail
    request_id: str | None


class OpenAIErrorDetail(_Doc):
    message: str
    type: Literal["invalid_request_error", "permission_error", "rate_limit_error", "server_error"]
    param: None
    code: str | None


class OpenAIErrorResponse(_Doc):
    """api/routes_openai.error_fields, under /v1/chat/."""

    error: OpenAIErrorDetail


class Health(_Doc):
    status: Literal["ok", "unavailable"]


# status -> when it is sent; every route lists the ones it can send
ERROR_STATUSES = {
    "400": "Invalid request: the message names the field.",
    "401": "Missing or invalid API token.",
    "403": "The token has no grant for this endpoint.",
    "404": "No such model (or endpoint).",
    "405": "Method not allowed; the `allow` header lists the methods.",
    "413": "The body is larger than 32 MB.",
    "429": "Too many requests of this token in flight, or its quota used up; see `retry-after`.",
    "500": "Internal error; the request id is in the `request-id` header.",
    "503": "The server is shutting down (draining); uvicorn's own 503 at its connection limit is plain text.",
    "529": "Overloaded: the model's queue is full; retry after `retry-after` seconds.",
}
GENERATING = ("400", "401", "403", "404", "405", "413", "429", "500", "503", "529")
READING = ("400", "401", "403", "404", "405", "429", "500")

# Request fields that also take a plain string (their BeforeValidator turns it into one text block).
STRING_OR_BLOCKS = {"Message": "content", "ToolResultBlock": "content", "CountTokensRequest": "system",
                    "MessagesRequest": "system"}


def openapi_document() -> dict[str, Any]:
    """The whole document (a fresh dict)."""
    schemas = _schemas()
    paths = {
        "/v1/messages": {"post": _operation(
            "createMessage", "Create a message (JSON, or Server-Sent Events with `stream: true`)",
            "messages", body="MessagesRequest", ok="MessageResponse", stream=True, errors=GENERATING)},
        "/v1/messages/count_tokens": {"post": _operation(
            "countTokens", "Count the prompt tokens of a request", "count_tokens",
            body="CountTokensRequest", ok="TokenCount", errors=GENERATING)},
        "/v1/chat/completions": {"post": _operation(
            "createChatCompletion", "OpenAI-compatible chat completion (JSON, or SSE with `stream: true`)",
            "chat_completions", body="ChatCompletionRequest", ok="ChatCompletion", stream=True,
            errors=GENERATING, error_schema="OpenAIErrorResponse")},
        "/v1/models": {"get": _operation(
            "listModels", "List the served models (Anthropic's and OpenAI's shape in one)", "models",
            ok="ModelList", errors=READING, parameters=_page_parameters())},
        "/v1/models/{model_id}": {"get": _operation(
            "getModel", "One served model, by id or alias", "models", ok="ModelInfo", errors=READING,
            parameters=[{"name": "model_id", "in": "path", "required": True,
                         "schema": {"type": "string", "minLength": 1}}])},
        "/health": {"get": _health()},
        "/metrics": {"get": _metrics()},
        "/openapi.json": {"get": _self()},
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Kawai Messages API",
            "version": API_VERSION,
            "description": "The Anthropic Messages API (and OpenAI's chat completions) served from local GGUF "
                           "models. See docs/api.md.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                           "description": "What the Anthropic SDKs send."},
                "Bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <token>`."},
            },
            "headers": {
                "request-id": {"description": "The request's id (`req_…`), also in the log.",
                               "schema": {"type": "string", "pattern": "^req_"}, "required": True},
            },
        },
        "security": [{"ApiKey": []}, {"Bearer": []}],
    }


def _schemas() -> dict[str, Any]:
    requests = [MessagesRequest, CountTokensRequest, ChatCompletionRequest]
    responses = [MessageResponse, TokenCount, ModelInfo, ModelList, ChatCompletion, ErrorResponse,
                 OpenAIErrorResponse, Health]
    _, top = models_json_schema(
        [(m, "validation") for m in requests] + [(m, "serialization") for m in responses], ref_template=REF
    )
    schemas = top["$defs"]
    for model, field in STRING_OR_BLOCKS.items():
        prop = schemas[model]["properties"][field]
        blocks = {k: prop.pop(k) for k in list(prop) if k not in ("title", "default", "description")}
        prop["anyOf"] = [{"type": "string"}, blocks]
    return schemas


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _response(description: str, content: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "headers": {"request-id": {"$ref": "#/components/headers/request-id"}}}
    if content is not None:
        out["content"] = content
    out.update(extra)
    return out


STREAM_EVENTS = ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                 "message_delta", "message_stop", "ping", "error"]


def _anthropic_event() -> dict[str, Any]:
    """One frame of a Messages stream: `event: <type>` and `data: <JSON object of that type>` (api/sse.py;
    the full grammar of a stream is tests/sse_grammar.py)."""
    payload = {"type": "object", "required": ["type"],
               "properties": {"type": {"enum": STREAM_EVENTS}, "error": _ref("ErrorDetail")}}
    return {"type": "object", "required": ["event", "data"],
            "properties": {"event": {"enum": STREAM_EVENTS},
                           "data": {"type": "string", "contentMediaType": "application/json",
                                    "contentSchema": payload}}}


def _openai_event() -> dict[str, Any]:
    """One frame of a chat completion stream: `data: <ChatCompletionChunk JSON>`, the last `data: [DONE]`."""
    return {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", "minLength": 1}}}


def _operation(op_id: str, summary: str, grant: str, *, ok: str, errors: tuple[str, ...], body: str | None = None,
               stream: bool = False, error_schema: str = "ErrorResponse",
               parameters: list | None = None) -> dict[str, Any]:
    content = _json(ok)
    if stream:  # the schema of one event, as schemathesis reads it (OpenAPI 3.2 names it itemSchema)
        content["text/event-stream"] = {"schema": _openai_event() if error_schema != "ErrorResponse"
                                        else _anthropic_event()}
    responses = {"200": _response("OK" + (" (an event stream with `stream: true`)" if stream else ""), content)}
    for status in errors:
        responses[status] = _response(ERROR_STATUSES[status], _json(error_schema))
    if "503" in responses:  # uvicorn's plain-text 503 comes before the app: no request id
        responses["503"]["content"]["text/plain"] = {"schema": {"type": "string"}}
        responses["503"]["headers"] = {"request-id": {"schema": {"type": "string"}, "required": False}}
    out: dict[str, Any] = {"operationId": op_id, "summary": summary,
                           "description": f"Needs a token with the `{grant}` grant.", "responses": responses}
    if body is not None:
        out["requestBody"] = {"required": True, "content": _json(body)}
    if parameters:
        out["parameters"] = parameters
    return out


def _page_parameters() -> list[dict[str, Any]]:
    return [
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
        {"name": "after_id", "in": "query", "schema": {"type": "string"}},
        {"name": "before_id", "in": "query", "schema": {"type": "string"}},
    ]


def _health() -> dict[str, Any]:
    return {
        "operationId": "health", "summary": "Liveness: 200 while every engine loop runs, else 503",
        "security": [],
        "responses": {"200": _response("Every engine loop runs", _json("Health")),
                      "405": _response(ERROR_STATUSES["405"], _json("ErrorResponse")),
                      "503": _response("An engine loop is down", _json("Health"))},
    }


def _metrics() -> dict[str, Any]:
    return {
        "operationId": "metrics", "summary": "Prometheus metrics (every tenant's traffic)",
        "description": "Needs a token with the `metrics` grant (not in the default token).",
        "responses": {"200": _response("Prometheus text format", {"text/plain": {"schema": {"type": "string"}}}),
                      **{s: _response(ERROR_STATUSES[s], _json("ErrorResponse")) for s in ("401", "403", "405", "429")}},
    }


def _self() -> dict[str, Any]:
    return {
        "operationId": "openapi", "summary": "This document", "security": [],
        "responses": {"200": _response("The OpenAPI document", {"application/json": {"schema": {"type": "object"}}}),
                      "405": _response(ERROR_STATUSES["405"], _json("ErrorResponse"))},
    }
