"""POST /v1/messages (JSON or SSE) and POST /v1/messages/count_tokens.

Flow: read the body (capped while reading) -> validate -> resolve the model -> render + tokenize off
the event loop -> check the context -> queue a Job on the model's engine thread (529 when full) ->
stream or collect. `message_start` goes out before prefill starts; the first token arrives later.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kawai.api.content import MessageAssembler
from kawai.api.errors import InternalError, InvalidRequestError, RequestTooLargeError
from kawai.api.ids import new_message_id, new_tool_use_id
from kawai.api.limits import check_json_values
from kawai.api.prompt import Prompt, build_prompt, check_context, fetch_images
from kawai.api.sse import PING, sse_frames
from kawai.api.state import request_id_of, server_state, tenant_of
from kawai.api.structured import reply_grammar
from kawai.api.wire import (
    CountTokensRequest,
    MessageResponse,
    MessagesRequest,
    ThinkingEnabled,
    TokenCount,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceTool,
    Usage,
    parse_request,
)
from kawai.api.worker import Failed, Finished, Job, Started, StepChannel
from kawai.engine.generate import ThinkingBudget
from kawai.engine.output_parser import OutputParser, ThinkingDelta, ThinkingEnd, ToolCallEnd
from kawai.engine.sampling import SamplingParams, SamplingParamsError
from kawai.engine.served import ServedModel

# engine finish_reason -> Anthropic stop_reason (eos becomes tool_use when the reply called a tool)
STOP_REASONS = {
    "eos": "end_turn",
    "stop_sequence": "stop_sequence",
    "max_tokens": "max_tokens",
    "context_full": "model_context_window_exceeded",
    "cancelled": "end_turn",
}
CUT_REASONS = ("stop_sequence", "max_tokens", "context_full", "cancelled")
# Defaults when the request leaves them out (newer SDKs have no sampling arguments at all): the
# Qwen2.5 instruct recommendation, gentler on small models than the Anthropic API's temperature 1.0.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.8
DEFAULT_TOP_K = 20
KEEPALIVE_SECONDS = 60.0  # silence after which a stream gets a message_delta keepalive instead of a ping
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
VOLATILE_SYSTEM_PREFIXES = ("x-anthropic-billing-header:",)  # per-request client metadata, not instructions


async def create_message(request: Request) -> Response:
    server = server_state(request)
    req = without_volatile_system(await read_request(request, MessagesRequest, server.settings.max_body_bytes))
    reply = await start_reply(request, req, sampling_params(req))
    if req.stream:
        return EventStreamResponse(sse_frames(reply.events(), request_id_of(request)), reply.job)
    await collect(request, reply)
    return JSONResponse(reply.message())


async def start_reply(request: Request, req: MessagesRequest, params: SamplingParams) -> Reply:
    """Prompt, grammar (api/structured.py), job: everything up to the engine's queue (529 when full).
    Shared with the OpenAI-compatible route, which translates its requests into MessagesRequest."""
    server = server_state(request)
    model = server.model(req.model)
    prompt = await prompt_of(server, model.llm, req, request_id_of(request))
    check_context(model.llm, prompt)
    grammar = await anyio.to_thread.run_sync(reply_grammar, model.llm, req, prompt, limiter=server.prompt_builders)
    if grammar is not None:
        params = replace(params, grammar=grammar)
        prompt = replace(prompt, fenced_calls=False)  # the grammar checks tagged and bare calls only
    job = Job(
        prompt.ids,
        params,
        StepChannel(asyncio.get_running_loop()),
        request_id_of(request),
        tenant=tenant_of(request),
        thinking=thinking_budget(req, prompt),
    )
    model.worker.submit(job)  # 529 when the queue is full
    try:  # the reply's parser reads the prefill (any length): off the event loop, once the job is admitted
        return await anyio.to_thread.run_sync(Reply, model.llm.id, prompt, req, job, server.settings.ping_interval,
                                              limiter=server.prompt_builders)
    except BaseException:
        job.cancel.set()
        raise


async def collect(request: Request, reply: Reply) -> None:
    """Run a non-streaming reply to its end; a client that leaves cancels it."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, reply.job))
    try:
        async for _ in reply.events():
            pass
    finally:
        watcher.cancel()
        reply.job.cancel.set()  # no-op when done; stops the engine if this handler was cancelled


async def count_tokens(request: Request) -> Response:
    server = server_state(request)
    req = without_volatile_system(await read_request(request, CountTokensRequest, server.settings.max_body_bytes))
    model = server.model(req.model)
    prompt = await prompt_of(server, model.llm, req, request_id_of(request))
    return JSONResponse(TokenCount(input_tokens=len(prompt.ids)).model_dump())


async def prompt_of(server, llm: ServedModel, req, request_id: str) -> Prompt:
    """Images downloaded on the event loop, then decoding, rendering and tokenizing in a worker thread
    under the server's own limiter (so slow image hosts or heavy prompts never hold Starlette's pool)."""
    policy, refuse = server.settings.image_policy, server.settings.refuse_images
    image_bytes = await fetch_images(llm, req, policy, refuse)
    return await anyio.to_thread.run_sync(build_prompt, llm, req, policy, refuse, image_bytes, request_id,
                                          limiter=server.prompt_builders)


def without_volatile_system(req):
    """Drop system blocks that are client metadata changing with every request (Claude Code's
    `x-anthropic-billing-header: ...; cch=<hash>;` block): they mean nothing to the model, and at the
    start of the prompt they would defeat the prefix cache for everything after them (docs/serving.md)."""
    kept = [b for b in req.system if not b.text.lstrip().startswith(VOLATILE_SYSTEM_PREFIXES)]
    return req if len(kept) == len(req.system) else req.model_copy(update={"system": kept})


async def read_request(request: Request, model_cls: type, limit: int):
    """Read the body (capped, within the body deadline), then decode and validate it off the event loop
    (up to 32 MB of JSON) under the server's prompt-work limiter."""
    server = server_state(request)
    body = await read_body(request, limit, server.settings.body_seconds)
    return await anyio.to_thread.run_sync(_decode_request, body, model_cls, limiter=server.prompt_builders)


async def read_body(request: Request, limit: int, seconds: float | None = None) -> bytearray:
    """The body, counting bytes as they arrive (Content-Length is only a hint), all of it within
    `seconds` (a client sending a byte at a time holds its connection, not the server)."""
    too_large = RequestTooLargeError(f"Request body is larger than the {limit // (1024 * 1024)} MB limit.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()  # grown in place: no list of chunks joined into a second copy
    with anyio.move_on_after(seconds) as deadline:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise too_large
            body += chunk
    if deadline.cancelled_caught:
        raise InvalidRequestError(f"The request body did not arrive within {seconds:g} s.")
    return body


def _decode_request(body: bytes | bytearray, model_cls: type):
    if not body or body.isspace():  # (strip() would copy up to 32 MB)
        raise InvalidRequestError("The request body is empty; send a JSON object.")
    check_json_values(body)  # before decoding: each value becomes a Python object (api/limits.py)
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"The request body is not valid JSON (line {e.lineno}, column {e.colno}).") from None
    except UnicodeDecodeError:
        raise InvalidRequestError("The request body is not valid UTF-8.") from None
    except (ValueError, RecursionError):
        raise InvalidRequestError("The request body is not valid JSON (nested too deeply, or a huge number).") from None
    return parse_request(model_cls, data)


def sampling_params(req: MessagesRequest) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_k=DEFAULT_TOP_K if req.top_k is None else req.top_k,
            top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p,
            max_tokens=req.max_tokens,
            stop=tuple(req.stop_sequences),
        )
    except SamplingParamsError as e:
        raise InvalidRequestError(str(e)) from None


def thinking_budget(req: MessagesRequest, prompt: Prompt) -> ThinkingBudget | None:
    """`budget_tokens` of enabled thinking, counted from where the reply starts (inside a reasoning block
    the template opened, or after an assistant prefill)."""
    if not isinstance(req.thinking, ThinkingEnabled) or prompt.chat_format.think_open is None:
        return None  # a model without a reasoning block: nothing to budget
    opened = prompt.chat_format.think_open if prompt.in_thinking else ""
    return ThinkingBudget(req.thinking.budget_tokens, prompt.chat_format, opened + prompt.seed)


class EventStreamResponse(StreamingResponse):
    """SSE that cancels its job however the response ends (also if the client left before the first
    frame, when the event generator never ran)."""

    def __init__(self, frames: AsyncIterator[bytes], job: Job):
        super().__init__(frames, media_type="text/event-stream", headers=SSE_HEADERS)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Non-streaming: the body is read, so the next ASGI message is the client going away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


class Reply:
    """One assistant reply: engine Steps -> parser events -> Anthropic stream events + final message."""

    def __init__(
        self, model_id: str, prompt: Prompt, req: MessagesRequest, job: Job, ping_interval: float,
        keepalive_interval: float = KEEPALIVE_SECONDS,
    ):
        self.id = new_message_id()
        self.keepalive_interval = keepalive_interval
        self.model_id = model_id
        self.prompt = prompt
        self.job = job
        self.ping_interval = ping_interval
        choice = req.tool_choice
        self.one_tool_only = isinstance(choice, (ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool)) and (
            choice.disable_parallel_tool_use
        )
        self.parser = OutputParser(
            prompt.chat_format,
            new_id=new_tool_use_id,
            parse_tools=prompt.parse_tools,
            tool_names=prompt.tool_names,
            in_thinking=prompt.in_thinking,
            fenced_calls=prompt.fenced_calls,
        )
        self.parser.prime(prompt.seed)
        self.show_thinking = req.thinking_on  # a model that thinks unasked: its thinking is not shown
        display = getattr(req.thinking, "display", None)
        self.assembler = MessageAssembler(omit_thinking=display == "omitted")
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage = Usage(input_tokens=len(prompt.ids), output_tokens=0)
        self._stopped_after_tool = False

    def message(self) -> dict[str, Any]:
        message = MessageResponse(
            id=self.id,
            content=self.assembler.content,
            model=self.model_id,
            stop_reason=self.stop_reason,
            stop_sequence=self.stop_sequence,
            usage=self.usage,
        ).model_dump()
        message["usage"] = self.usage.model_dump(exclude_none=True)  # cache counts only once known
        return message

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """message_start, content block events, message_delta, message_stop; pings in silences, and
        every `keepalive_interval` of silence a `message_delta` without a stop reason (see below)."""
        loop = asyncio.get_running_loop()
        try:
            # Admission (a sequence slot) is immediate unless every slot is busy; message_start waits for
            # it, so it carries the prefix-cache split, but no longer than a keepalive interval.
            admitted = await self.job.channel.get(timeout=self.keepalive_interval)
            if isinstance(admitted, Failed):  # cancelled while waiting, or no cache slot
                raise InternalError("Generation failed. The request id is in the `request-id` header.")
            if isinstance(admitted, Started):
                self._admitted(admitted)
            yield {"type": "message_start", "message": {**self.message(), "content": []}}
            last_sent = last_event = loop.time()
            while True:
                wait = max(0.0, last_sent + self.ping_interval - loop.time())
                item = await self.job.channel.get(timeout=wait)
                if item is None:
                    last_sent = loop.time()
                    if last_sent - last_event >= self.keepalive_interval:
                        last_event = last_sent
                        yield self._keepalive()
                    else:
                        yield PING
                    continue
                if isinstance(item, Failed):
                    raise InternalError("Generation failed. The request id is in the `request-id` header.")
                if isinstance(item, Started):  # admitted after a long wait in the queue
                    self._admitted(item)
                    continue
                if isinstance(item, Finished):
                    self._count(item)
                    break
                for event in self._on_step(item):
                    yield event
                    last_sent = last_event = loop.time()
            for event in self.assembler.close():
                yield event
            yield {
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
                "usage": self.usage.model_dump(exclude_none=True),
            }
            yield {"type": "message_stop"}
        finally:
            self.job.cancel.set()  # a client that went away stops the engine within one token

    def _keepalive(self) -> dict[str, Any]:
        """A `message_delta` that changes nothing (no stop reason yet, the usage so far). The SDKs drop
        `ping` events before their callers see them, so a client that aborts a stream after minutes without
        an event (Claude Code: 300 s) would abort a long CPU prefill; the API allows several message_delta."""
        return {"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None},
                "usage": self.usage.model_dump(exclude_none=True)}

    def _admitted(self, started: Started) -> None:
        """The engine took the job: its prefix-cache hit is known, and the usage split with it."""
        n = len(self.prompt.ids)
        self.usage = Usage(input_tokens=n - started.cached_tokens, output_tokens=0,
                           cache_creation_input_tokens=0, cache_read_input_tokens=started.cached_tokens)

    def _on_step(self, step) -> list[dict[str, Any]]:
        parsed = [] if self._stopped_after_tool else self.parser.feed(step.text)
        if self.one_tool_only and any(isinstance(e, ToolCallEnd) for e in parsed):
            end = next(i for i, e in enumerate(parsed) if isinstance(e, ToolCallEnd))
            parsed = parsed[: end + 1]
            self._stopped_after_tool = True
            self.job.cancel.set()
        reason = step.finish_reason
        if reason is not None and not self._stopped_after_tool:
            parsed += self.parser.finish(cut=reason in CUT_REASONS)
        if not self.show_thinking:
            parsed = [e for e in parsed if not isinstance(e, (ThinkingDelta, ThinkingEnd))]
        if reason is not None:
            if self._stopped_after_tool or (reason == "eos" and self.parser.tool_calls):
                self.stop_reason = "tool_use"
            else:
                self.stop_reason = STOP_REASONS[reason]
                self.stop_sequence = step.stop_sequence if reason == "stop_sequence" else None
        return self.assembler.add(parsed)

    def _count(self, done: Finished) -> None:
        self.usage = Usage(
            input_tokens=done.prompt_tokens - done.cached_tokens - done.created_tokens,
            output_tokens=done.generated_tokens,
            cache_creation_input_tokens=done.created_tokens,
            cache_read_input_tokens=done.cached_tokens,
        )
