"""Anthropic request -> the model's prompt: HF-format messages rendered by the GGUF's chat template.

Mapping:
- `system` (string or text blocks) and any mid-conversation `role: "system"` messages -> one leading
  system message (folded in order; every chat template accepts a first system message).
- assistant `tool_use` blocks -> `tool_calls` [{type: function, function: {name, arguments}}];
  user `tool_result` blocks -> `role: "tool"` messages (an error result is prefixed with "Error: ").
- assistant `thinking` blocks -> `reasoning_content` (templates that know it use it); redacted ones dropped.
- images (user turns and tool_result content; base64 or url, see api/images.py) -> content parts
  {"type": "image", "image": PIL.Image} for a vision model (at most 100 per request); for a text-only
  model -> the text IMAGE_PLACEHOLDER (agents keep a pasted screenshot in their history: a 400 would
  fail every later turn), or a 400 naming the model with `refuse_images` (`kawai serve --refuse-images`).
- other block and tool types clients send are made into text or dropped on the way in (api/blocks.py).
- tools (OpenAI function format) go to the template unless tool_choice is "none".
- tool_choice "any" / "tool": the assistant turn is seeded with the call opening, in the model's chat
  format (`llm.chat_format`, engine/chat_format.py), so the model must complete a call; the seed is also
  given to the output parser (it is part of the reply).
- a final assistant message is a prefill: the reply continues it.
- thinking on/off -> `enable_thinking` (templates without it ignore the variable).

Images are fetched first, on the event loop (`fetch_images`: one deadline, concurrent downloads), then
`build_prompt` runs in a worker thread: it counts every image from its header before decoding any
(api/images.py), renders and tokenizes with `LLM.encode_chat`: message content and the seed are plain
text (a user typing a control token's text gets characters, not the token); image tokens are counted.
It checks the prompt size (characters before tokenizing, tokens against the context window after).
`count_tokens` returns exactly the prompt length /v1/messages uses, image tokens included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kawai.api.errors import InvalidRequestError
from kawai.api.images import MAX_IMAGES_PER_REQUEST, ImagePolicy, decode_images, gather_image_bytes
from kawai.api.wire import (
    CountTokensRequest,
    ImageBlock,
    Message,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)
from kawai.engine.chat_format import HERMES, ChatFormat
from kawai.engine.chat_template import TemplateFailedError
from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.generate import Prompt as EnginePrompt
from kawai.engine.served import ServedModel

log = logging.getLogger("kawai.prompt")

CHARS_PER_TOKEN_CAP = 32  # a prompt longer than n_ctx * this many characters is refused before tokenizing
TOOL_ERROR_PREFIX = "Error: "
IMAGE_PLACEHOLDER = "[image omitted: this model cannot see images]"


@dataclass(frozen=True)
class Prompt:
    text: str  # rendered prompt, seed included (each image as engine.llm.IMAGE_MARKUP)
    ids: EnginePrompt  # engine.generate.Prompt from LLM.encode_chat: ids, and the decoded images
    seed: str  # text after the generation prompt (prefill, forced call opening): the reply's start
    parse_tools: bool  # tools offered: parse tool calls in the output
    tool_names: frozenset[str]  # the offered tools (calls written without tags must name one)
    in_thinking: bool  # the prompt leaves the model inside a reasoning block
    fenced_calls: bool = True  # a call in a ```json fence counts (False when a grammar shapes the reply)
    chat_format: ChatFormat = HERMES  # the model's reply syntax (llm.chat_format)


async def fetch_images(llm: ServedModel, req: CountTokensRequest, policy: ImagePolicy, refuse_images: bool = False) -> list[bytes]:
    """The bytes of the request's images in order (checked: a vision model, at most 100 images), URLs
    downloaded concurrently under the policy's one deadline. On the event loop: no thread waits."""
    blocks = _image_blocks(llm, _for_model(llm, req, refuse_images))
    return await gather_image_bytes([b.source for b in blocks], policy) if blocks else []


def build_prompt(
    llm: ServedModel,
    req: CountTokensRequest,
    images: ImagePolicy | None = None,
    refuse_images: bool = False,
    image_bytes: Sequence[bytes] | None = None,
    request_id: str = "",
) -> Prompt:
    """Render and tokenize; InvalidRequestError for anything the client can fix. `images`: how image
    blocks are loaded (default: ImagePolicy(), private URLs refused); `refuse_images`: a 400 for images
    sent to a model without vision instead of a placeholder; `image_bytes`: what fetch_images gave
    (without it, URLs are fetched here). Runs off the event loop: it decodes images."""
    req = _for_model(llm, req, refuse_images)
    blocks = _image_blocks(llm, req)
    policy = images or ImagePolicy()
    decoded: dict[int, Any] = {}
    if blocks:
        if image_bytes is None:
            image_bytes = asyncio.run(gather_image_bytes([b.source for b in blocks], policy))
        pictures = decode_images(image_bytes, policy, *_image_budget(llm))
        decoded = {id(b): p for b, p in zip(blocks, pictures)}
    messages, prefill = to_hf_messages(req, lambda block: decoded[id(block)])
    tools = None if isinstance(req.tool_choice, ToolChoiceNone) or not req.tools else hf_tools(req)
    seed = prefill + _forced_call_opening(req, llm.chat_format)
    kwargs = dict(tools=tools, add_generation_prompt=True, enable_thinking=req.thinking_on)
    try:  # rendered once here (with its marked copy, engine/llm.py), not again for a length check
        ids = llm.encode_chat(messages, suffix=seed, max_chars=llm.n_ctx * CHARS_PER_TOKEN_CAP, **kwargs)
    except ContextLengthError as e:
        raise InvalidRequestError(str(e)) from None
    except KawaiError as e:  # a template refusing the conversation (raise_exception), failing, or too large
        log.warning("request %s: the chat template failed: %s", request_id or "-", e)
        raise InvalidRequestError(f"the model's chat template rejected the conversation: {_shown(e)}") from None
    text = ids.text[: len(ids.text) - len(seed)]
    names = frozenset(t.name for t in req.tools) if tools is not None else frozenset()
    return Prompt(text + seed, ids, seed, parse_tools=tools is not None, tool_names=names,
                  in_thinking=llm.chat_format.opens_thinking(text), chat_format=llm.chat_format)


def _shown(e: KawaiError) -> str:
    """What a client may read of a template failure: the template's own words (raise_exception, a
    bound it ran past), never a Python exception's text (that stays in the log)."""
    return "the template failed while rendering it" if isinstance(e, TemplateFailedError) else str(e)


def check_context(llm: ServedModel, prompt: Prompt) -> None:
    """Only a prompt that does not fit is refused (the engine's check, LLM.check_context, as a 400).
    `max_tokens` is a ceiling, not a reservation: a reply that reaches the end of the context stops there
    with stop_reason `model_context_window_exceeded` (as the Anthropic API does). The message is the
    API's, which clients parse (Claude Code compacts)."""
    try:
        llm.check_context(len(prompt.ids))
    except ContextLengthError as e:
        raise InvalidRequestError(str(e)) from None


def _for_model(llm: ServedModel, req: CountTokensRequest, refuse_images: bool) -> CountTokensRequest:
    """For a model without vision, every image block (tool results included) becomes the
    IMAGE_PLACEHOLDER text, unless images are refused (then _image_blocks names the model)."""
    if llm.has_vision or refuse_images or not _all_image_blocks(req):
        return req

    def swap(blocks):
        return [TextBlock(type="text", text=IMAGE_PLACEHOLDER) if isinstance(b, ImageBlock) else b for b in blocks]

    def message(m: Message) -> Message:
        content = [b.model_copy(update={"content": swap(b.content)}) if isinstance(b, ToolResultBlock) else b
                   for b in swap(m.content)]
        return m.model_copy(update={"content": content})

    return req.model_copy(update={"messages": [message(m) for m in req.messages]})


def _all_image_blocks(req: CountTokensRequest) -> list[ImageBlock]:
    blocks = []
    for m in req.messages:
        for block in m.content:
            parts = block.content if isinstance(block, ToolResultBlock) else [block]
            blocks += [p for p in parts if isinstance(p, ImageBlock)]
    return blocks


def _image_blocks(llm: ServedModel, req: CountTokensRequest) -> list[ImageBlock]:
    """The request's image blocks in order; images only for a vision model, at most
    MAX_IMAGES_PER_REQUEST (checked before any is loaded)."""
    blocks = _all_image_blocks(req)
    if blocks and not llm.has_vision:
        raise InvalidRequestError(
            f"model {llm.id!r} does not support images (it has no vision encoder); "
            "send text only or use a vision model"
        )
    if len(blocks) > MAX_IMAGES_PER_REQUEST:
        raise InvalidRequestError(f"too many images: {len(blocks)}; at most {MAX_IMAGES_PER_REQUEST} per request")
    return blocks


def _image_budget(llm: ServedModel) -> tuple[Callable[[int, int], int], int, int | None]:
    """(prompt tokens of an image of width x height, the context window, the encoder's max pixels)."""
    return llm.image_tokens, llm.n_ctx, llm.max_image_pixels


def _forced_call_opening(req: CountTokensRequest, fmt: ChatFormat) -> str:
    choice = req.tool_choice
    if not isinstance(choice, (ToolChoiceAny, ToolChoiceTool)):
        return ""
    if not req.tools:
        raise InvalidRequestError(f"tool_choice.type {choice.type!r} requires tools")
    if req.thinking_on:
        raise InvalidRequestError("thinking may not be enabled when tool_choice forces tool use")
    if isinstance(choice, ToolChoiceAny):
        return fmt.forced_call_opening()
    if choice.name not in {t.name for t in req.tools}:
        raise InvalidRequestError(f"tool_choice.name: no tool named {choice.name!r} in tools")
    return fmt.forced_call_opening(choice.name)


def hf_tools(req: CountTokensRequest) -> list[dict[str, Any]]:
    """Anthropic tools -> the OpenAI function format chat templates expect."""
    out = []
    for t in req.tools:
        fn: dict[str, Any] = {"name": t.name}
        if t.description:
            fn["description"] = t.description
        fn["parameters"] = t.input_schema
        out.append({"type": "function", "function": fn})
    return out


ImageLoader = Callable[[ImageBlock], Any]  # image block -> PIL.Image


def to_hf_messages(req: CountTokensRequest, load: ImageLoader | None = None) -> tuple[list[dict[str, Any]], str]:
    """(messages for the template, assistant prefill text). Content with images is a list of parts
    (engine.llm's format); `load` decodes or fetches each image (without it, images are an error)."""
    system_parts = [b.text for b in req.system if b.text]
    turns: list[Message] = []
    for m in req.messages:
        if m.role == "system":
            system_parts.extend(_texts(m.content))
        else:
            turns.append(m)
    prefill = ""
    if turns and turns[-1].role == "assistant" and all(isinstance(b, TextBlock) for b in turns[-1].content):
        prefill = "".join(b.text for b in turns[-1].content)
        turns = turns[:-1]
    if not any(m.role == "user" for m in turns):
        raise InvalidRequestError("messages: the conversation needs at least one user message")

    tool_names = {b.id: b.name for m in turns for b in m.content if isinstance(b, ToolUseBlock)}
    out: list[dict[str, Any]] = []
    if system_parts:
        out.append({"role": "system", "content": "\n\n".join(system_parts)})
    for m in turns:
        out.extend(_assistant(m) if m.role == "assistant" else _user(m, tool_names, load))
    return _merge_same_role(out), prefill


def _texts(blocks) -> list[str]:
    return [b.text for b in blocks if isinstance(b, TextBlock) and b.text]


def _assistant(m: Message) -> list[dict[str, Any]]:
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(_texts(m.content))}
    thinking = "".join(b.thinking for b in m.content if isinstance(b, ThinkingBlock))
    if thinking:
        msg["reasoning_content"] = thinking
    calls = [
        {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
        for b in m.content
        if isinstance(b, ToolUseBlock)
    ]
    if calls:
        msg["tool_calls"] = calls
    return [msg]


def _user(m: Message, tool_names: dict[str, str], load: ImageLoader | None) -> list[dict[str, Any]]:
    """Tool results become `tool` messages (in order); other text and images stay a user message."""
    out: list[dict[str, Any]] = []
    content: list[Any] = []  # str and image parts, in block order
    for b in m.content:
        if isinstance(b, ToolResultBlock):
            result = _content(b.content, "\n", load)
            if b.is_error:
                result = _join(TOOL_ERROR_PREFIX, result, "")
            tool_msg = {"role": "tool", "content": result, "tool_call_id": b.tool_use_id}
            if b.tool_use_id in tool_names:
                tool_msg["name"] = tool_names[b.tool_use_id]
            out.append(tool_msg)
        elif isinstance(b, (TextBlock, ImageBlock)):
            content.append(b)
        elif isinstance(b, (ToolUseBlock, ThinkingBlock, RedactedThinkingBlock)):
            raise InvalidRequestError(f"messages: a user message cannot contain a {b.type} block")
    if any(not isinstance(b, TextBlock) or b.text for b in content) or not out:
        out.append({"role": "user", "content": _content(content, "\n\n", load)})
    return out


def _content(blocks, sep: str, load: ImageLoader | None) -> str | list[dict[str, Any]]:
    """Text and image blocks -> a string (text only) or parts; consecutive texts joined by sep."""
    parts: list[Any] = []  # image parts, and lists of consecutive texts (joined once: linear in the blocks)
    for b in blocks:
        if isinstance(b, ImageBlock):
            if load is None:
                raise InvalidRequestError("images are not accepted here")
            parts.append({"type": "image", "image": load(b)})
        elif isinstance(b, TextBlock) and b.text:
            if parts and isinstance(parts[-1], list):
                parts[-1].append(b.text)
            else:
                parts.append([b.text])
    parts = [{"type": "text", "text": sep.join(p)} if isinstance(p, list) else p for p in parts]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _join(a: str | list, b: str | list, sep: str) -> str | list:
    """Concatenate two contents (strings or part lists) with sep between them."""
    if isinstance(a, str) and isinstance(b, str):
        return a + sep + b
    as_parts = [x if isinstance(x, list) else ([{"type": "text", "text": x}] if x else []) for x in (a, b)]
    middle = [{"type": "text", "text": sep}] if sep and as_parts[0] and as_parts[1] else []
    return as_parts[0] + middle + as_parts[1]


def _merge_same_role(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join consecutive plain user (or plain assistant) messages, as the Anthropic API does."""
    out: list[dict[str, Any]] = []
    for m in messages:
        prev = out[-1] if out else None
        mergeable = m["role"] in ("user", "assistant") and set(m) == {"role", "content"}
        if prev is not None and mergeable and prev["role"] == m["role"] and set(prev) == {"role", "content"}:
            prev["content"] = _join(prev["content"], m["content"], "\n\n") if prev["content"] else m["content"]
        else:
            out.append(dict(m))
    return out
