"""The api/engine seam: everything the HTTP server (api/) may use of a loaded model, declared once.

`engine.LLM` implements it (tests/e2e/test_seam.py checks that, and that api/ uses no other name of a
model). The server holds a `ServedModel`, never reaches into its config, weights, GGUF file or tokenizer,
and never asks with getattr/hasattr what a model has: when it needs a fact, the model answers it here.

    prompt = llm.encode_chat(messages, tools=..., suffix=seed, max_chars=...)   # engine.generate.Prompt
    llm.check_context(len(prompt.ids))          # ContextLengthError: the prompt does not fit the window
    pool = llm.prefix_cache(kv_memory)          # KV memory shared by the running sequences
    scheduler = llm.scheduler(pool, max_sequences=4)   # engine/scheduler.py: admit, step

The command line (api/commands/run.py, chat.py, serve.py) loads its models itself and holds an
`engine.LLM`, the library facade; it is not bound by this Protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from kawai.engine.chat_format import ChatFormat
    from kawai.engine.constraint import Grammar
    from kawai.engine.generate import Prompt
    from kawai.engine.prefix_cache import PrefixCache
    from kawai.engine.scheduler import CacheLender, Scheduler


@runtime_checkable
class ServedModel(Protocol):
    """A loaded model as the server sees it. Read-only after loading; safe to share between the event
    loop, the prompt-building threads and the model's engine thread (each conversation's state lives in
    the KV caches its scheduler lends)."""

    id: str  # the model id clients send ("qwen2.5-coder-0.5b-instruct-q4_k_m"), unique per server
    path: Path  # the GGUF file: its mtime is the model's `created_at` in /v1/models
    n_ctx: int  # the context window: prompt and reply together, in tokens
    chat_format: ChatFormat  # how replies write reasoning and tool calls (engine/chat_format.py)

    @property
    def display_name(self) -> str:
        """A name for people (/v1/models): the GGUF's `general.name`, else the id."""
        ...

    @property
    def has_vision(self) -> bool:
        """True when prompts may contain images (a vision projector is loaded)."""
        ...

    @property
    def max_image_pixels(self) -> int | None:
        """Pixels the vision encoder takes at most per image (larger ones are downscaled); None without
        vision."""
        ...

    def image_tokens(self, width: int, height: int) -> int:
        """Prompt tokens one image of width x height takes, its start and end tokens included (what
        encode_chat writes for it). KawaiError for a model without vision."""
        ...

    def load_summary(self) -> str:
        """One line for the server log: load time, kernel warm-up, n_ctx, KV dtype."""
        ...

    def encode_chat(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        suffix: str = "",
        max_chars: int | None = None,
    ) -> Prompt:
        """A conversation (HF-format messages, content parts may hold PIL images) rendered by the model's
        chat template and tokenized, then `suffix`; content is tokenized as plain text. ContextLengthError
        past `max_chars` characters (before tokenizing); KawaiError when the template refuses."""
        ...

    def check_context(self, n_tokens: int) -> None:
        """ContextLengthError when a prompt of n_tokens does not fit the context window. Its message is
        the Anthropic API's ("prompt is too long: N tokens > M maximum ..."): clients parse it."""
        ...

    def compile_grammar(self, lark: str) -> Grammar:
        """A Lark grammar compiled for constrained decoding (cached per text; the model's first compile
        builds llguidance's view of the vocabulary: seconds, call off the event loop). GrammarError for
        one that cannot be enforced."""
        ...

    def kv_bytes(self, n_positions: int | None = None) -> int:
        """Bytes of keys and values for n_positions (default: n_ctx), in the KV caches' dtype."""
        ...

    def use_threads(self) -> None:
        """Apply the kernel thread count chosen at load time to the calling thread (Numba's count is
        per thread): the engine thread calls it once before its first step."""
        ...

    def release_threads(self) -> None:
        """End the calling thread's kernel worker threads while it has nothing to run (the engine thread
        when it goes idle): an idle thread's workers slow every other thread's kernel launches."""
        ...

    def prefix_cache(
        self,
        memory_bytes: int,
        *,
        disk_dir: Path | None = None,
        disk_bytes: int | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> PrefixCache:
        """This model's prefix cache (engine/prefix_cache.py): `memory_bytes` of KV memory, and with
        `disk_dir` and `disk_bytes` the disk tier; `on_ready` is called (from another thread) when a
        disk look-up ends. KawaiError when the memory holds no cache at all."""
        ...

    def scheduler(self, lender: CacheLender, *, max_sequences: int, chunk: int) -> Scheduler:
        """The step loop (engine/scheduler.py) of this model: up to `max_sequences` sequences, `chunk`
        prompt rows per step, KV caches from `lender`. Drive it from one thread."""
        ...
