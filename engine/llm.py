"""The engine's facade: `load(id_or_path)` -> `LLM`, the one object api/ talks to.

An LLM is read-only after loading (config, weights, tokenizer, chat template); every conversation's
runtime state lives in a KVCache the caller owns (`new_cache()`), so one LLM can serve many of them.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kawai.engine import catalog
from kawai.engine.chat_format import ChatFormat, chat_format_for
from kawai.engine.chat_template import ChatTemplate
from kawai.engine.config import ModelConfig
from kawai.engine.constraint import Grammar, GrammarCompiler
from kawai.engine.errors import ContextLengthError, KawaiError
from kawai.engine.generate import Prompt
from kawai.engine.gguf import GGUFFile, open_gguf
from kawai.engine.kv_cache import DEFAULT_KV_DTYPE, KVCache, check_kv_dtype
from kawai.engine.model import Chunk, check_ids, forward
from kawai.engine.prefix_cache import OneCache, PrefixCache, open_prefix_cache
from kawai.engine.sampling import SamplingParams
from kawai.engine.compute_threads import configure_threads, release_threads
from kawai.engine.scheduler import CHUNK, MAX_SEQUENCES, CacheLender, Generation, Request, Scheduler
from kawai.engine.tokenizer import Tokenizer
from kawai.engine.weights import load_weights
from kawai.kernels import matmul

if TYPE_CHECKING:
    from kawai.engine.vision.image_prompt import ImagePrompt

IMAGE_MARKUP = "<|vision_start|><|image_pad|><|vision_end|>"  # one image in rendered prompt text
# Message fields whose text comes from users, tools or earlier replies: tokenized as plain text.
CONTENT_FIELDS = ("content", "reasoning_content")

log = logging.getLogger("kawai.engine")


class LLM:
    """A loaded model. Attributes: id, path, config, n_ctx, kv_dtype (the KV caches' storage type),
    tokenizer, chat_template, weights, load_seconds (file, weights, tokenizer), compile_seconds (kernel
    warm-up), threads. The server uses it through engine.served.ServedModel, the part declared for api/."""

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
        kv_dtype: str = DEFAULT_KV_DTYPE,
    ):
        self.id = model_id
        self.path = path
        self.gguf = gguf
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        # How replies write reasoning and tool calls (engine/chat_format.py), for the output parser.
        self.chat_format: ChatFormat = chat_format_for(gguf.metadata, chat_template.source)
        self.n_ctx = n_ctx
        self.kv_dtype = check_kv_dtype(kv_dtype)
        self.load_seconds = 0.0
        self.compile_seconds = 0.0
        self.threads: int | None = None
        self.projector = None  # engine.vision.projector.Projector when the model takes images
        self.vision_tokens = None  # engine.vision.multimodal.VisionTokens, with a projector
        self.grammars = GrammarCompiler(tokenizer)  # constrained decoding (built on first compile)

    @property
    def has_vision(self) -> bool:
        """True when a vision projector is loaded: prompts may contain images."""
        return self.projector is not None

    @property
    def max_image_pixels(self) -> int | None:
        """Pixels the vision encoder takes at most per image; None without vision."""
        return None if self.projector is None else self.projector.config.image.max_pixels

    @property
    def display_name(self) -> str:
        """The GGUF's `general.name` when it has one, else the id (/v1/models' display_name)."""
        name = self.gguf.metadata.get("general.name")
        return name if isinstance(name, str) and name else self.id

    def __repr__(self) -> str:
        return f"LLM(id={self.id!r}, arch={self.config.arch!r}, n_ctx={self.n_ctx})"

    def load_summary(self) -> str:
        """The line the server logs: load time (file, weights, tokenizer) and kernel warm-up, separately."""
        return (f"loaded {self.id} in {self.load_seconds:.1f} s, kernels warmed in {self.compile_seconds:.1f} s "
                f"(n_ctx {self.n_ctx}, KV cache {self.kv_dtype})")

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
        """The prompt text for a conversation, rendered by the model's own chat template.

        A message's content is a string or a list of parts {"type": "text", "text": ...} and
        {"type": "image", "image": PIL.Image}, concatenated; an image is written as IMAGE_MARKUP."""
        return self.chat_template.render(
            _flatten_messages(messages),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids for prompt text (special tokens parsed), with BOS prepended when the model wants it
        and the text did not already start with it (chat templates often write it themselves)."""
        ids = list(self.tokenizer.encode(text, special=True))
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

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
        """Token ids of a conversation (see render_chat for the message format), then `suffix` (the
        start of the reply: an assistant prefill). The text is exactly render_chat(...) + suffix, but
        only the template's own markup may produce control tokens: message content and the suffix are
        tokenized as plain text, so a user writing `<|im_start|>` or `<|image_pad|>` gets those
        characters, not the control tokens; so are the strings of tools and tool calls. A prompt text
        longer than `max_chars` is refused (ContextLengthError) before anything is tokenized. Each image becomes <|vision_start|>, one <|image_pad|>
        per image token, <|vision_end|>."""
        kwargs = dict(tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
        text = self.render_chat(messages, **kwargs)
        if max_chars is not None and len(text) + len(suffix) > max_chars:
            raise ContextLengthError(
                f"prompt is too long: {len(text) + len(suffix)} characters; the model {self.id!r} has a context "
                f"window of {self.n_ctx} tokens"
            )
        nonce = secrets.token_hex(8)
        contents: list[list] = []  # per sentinel: its parts (str, or a PIL image)
        marked = _mark_messages(messages, nonce, contents)
        marked_text = self.chat_template.render(marked, **{**kwargs, "tools": _mark_tools(tools, nonce, contents)})
        pieces = _align(text, re.split(_sentinel_pattern(nonce), marked_text), contents)
        # Runs between control tokens are tokenized whole, content and markup together, so the ids are
        # those of the whole text (as transformers' apply_chat_template gives them): "Be brief." then the
        # template's "\n\n# Tools" make the token ".\n\n", not "." + "\n\n".
        runs: list = []  # plain text (str), a control token id (int), or an image
        for is_content, piece in pieces + [(True, suffix)]:
            for part in ([piece] if is_content else self.tokenizer.split_special(piece)):
                if isinstance(part, str) and runs and isinstance(runs[-1], str):
                    runs[-1] += part
                elif not isinstance(part, str) or part:
                    runs.append(part)
        ids: list[int] = []
        images: list = []
        for run in runs:
            if isinstance(run, str):
                ids += self.tokenizer.encode(run, special=False)
            elif isinstance(run, int):
                ids.append(run)
            else:
                ids += self._image_ids(run)
                images.append(run)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return Prompt(ids, tuple(images), text + suffix, self.vision_tokens.image_pad if images else None)

    def _image_ids(self, image) -> list[int]:
        n = self.image_tokens(*image.size)  # KawaiError without vision
        t = self.vision_tokens
        return [t.start] + [t.image_pad] * (n - 2) + [t.end]

    def image_tokens(self, width: int, height: int) -> int:
        """Prompt tokens of one image of width x height: its image pads, its start and end tokens."""
        if not self.has_vision:
            raise KawaiError(f"model {self.id!r} does not take images (no vision projector is loaded)")
        from kawai.engine.vision.multimodal import image_token_count

        return image_token_count(self.projector, width, height) + 2

    def count_tokens(self, text: str) -> int:
        return len(self.encode_prompt(text))

    def check_context(self, n_tokens: int) -> None:
        """ContextLengthError when a prompt of n_tokens does not fit the context window; the message is
        the Anthropic API's, which clients parse (Claude Code compacts on it)."""
        if n_tokens > self.n_ctx:
            raise ContextLengthError(
                f"prompt is too long: {n_tokens} tokens > {self.n_ctx} maximum (the context window of model {self.id!r})"
            )

    def count_chat_tokens(self, messages: list[dict], **kwargs) -> int:
        """Prompt tokens of a conversation, image tokens included: len(encode_chat(...).ids)."""
        return len(self.encode_chat(messages, **kwargs).ids)

    # ---- running the model --------------------------------------------------------------------

    def new_cache(self, max_seq: int | None = None) -> KVCache:
        """An empty KV cache for one conversation (n_ctx positions unless told otherwise)."""
        max_seq = self.n_ctx if max_seq is None else max_seq
        if isinstance(max_seq, bool) or not isinstance(max_seq, int) or not 1 <= max_seq <= self.n_ctx:
            raise KawaiError(f"cache size must be an integer in 1..{self.n_ctx}, got {max_seq!r}")
        return KVCache(self.config, max_seq, self.kv_dtype)

    def kv_bytes(self, n_positions: int | None = None) -> int:
        """Bytes of keys and values for n_positions (default: n_ctx, a `new_cache()`), in the cache's dtype."""
        return KVCache.bytes_for(self.config, self.n_ctx if n_positions is None else n_positions, self.kv_dtype)

    def use_threads(self) -> None:
        """Apply the thread count chosen at load time to the calling thread (Numba's is per thread)."""
        if self.threads:
            configure_threads(self.threads)

    def release_threads(self) -> None:
        """The calling thread stops running this model for now: its kernel worker threads end (an idle pool
        slows every other thread's kernel launches, kernels/threads.py); its next step starts them again."""
        release_threads()

    def forward_batch(self, chunks: list[Chunk], caches: list[KVCache]) -> list[np.ndarray]:
        """One step of several sequences (engine.model.forward): per sequence logits (1, V), or (n, V)."""
        return forward(self.config, self.weights, chunks, caches)

    def forward(self, token_ids: Sequence[int], cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """Run token_ids (T,) after the cache's contents, CHUNK rows at a time (teacher forcing, tests,
        warm-up); logits (V,) of the last one, or (T, V)."""
        ids = np.asarray(token_ids)
        if ids.size == 0:
            raise KawaiError("forward needs at least one token")
        rows = []
        for lo in range(0, ids.shape[0], CHUNK):
            rows.append(forward(self.config, self.weights, [Chunk(ids[lo : lo + CHUNK], all_logits=all_logits)],
                                [cache])[0])  # (n or 1, V)
        return np.concatenate(rows) if all_logits else rows[-1][-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits, float32 (len(ids), n_vocab), computed with a fresh cache."""
        ids = self.check_ids(ids)
        if not ids:
            raise KawaiError("logits() needs at least one token")
        self.check_context(len(ids))
        cache = KVCache(self.config, len(ids), self.kv_dtype)
        return np.asarray(self.forward(ids, cache, all_logits=True), dtype=np.float32)

    def generate(
        self,
        prompt: Prompt | Sequence[int],
        params: SamplingParams,
        cache: KVCache | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Generation:
        """Iterate for Steps: the scheduler (engine/scheduler.py) running this one sequence. `prompt`: from
        encode_chat (images included), or plain token ids. A passed cache keeps what it holds of the prompt
        (a conversation's next turn); `stats.vision_seconds` and `stats.image_tokens` report images."""
        prompt = prompt if isinstance(prompt, Prompt) else Prompt(self.check_ids(prompt))
        lender = OneCache(self.new_cache() if cache is None else cache)
        request = Request(prompt, params, should_stop=should_stop or (lambda: False))
        return Generation(self.scheduler(lender, max_sequences=1), request)

    def scheduler(self, lender: CacheLender, *, max_sequences: int = MAX_SEQUENCES, chunk: int = CHUNK) -> Scheduler:
        """The step loop of this model (engine/scheduler.py): up to max_sequences sequences, `chunk` prompt
        rows per step, KV caches from `lender` (a PrefixCache, or OneCache)."""
        return Scheduler(self, lender, max_sequences=max_sequences, chunk=chunk)

    def prefix_cache(
        self,
        memory_bytes: int,
        *,
        disk_dir: Path | None = None,
        disk_bytes: int | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> PrefixCache:
        """This model's prefix cache (engine.prefix_cache.open_prefix_cache): memory_bytes of KV memory,
        and the disk tier with disk_dir and disk_bytes."""
        return open_prefix_cache(self, memory_bytes, disk_dir=disk_dir, disk_bytes=disk_bytes, on_ready=on_ready)

    def compile_grammar(self, lark: str) -> Grammar:
        """A Lark grammar compiled for this model's vocabulary (engine/constraint.py; cached per text)."""
        return self.grammars.compile(lark)

    # ---- images ---------------------------------------------------------------------------------

    def check_image_prompt(self, prompt: Prompt) -> None:
        """KawaiError unless this model takes images and the prompt's image rows match its images."""
        if not self.has_vision:
            raise KawaiError(f"model {self.id!r} does not take images (no vision projector is loaded)")
        from kawai.engine.vision.image_prompt import check_image_prompt

        self.check_ids(prompt.ids)
        check_image_prompt(self.projector, prompt.ids, prompt.images, self.vision_tokens.image_pad)

    def encode_image_prompt(self, prompt: Prompt) -> ImagePrompt:
        """The prompt's images encoded (vision encoder, timed) and its rows placed at M-RoPE positions. The
        scheduler has run check_image_prompt at admission; encode_image_prompt checks the rows again, cheaply."""
        from kawai.engine.vision.image_prompt import encode_image_prompt

        if not self.has_vision:
            raise KawaiError(f"model {self.id!r} does not take images (no vision projector is loaded)")
        return encode_image_prompt(self.config, self.projector, prompt.ids, prompt.images, self.vision_tokens.image_pad)

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        """Token ids as Python ints, checked by engine.model.check_ids (integers in 0..n_vocab-1); [] stays []."""
        ids = list(ids)
        return check_ids(self.config, ids).tolist() if ids else []


# ---- chat prompts: content as plain text ------------------------------------------------------


def _parts(content: Any) -> list:
    """A message's content as parts: strings and images (anything with a .size, i.e. a PIL image)."""
    if content is None or isinstance(content, str):
        return [content or ""]
    if not isinstance(content, list):
        raise KawaiError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "image" and hasattr(part.get("image"), "size"):
            out.append(part["image"])
        else:
            raise KawaiError("a content part must be {'type': 'text', 'text': str} or {'type': 'image', 'image': PIL.Image}")
    return out


def _flatten_messages(messages: list[dict]) -> list[dict]:
    """Messages whose content fields are strings (images written as IMAGE_MARKUP)."""
    out = []
    for m in messages:
        m = dict(m)
        for key in CONTENT_FIELDS:
            if key in m and not isinstance(m[key], str):
                m[key] = "".join(p if isinstance(p, str) else IMAGE_MARKUP for p in _parts(m[key]))
        out.append(m)
    return out


def _sentinel(nonce: str, i: int) -> str:
    return f"@@kawai-{nonce}-{i}@@"


def _sentinel_pattern(nonce: str) -> str:
    return f"@@kawai-{nonce}-(\\d+)@@"


def _mark_messages(messages: list[dict], nonce: str, contents: list[list]) -> list[dict]:
    """Messages with every client string replaced by a sentinel; contents[i] = its parts. A content field
    becomes one sentinel; so do a tool message's name and call id, and the strings of tool calls (id,
    name, the keys and values of the arguments): templates write those as they are."""
    out = []
    for m in messages:
        m = dict(m)
        for key in CONTENT_FIELDS:
            if isinstance(m.get(key), (str, list)):
                parts = [p for p in _parts(m[key]) if not isinstance(p, str) or p]
                if parts:
                    m[key] = _sentinel(nonce, len(contents))
                    contents.append(parts)
        for key in ("name", "tool_call_id"):
            if key in m:
                m[key] = _mark_strings(m[key], nonce, contents)
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = _mark_strings(m["tool_calls"], nonce, contents)
        out.append(m)
    return out


def _mark_tools(tools: list[dict] | None, nonce: str, contents: list[list]) -> list[dict] | None:
    """Tool definitions with their client strings (name, description, JSON schema) marked."""
    return None if tools is None else [_mark_strings(t, nonce, contents) for t in tools]


_PLAIN_WORD = re.compile(r"[A-Za-z0-9_]*")  # no control token is spelled like this


def _mark_strings(value: Any, nonce: str, contents: list[list]) -> Any:
    """Every string in a JSON value (object keys too) replaced by a sentinel, except plain words: those
    cannot hold control-token text, and templates look some of them up ("type", "function", "name")."""
    if isinstance(value, str):
        if _PLAIN_WORD.fullmatch(value):
            return value
        contents.append([value])
        return _sentinel(nonce, len(contents) - 1)
    if isinstance(value, dict):
        return {_mark_strings(k, nonce, contents): _mark_strings(v, nonce, contents) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark_strings(v, nonce, contents) for v in value]
    return value


def _align(text: str, split: list[str], contents: list[list]) -> list[tuple[bool, Any]]:
    """(is_content, piece) pieces whose texts join to `text`, the real rendering.

    split: re.split of the rendering with sentinels: template text, sentinel index, template text, ...
    Usually the template copies content verbatim, so putting the content back gives `text`. A template
    that edits content (`| trim`, Qwen3 cutting reasoning out of old replies; `tojson` escaping a tool's
    strings) is handled by finding the template's own text in `text` in order: what lies between two
    template texts is content (plain text), when only one split is possible. If even that fails, the
    pieces with unedited content are used (safe: the content is still plain text)."""
    template = split[0::2]
    order = [int(i) for i in split[1::2]]
    if any(i >= len(contents) for i in order):
        raise KawaiError("the chat template produced an unexpected prompt")
    pieces: list[tuple[bool, Any]] = [(False, template[0])]
    for k, i in enumerate(order):
        pieces += [(True, p) for p in contents[i]]
        pieces.append((False, template[k + 1]))
    pieces = [(c, p) for c, p in pieces if not isinstance(p, str) or p]
    if "".join(p if isinstance(p, str) else IMAGE_MARKUP for _, p in pieces) == text:
        return pieces
    aligned = None
    if all(isinstance(p, str) for i in order for p in contents[i]):
        aligned = _find_content(text, template)
    if aligned is None:
        log.warning("chat template output does not match its messages; content tokenized unedited")
        return pieces
    return aligned


def _find_content(text: str, template: list[str]) -> list[tuple[bool, str]] | None:
    """Split `text` into template[0], content 0, template[1], ..., content n-1, template[n] where the
    template edited content; None unless exactly one such split exists. Content holding a copy of the
    template's next text could otherwise pass a role boundary of its own for the template's (a forged
    turn): the leftmost and the rightmost splits bound every split, so they must be the same."""
    first = _leftmost_starts(text, template)
    if first is None:
        return None
    mirrored = _leftmost_starts(text[::-1], [t[::-1] for t in reversed(template)])  # the same pieces, from the end
    if mirrored is None:
        return None
    last = [len(text) - i - len(t) for i, t in zip(reversed(mirrored), template)]
    if first != last:
        return None
    out: list[tuple[bool, str]] = []
    for k, (start, piece) in enumerate(zip(first, template)):
        out.append((False, piece))
        if k + 1 < len(template):
            out.append((True, text[start + len(piece) : first[k + 1]]))
    return [(c, p) for c, p in out if p]


def _leftmost_starts(text: str, template: list[str]) -> list[int] | None:
    """Where each template piece starts when each is matched as early as it can be: template[0] at 0,
    template[-1] ending the text."""
    if len(template) == 1:
        return [0] if text == template[0] else None
    if not text.startswith(template[0]) or not text.endswith(template[-1]):
        return None
    starts, pos = [0], len(template[0])
    for piece in template[1:-1]:
        at = text.find(piece, pos)
        if at < 0:
            return None
        starts.append(at)
        pos = at + len(piece)
    end = len(text) - len(template[-1])
    if end < pos:
        return None
    return starts + [end]


def load(
    id_or_path: str | Path,
    *,
    n_ctx: int | None = None,
    exact: bool = False,
    threads: int | None = None,
    mmproj: str | Path | None = None,
    kv_dtype: str | None = None,
) -> LLM:
    """Load a catalog model id (already pulled) or a .gguf path.

    n_ctx: context window (default: the trained context; at most that). A KV cache's pages are committed
        by the OS as positions are written, so a long window costs memory only when a prompt uses it.
    exact: keep weights in a bit-exact layout instead of the fastest one (see engine.weights), and the
        KV cache in float32.
    threads: kernel threads (default: all cores).
    mmproj: vision projector GGUF for a qwen2vl model (default: `find_projector` next to the model).
    kv_dtype: storage of the KV caches, "f16" or "f32" (engine.kv_cache); default f16, f32 when exact.
    """
    t0 = time.perf_counter()
    # Everything that can be wrong with the request or the file fails before the kernels are set up.
    path = catalog.resolve_model(id_or_path)
    gguf = open_gguf(path)
    config = ModelConfig.from_gguf(gguf)
    n_ctx = _context_size(n_ctx, config)
    kv_dtype = check_kv_dtype(kv_dtype or ("f32" if exact else DEFAULT_KV_DTYPE))
    tokenizer = Tokenizer.from_gguf(gguf.metadata)
    template = ChatTemplate.from_gguf(gguf.metadata, tokenizer)  # ChatML when the file has none
    n_threads = configure_threads(threads)
    projector, vision_tokens = _load_projector(path, gguf, config, mmproj, exact)
    weights = load_weights(gguf, config, exact=exact)
    llm = LLM(_model_id(id_or_path, path), path, gguf, config, weights, tokenizer, template, n_ctx, kv_dtype)
    llm.projector, llm.vision_tokens = projector, vision_tokens
    llm.threads = n_threads
    llm.load_seconds = time.perf_counter() - t0
    llm.compile_seconds = _warm_up(llm)
    release_threads()  # the server runs the model on another thread (kernels/threads.py)
    return llm


def _load_projector(path: Path, gguf: GGUFFile, config: ModelConfig, mmproj, exact: bool):
    """(Projector, VisionTokens), or (None, None) for a model without one. An explicit mmproj must fit
    the model; one found next to it is used only by a model that takes images (M-RoPE)."""
    from kawai.engine.vision.multimodal import find_projector, vision_token_ids
    from kawai.engine.vision.projector import load_projector

    if mmproj is None:
        mmproj = find_projector(path) if config.rope_sections else None
        if mmproj is None:
            return None, None
    elif not config.rope_sections:
        raise KawaiError(f"{path.name} ({config.arch}) does not take images: a vision projector needs a qwen2vl model")
    mmproj = Path(mmproj)
    if not mmproj.is_file():
        raise KawaiError(f"vision projector not found: {mmproj}")
    projector = load_projector(mmproj, exact=exact)
    if projector.config.d_out != config.d_model:
        raise KawaiError(
            f"vision projector {mmproj.name} outputs width {projector.config.d_out}, but {path.name} has "
            f"width {config.d_model}: they do not belong together"
        )
    tokens = vision_token_ids(gguf.metadata.get("tokenizer.ggml.tokens", []))
    return projector, tokens


def _warm_up(llm: LLM) -> float:
    """Compile (or load from Numba's cache) every kernel a request will hit: the matmuls, then one
    prefill of two tokens and one decode step of this model. Returns the seconds taken."""
    t0 = time.perf_counter()
    matmul.warmup()
    cache = KVCache(llm.config, 3, llm.kv_dtype)
    llm.forward([0, 0], cache)  # prompt rows (on AMX CPUs: the tile kernels)
    llm.forward_batch([Chunk(np.zeros(1, np.int64), prompt=False)], [cache])  # a decode step: the vector kernels
    return time.perf_counter() - t0


def _context_size(n_ctx: int | None, config: ModelConfig) -> int:
    if n_ctx is None:
        return config.n_ctx_train
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
