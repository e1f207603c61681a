"""Guaranteed structure: the grammar a reply must follow, built from the request (the engine enforces it).

    grammar = reply_grammar(llm, req, prompt)   # engine.constraint.Grammar, or None = unconstrained

When there is one (Lark text compiled by llguidance, cached per grammar by `llm.compile_grammar`):

| request | the reply |
|---|---|
| `output_config.format` (or the beta `output_format`) `{type: "json_schema", schema}` | JSON valid against the schema |
| `tool_choice` `any` / `tool` (the prompt already holds the call's opening, api/prompt.py) | the rest of the call: an offered name, then arguments valid against its `input_schema`; more calls unless `disable_parallel_tool_use` |
| a tool with `strict: true`, `tool_choice` `auto` | free text (or the JSON of the format, or calls), where every call tag opens a call to an offered tool with valid arguments |

Calls are written in the model family's markup (`prompt.chat_format`, engine/chat_format.py: its call
prefix, name, the name-to-arguments separator, arguments, call suffix), or, as small models often do
under `auto`, as the bare call object for the whole reply. A format without call tags (llama3) writes
only bare calls, so its free text holds none. A call in a ```json fence cannot be checked (the grammar
would capture every JSON code block), so under a grammar the output parser leaves fences as text, and a
strict `auto` reply may not open with one.

The arguments of a tool that is not strict follow its schema when the engine can enforce it, else any
JSON object. A schema feature the engine cannot enforce (`not`, `uniqueItems`, an unknown `format`, ...)
in the output format or a strict tool is a 400 that names it, never a silent downgrade. Thinking and a
grammar do not mix (400): the grammar would have to allow free text first.
"""

from __future__ import annotations

import json
from typing import Any

from kawai.api.errors import InvalidRequestError
from kawai.api.prompt import Prompt
from kawai.api.wire import MessagesRequest, Tool, ToolChoiceAny, ToolChoiceTool
from kawai.engine.chat_format import CALL_NAME_OPEN, CALL_SEPARATOR
from kawai.engine.constraint import GrammarError, json_rule, json_schema_error
from kawai.engine.served import ServedModel

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def reply_grammar(llm: ServedModel, req: MessagesRequest, prompt: Prompt):
    """The compiled grammar for this request's reply, or None; InvalidRequestError for a schema the
    engine cannot enforce. Compiling the first grammar of a model builds llguidance's view of its
    vocabulary (~2 s for 150k tokens): call off the event loop."""
    lark = reply_lark(req, prompt)
    if lark is None:
        return None
    if req.thinking_on or prompt.in_thinking:
        raise InvalidRequestError("thinking may not be enabled with output_config.format or strict tools")
    try:
        return llm.compile_grammar(lark)
    except GrammarError as e:
        raise InvalidRequestError(f"cannot constrain the reply: {e}") from None


def reply_lark(req: MessagesRequest, prompt: Prompt) -> str | None:
    """The Lark grammar text (None when nothing is constrained)."""
    fmt = req.response_format
    chat = prompt.chat_format
    tools = req.tools if prompt.parse_tools else []
    choice = req.tool_choice
    forced = isinstance(choice, (ToolChoiceAny, ToolChoiceTool)) and bool(tools)
    strict = any(t.strict for t in tools)
    if fmt is None and not forced and not strict:
        return None
    rules = [f"args_{i}: {json_rule(_arguments_schema(t, i))}" for i, t in enumerate(tools)]
    if tools:
        named = " | ".join(f"call_{i}" for i in range(len(tools)))
        rules += [f"call_{i}: {_lit(t.name + chat.name_to_arguments)} args_{i}" for i, t in enumerate(tools)]
        rules.append(f"call_body: ({named}) {_lit(chat.call_suffix)}")
        rules.append(f"call: {_lit(chat.call_prefix)} call_body")
    if fmt is not None:
        rules.append(f"answer: {json_rule(_checked(fmt.schema_, 'output_config.format.schema'))}")
    one_call = getattr(choice, "disable_parallel_tool_use", False)
    if forced:  # the prompt ends inside the call: after its name (tool) or at the name (any)
        first = (
            f"args_{[t.name for t in tools].index(choice.name)} {_lit(chat.call_suffix)}"
            if isinstance(choice, ToolChoiceTool)
            else "call_body"
        )
        more = "" if one_call else f" ({_lit(CALL_SEPARATOR)} call)*"
        start = f"start: {first}{more}"
    elif not tools:
        start = "start: answer"
    else:
        # A call without tags, the whole reply (small models write these), is checked as well; a ```json
        # fence is not (the output parser then leaves fences as text).
        rules.append(f"bare_call: {_lit(CALL_NAME_OPEN)} ({named}) \"}}\"")
        if fmt is not None:  # a JSON answer, or calls
            start = "start: answer | bare_call | call" + ("" if one_call else f" ({_lit(CALL_SEPARATOR)} call)*")
        elif chat.call_open is None:  # calls are bare objects only: one for the whole reply, or text
            rules.append("TEXT: /(.|\\n)*/")
            rules.append("plain_first: /[^{`\\s]/ TEXT")
            start = "start: (bare_call | plain_first)?"
        else:
            # Free text; a call tag in it (found lazily: at its first occurrence) opens a checked call.
            # The first character decides: `{` a bare call, the tag a tagged one, anything else plain
            # text (which may still contain tagged calls) — but not whitespace, `<`, or a backtick:
            # small models like to open a ```json fence around a call, which no grammar could check
            # without also capturing every JSON code block; refused there, they write a checked call.
            rest = chat.call_prefix[len(chat.call_open) :]  # after the tag, up to the name
            rules.append("TEXT: /(.|\\n)*/")
            rules.append(f"text_to_call[lazy]: TEXT {_lit(chat.call_open)}")
            rules.append(f"tail: (text_to_call {_lit(rest)} call_body)* TEXT")
            rules.append(f"tagged_first: {_lit(chat.call_open)} {_lit(rest)} call_body tail")
            rules.append("plain_first: /[^{<`\\s]/ tail")
            start = "start: (bare_call | tagged_first | plain_first)?"
    return "\n".join([start, *rules]) + "\n"


def _arguments_schema(tool: Tool, i: int) -> dict[str, Any]:
    if tool.strict:
        return _checked(tool.input_schema, f"tools.{i}.input_schema")
    return ANY_OBJECT if json_schema_error(tool.input_schema) else tool.input_schema


def _checked(schema: dict[str, Any], where: str) -> dict[str, Any]:
    error = json_schema_error(schema)
    if error:
        raise InvalidRequestError(f"{where}: unsupported JSON Schema feature: {error}"[:400])
    return schema


def _lit(text: str) -> str:
    """A Lark string literal (JSON string escaping is valid Lark)."""
    return json.dumps(text, ensure_ascii=False)
