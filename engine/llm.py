"""The engine's facade: `load(id_or_path)` -> `LLM`, the one object api/ talks to.

An LLM is read-only after loading (config, weights, tokenizer, chat template); every conversation's
runtime state lives in a KVCache the caller owns (`new_cache()`), so one LLM can serve many of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from engine import catalog
from engine.chat_template import ChatTemplate
from engine.config import ModelConfig
from engine.errors import ContextLengthError, KawaiError
from engine.generate import Generation
from engine.gguf import GGUFFile, open_gguf
from engine.kv_cache import KVCache
from engine.model import forward
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from engine.weights import load_weights
from kernels import matmul
from kernels import threads as kernel_threads

DEFAULT_N_CTX = 4096  # context window when not asked for: KV cache memory grows linearly with it


class LLM:
    """A loaded model. Attributes: id, path, config, n_ctx, tokenizer, chat_template, weights,
    load_seconds (file, weights, tokenizer), compile_seconds (kernel warm-up), threads."""

    def __init__(
        self,
        model_id: str,
        path: Path,
        gguf: GGUFFile,
        config: ModelConfig,
        weights,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate,
        n_ctx: int,
    ):
        self.id = model_id
        self.path = path
        self.gguf = gguf
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.n_ctx = n_ctx
        self.load_seconds = 0.0
        self.compile_seconds = 0.0
        self.threads: int | None = None

    def __repr__(self) -> str:
        return f"LLM(id={self.id!r}, arch={self.config.arch!r}, n_ctx={self.n_ctx})"

    # ---- chat formatting and counting ---------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        """False when the file has no template and `chat_template` is the ChatML fallback."""
        return not self.chat_template.is_fallback

    def render_chat(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> str:
        """The prompt text for a conversation, rendered by the model's own chat template."""
        return self.chat_template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids for prompt text (special tokens parsed), with BOS prepended when the model wants it
        and the text did not already start with it (chat templates often write it themselves)."""
        ids = list(self.tokenizer.encode(text, special=True))
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def encode_chat(self, messages: list[dict], **render_kwargs) -> list[int]:
        return self.encode_prompt(self.render_chat(messages, **render_kwargs))

    def count_tokens(self, text: str) -> int:
        return len(self.encode_prompt(text))

    # ---- running the model --------------------------------------------------------------------

    def new_cache(self, max_seq: int | None = None) -> KVCache:
        """An empty KV cache for one conversation (n_ctx positions unless told otherwise)."""
        max_seq = self.n_ctx if max_seq is None else max_seq
        if isinstance(max_seq, bool) or not isinstance(max_seq, int) or not 1 <= max_seq <= self.n_ctx:
            raise KawaiError(f"cache size must be an integer in 1..{self.n_ctx}, got {max_seq!r}")
        return KVCache(self.config, max_seq)

    def forward(self, token_ids: Sequence[int], cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """Run token_ids (T,) after the cache's contents; logits (V,) of the last one, or (T, V)."""
        logits = forward(self.config, self.weights, token_ids, cache, all_logits=all_logits)  # (T or 1, V)
        return logits if all_logits else logits[-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits, float32 (len(ids), n_vocab), computed with a fresh cache."""
        ids = self.check_ids(ids)
        if not ids:
            raise KawaiError("logits() needs at least one token")
        if len(ids) > self.n_ctx:
            raise ContextLengthError(f"{len(ids)} tokens do not fit the context window of {self.n_ctx}")
        cache = KVCache(self.config, len(ids))
        return np.asarray(self.forward(ids, cache, all_logits=True), dtype=np.float32)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cache: KVCache | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Generation:
        """Iterate for Steps (see engine.generate). A passed cache keeps what it holds of prompt_ids."""
        prompt_ids = self.check_ids(prompt_ids)
        return Generation(
            self.forward,
            self.tokenizer,
            prompt_ids,
            params,
            self.new_cache() if cache is None else cache,
            should_stop=should_stop,
        )

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        """Token ids as Python ints, each in 0..n_vocab-1 (a negative id would silently index from the end)."""
        out = []
        n_vocab = self.config.n_vocab
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < n_vocab:
                raise KawaiError(f"token id {t!r} is not in 0..{n_vocab - 1}")
            out.append(int(t))
        return out


def load(
    id_or_path: str | Path,
    *,
    n_ctx: int | None = None,
    exact: bool = False,
    threads: int | None = None,
) -> LLM:
    """Load a catalog model id (already pulled) or a .gguf path.

    n_ctx: context window (default min(trained context, DEFAULT_N_CTX); at most the trained context).
    exact: keep weights in a bit-exact layout instead of the fastest one (see engine.weights).
    threads: kernel threads (default: all cores).
    """
    t0 = time.perf_counter()
    # Everything that can be wrong with the request or the file fails before the kernels are set up.
    path = catalog.resolve_model(id_or_path)
    gguf = open_gguf(path)
    config = ModelConfig.from_gguf(gguf)
    n_ctx = _context_size(n_ctx, config)
    tokenizer = Tokenizer.from_gguf(gguf.metadata)
    template = ChatTemplate.from_gguf(gguf.metadata, tokenizer)  # ChatML when the file has none
    n_threads = _configure_threads(threads)
    weights = load_weights(gguf, config, exact=exact)
    llm = LLM(_model_id(id_or_path, path), path, gguf, config, weights, tokenizer, template, n_ctx)
    llm.threads = n_threads
    llm.load_seconds = time.perf_counter() - t0
    llm.compile_seconds = _warm_up(llm)
    return llm


def _warm_up(llm: LLM) -> float:
    """Compile (or load from Numba's cache) every kernel a request will hit: the matmuls, then one
    prefill of two tokens and one decode step of this model. Returns the seconds taken."""
    t0 = time.perf_counter()
    matmul.warmup()
    cache = KVCache(llm.config, 3)
    llm.forward([0, 0], cache)
    llm.forward([0], cache)
    return time.perf_counter() - t0


def _configure_threads(n: int | None) -> int:
    """Kernel threads: n, else KAWAI_THREADS, else every core Numba may use."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise KawaiError(f"threads must be a positive integer, got {n!r}")
    try:
        return kernel_threads.configure_threads(kernel_threads.default_threads() if n is None else n)
    except kernel_threads.ThreadingError as e:
        raise KawaiError(str(e)) from None


def _context_size(n_ctx: int | None, config: ModelConfig) -> int:
    if n_ctx is None:
        return min(config.n_ctx_train, DEFAULT_N_CTX)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 1 <= n_ctx <= config.n_ctx_train:
        raise KawaiError(f"n_ctx must be an integer in 1..{config.n_ctx_train} (the trained context), got {n_ctx!r}")
    return n_ctx


def _model_id(id_or_path: str | Path, path: Path) -> str:
    """The model id as given, or one derived from the file name for a path."""
    text = str(id_or_path)
    if not isinstance(id_or_path, Path) and catalog.is_model_id(text.lower()) and not text.endswith(".gguf"):
        return text.lower()
    try:
        return catalog.model_id_from_filename(path.name)
    except KawaiError:
        return path.stem
