"""POST /v1/chat/completions: OpenAI's chat completions on the Messages pipeline.

A request is validated as OpenAI's (api/openai_wire.py), translated into a `MessagesRequest` and run by
`routes_messages.start_reply` — the same prompt rendering, grammar, engine queue, prefix cache, limits
and output parser as /v1/messages. Only the two ends differ: the sampling fields (temperature up to 2,
`seed`) and the reply, whose Anthropic events become `chat.completion.chunk`s:

    content_block_start tool_use  -> delta.tool_calls [{index, id, type, function: {name, arguments: ""}}]
    text_delta                    -> delta.content
    input_json_delta              -> delta.tool_calls [{index, function: {arguments}}]
    thinking_delta                -> delta.reasoning_content
    message_delta                 -> finish_reason (end_turn/stop_sequence -> stop, max_tokens -> length,
                                     tool_use -> tool_calls), then a usage chunk if asked, then [DONE]

Silences are filled with SSE comments (`: ping`), which clients ignore. Errors on this path are
OpenAI-shaped (`{"error": {message, type, param, code}}`), whoever raised them: `OpenAIErrors` rewrites
the body of every error response under /v1/chat/.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kawai.api.errors import ApiError, InvalidRequestError, internal_error
from kawai.api.openai_wire import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    CompletionUsage,
    OutFunction,
    OutMessage,
    OutToolCall,
    PromptTokensDetails,
    to_messages_request,
)
from kawai.api.routes_messages import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    EventStreamResponse,
    Reply,
    collect,
    read_request,
    start_reply,
)
from kawai.api.state import request_id_of, server_state
from kawai.engine.sampling import SamplingParams, SamplingParamsError

log = logging.getLogger("kawai.api")

PATH_PREFIX = "/v1/chat/"
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    None: "stop",
}
# status -> (error.type, error.code), after OpenAI's error bodies
ERROR_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", None),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    529: ("server_error", "overloaded"),
}
PING_FRAME = b": ping\n\n"
DONE_FRAME = b"data: [DONE]\n\n"


async def create_chat_completion(request: Request) -> Response:
    server = server_state(request)
    chat = await read_request(request, ChatCompletionRequest, server.settings.max_body_bytes)
    if chat.n not in (None, 1):
        raise InvalidRequestError(f"n: only n=1 is supported, got {chat.n}")
    llm = server.model(chat.model).llm
    limit = chat.token_limit
    req = to_messages_request(chat, limit or llm.n_ctx)
    reply = await start_reply(request, req, sampling_params(chat, limit or llm.n_ctx))
    completion = Completion(reply, include_usage=chat.include_usage)
    if chat.stream:
        return EventStreamResponse(completion.frames(request_id_of(request)), reply.job)
    await collect(request, reply)
    return JSONResponse(completion.whole())


def sampling_params(chat: ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=DEFAULT_TEMPERATURE if chat.temperature is None else chat.temperature,
            top_p=DEFAULT_TOP_P if chat.top_p is None else chat.top_p,
            top_k=DEFAULT_TOP_K if chat.top_k is None else chat.top_k,
            seed=None if chat.seed is None else chat.seed % (1 << 64),  # OpenAI seeds are signed 64-bit
            max_tokens=max_tokens,
            stop=tuple(chat.stops),
        )
    except SamplingParamsError as e:
        raise InvalidRequestError(str(e)) from None


class Completion:
    """One reply in OpenAI's shapes: `frames()` streams it, `whole()` is the finished completion."""

    def __init__(self, reply: Reply, include_usage: bool):
        self.reply = reply
        self.include_usage = include_usage
        self.id = "chatcmpl-" + reply.id.removeprefix("msg_")
        self.created = int(time.time())
        self._tool_index: dict[int, int] = {}  # content block index -> tool_calls index

    def whole(self) -> dict[str, Any]:
        message = self.reply.message()
        texts = [b["text"] for b in message["content"] if b["type"] == "text"]
        thinking = [b["thinking"] for b in message["content"] if b["type"] == "thinking"]
        calls = [
            OutToolCall(id=b["id"], function=OutFunction(name=b["name"], arguments=json.dumps(b["input"], ensure_ascii=False)))
            for b in message["content"]
            if b["type"] == "tool_use"
        ]
        out = OutMessage(
            content="".join(texts) if texts or not calls else None,
            tool_calls=calls or None,
            reasoning_content="".join(thinking) if thinking else None,
        )
        completion = ChatCompletion(
            id=self.id,
            created=self.created,
            model=message["model"],
            choices=[Choice(message=out, finish_reason=FINISH_REASONS[message["stop_reason"]])],
            usage=self._usage(),
        )
        data = completion.model_dump()
        shown = data["choices"][0]["message"]
        for key in ("tool_calls", "reasoning_content"):  # present only when there are some
            if shown[key] is None:
                del shown[key]
        return data

    async def frames(self, request_id: str) -> AsyncIterator[bytes]:
        """SSE frames: chunks, `: ping` comments in silences, an error body if generation fails, [DONE]."""
        try:
            async for event in self.reply.events():
                if event["type"] == "ping":
                    yield PING_FRAME
                    continue
                for chunk in self._chunks(event):
                    yield _frame(chunk)
        except ApiError as e:
            yield _frame({"error": error_fields(e.status, e.message)})
            return
        except Exception:
            log.exception("request %s: stream failed", request_id)
            yield _frame({"error": error_fields(500, internal_error().message)})
            return
        yield DONE_FRAME

    def _chunks(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event["type"]
        if kind == "message_start":
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start" and event["content_block"]["type"] == "tool_use":
            block = event["content_block"]
            k = self._tool_index[event["index"]] = len(self._tool_index)
            call = {"index": k, "id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": ""}}
            return [self._chunk({"tool_calls": [call]})]
        if kind == "content_block_delta":
            delta = event["delta"]
            if delta["type"] == "text_delta":
                return [self._chunk({"content": delta["text"]})]
            if delta["type"] == "thinking_delta":
                return [self._chunk({"reasoning_content": delta["thinking"]})]
            if delta["type"] == "input_json_delta":
                call = {"index": self._tool_index[event["index"]], "function": {"arguments": delta["partial_json"]}}
                return [self._chunk({"tool_calls": [call]})]
            return []
        if kind == "message_delta":
            chunks = [self._chunk({}, FINISH_REASONS[event["delta"]["stop_reason"]])]
            if self.include_usage:
                chunks.append({**self._chunk({}), "choices": [], "usage": self._usage().model_dump()})
            return chunks
        return []

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.reply.model_id,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI does: null on every chunk but the last
        return chunk

    def _usage(self) -> CompletionUsage:
        u = self.reply.usage
        cached = u.cache_read_input_tokens or 0
        prompt = u.input_tokens + (u.cache_creation_input_tokens or 0) + cached  # the whole prompt
        return CompletionUsage(
            prompt_tokens=prompt,
            completion_tokens=u.output_tokens,
            total_tokens=prompt + u.output_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


def _frame(data: dict[str, Any]) -> bytes:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8")


# ---- errors ---------------------------------------------------------------------------------------


def error_fields(status: int, message: str) -> dict[str, Any]:
    kind, code = ERROR_KINDS.get(status, ("server_error", None))
    return {"message": message, "type": kind, "param": None, "code": code}


class OpenAIErrors:
    """ASGI middleware: an error response under /v1/chat/ gets OpenAI's body shape. It sits outermost,
    so it also reshapes what auth, the router and the last-resort handler send; headers (request ids,
    retry-after, x-should-retry) are kept."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PATH_PREFIX):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body: list[bytes] = []

        async def reshape(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body is complete
                return
            if start is None:
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            data = _openai_error(start["status"], b"".join(body))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(data)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": data})

        await self.app(scope, receive, reshape)


def _openai_error(status: int, body: bytes) -> bytes:
    """Anthropic's `{"type": "error", "error": {type, message}}` -> OpenAI's `{"error": {...}}`."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = "Error."
    return json.dumps({"error": error_fields(status, message)}, ensure_ascii=False).encode("utf-8")
