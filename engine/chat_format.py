"""Chat formats: how a model family writes reasoning and tool calls in its replies.

The chat template (engine/chat_template.py) turns a conversation into prompt text; a `ChatFormat` says
how to read the reply back. Two families are declared here:

    hermes   Qwen2, Qwen2.5, Qwen3, Hermes and ChatML models (and the tiny test models):
                 <think>\\nreasoning\\n</think>\\n\\nanswer
                 <tool_call>\\n{"name": "get_weather", "arguments": {"location": "Paris"}}\\n</tool_call>
    llama3   Llama 3.1 / 3.2 / 3.3 with tools: one bare JSON object per call, arguments under "parameters",
                 {"name": "get_weather", "parameters": {"location": "Paris"}}

A format is chosen once per model, from GGUF metadata (`chat_format_for`): the first format whose
markers the chat template writes (the template teaches the model its call syntax, so it is the best
witness), else `hermes` when the vocabulary has a `<tool_call>` token (Qwen's vocabulary carries it even
in files whose template has no tools), else the architecture's default (engine/architectures.py).
SmolLM2's template, for one, writes no tool calls at all: it gets its llama row's default, `hermes`.

engine/output_parser.py turns decoded reply text into events with these strings; api/prompt.py seeds a
forced call with `forced_call_opening`; api/structured.py builds grammars from the same pieces, and
`forced_think_close` is what a thinking budget writes to end a reasoning block. api/ spells none of a
family's markup itself.

Every family's models also write calls without their tags -- in a ```json fence, or as a bare object
for the whole reply -- which the output parser accepts for offered tools (its docstring has the rules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kawai.engine.architectures import architecture

CALL_NAME_OPEN = '{"name": "'  # every family's call object starts with its name
CALL_SEPARATOR = "\n"  # between consecutive calls (the templates join them so)


@dataclass(frozen=True)
class ChatFormat:
    """The reply syntax of one model family. None = the family has no such syntax."""

    name: str
    think_open: str | None  # opens a reasoning block, only at the start of a reply
    think_close: str | None
    call_open: str | None  # the tag before each call object (None: calls are bare objects)
    call_close: str | None  # the tag after it
    arguments_key: str = "arguments"  # {"name": …, "<arguments_key>": {…}}
    markers: tuple[str, ...] = ()  # strings whose presence in a chat template identifies the family

    @property
    def call_prefix(self) -> str:
        """What a call starts with, up to its name: `<tool_call>\\n{"name": "`."""
        return (self.call_open + "\n" if self.call_open else "") + CALL_NAME_OPEN

    @property
    def name_to_arguments(self) -> str:
        """Between a call's name and its arguments object: `", "arguments": `."""
        return f'", "{self.arguments_key}": '

    @property
    def call_suffix(self) -> str:
        """After the arguments object: the call object's brace, then the closing tag."""
        return "}" + ("\n" + self.call_close if self.call_close else "")

    @property
    def forced_think_close(self) -> str:
        """The text a thinking budget forces to end a reasoning block ("" for a family that does not think)."""
        return "\n" + self.think_close + "\n\n" if self.think_close else ""

    def forced_call_opening(self, tool_name: str | None = None) -> str:
        """The reply's start when a call is forced: up to the name (any tool), or up to the arguments
        object (`tool_name`). The model then must complete a call."""
        if tool_name is None:
            return self.call_prefix
        return self.call_prefix + tool_name + self.name_to_arguments

    def opens_thinking(self, prompt_text: str) -> bool:
        """True when the prompt leaves the model inside a reasoning block (a template that opens it)."""
        return self.think_open is not None and prompt_text.rstrip().endswith(self.think_open)


HERMES = ChatFormat(
    name="hermes",
    think_open="<think>",
    think_close="</think>",
    call_open="<tool_call>",
    call_close="</tool_call>",
    markers=("<tool_call>",),
)
LLAMA3 = ChatFormat(
    name="llama3",
    think_open=None,
    think_close=None,
    call_open=None,
    call_close=None,
    arguments_key="parameters",
    markers=('"parameters": ', "<|eot_id|>"),  # all of them: Llama 3.1's `{"name": …, "parameters": …}`
)
CHAT_FORMATS = {f.name: f for f in (HERMES, LLAMA3)}
VOCABULARY_MARKER = ("<tool_call>", HERMES)  # a token of Qwen's vocabulary, template or not


def chat_format_for(metadata: Mapping[str, Any], template: str) -> ChatFormat:
    """The chat format of a model: from its chat template's text, its vocabulary, its architecture."""
    for fmt in CHAT_FORMATS.values():
        if fmt.markers and all(m in template for m in fmt.markers):
            return fmt
    token, fmt = VOCABULARY_MARKER
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and token in tokens:
        return fmt
    return CHAT_FORMATS[architecture(str(metadata.get("general.architecture", ""))).chat_format]
