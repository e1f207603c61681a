"""Tiny random-weight models written to GGUF, for fast tests of the engine and everything above it.

`write_tiny_model(path, arch)` writes a 2-layer qwen2 (QKV bias), qwen3 (QK-norm, head_dim != d_model /
n_heads) or llama (Q/K permuted like llama.cpp's converter) model with llama.cpp's tensor and key names,
a small byte-level BPE vocabulary (256 byte tokens, a few merges, ChatML special tokens) and a
ChatML/Qwen-style chat template with tools. transformers loads the same file as an independent oracle:

    load_hf_model(path)   # AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, float32, overrides)

Weights are random with unit-variance activations, so attention patterns and logits are not trivial.
`qtype` picks the storage of every 2-D weight: "f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
"q4_k", "q5_k", "q6_k", or "mixed" (a Q4_K_M-like mix of Q4_K/Q5_0/Q5_K/Q6_K/Q8_0). K-quants need
d_model, q_dim and d_ff to be multiples of 256. 1-D tensors (norms, biases) are always F32.

Uses the `gguf` package (test-only dependency).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter, RopeScalingType, TokenType
from gguf.quants import dequantize, quantize

# ---------------------------------------------------------------------------------------------------
# Vocabulary: GPT-2 byte-level BPE. Byte tokens first, then merges, then special tokens.


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255, indexed by byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


BYTE_CHARS = _bytes_to_unicode()

# Merges in priority order ("Ġ" is the byte-level space).
MERGES = [
    "Ġ t", "h e", "i n", "e r", "Ġ a", "o n", "r e", "Ġ s", "a t", "e n", "Ġ w", "o r", "i s",
    "Ġ o", "Ġ c", "l l", "Ġt he", "Ġ h", "e s", "Ġ i", "o u", "Ġ f", "a n", "Ġ b", "i t", "Ġ m",
    "Ġ p", "Ġ d", "in g", "e d", "Ġ {", "Ġ \"", "Ġ Ġ", "ĠĠ ĠĠ", "Ġ is", "Ġt o", "Ġa n", "Ġan d",
]

# (text, GGUF token type): control tokens are never produced by plain text; user-defined ones are
# special in the chat format but appear in model output (Qwen's <tool_call>, <think>).
SPECIAL_TOKENS = [
    ("<|endoftext|>", TokenType.CONTROL),
    ("<|im_start|>", TokenType.CONTROL),
    ("<|im_end|>", TokenType.CONTROL),
    ("<tool_call>", TokenType.USER_DEFINED),
    ("</tool_call>", TokenType.USER_DEFINED),
    ("<think>", TokenType.USER_DEFINED),
    ("</think>", TokenType.USER_DEFINED),
]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges) of the tiny vocabulary."""
    tokens = list(BYTE_CHARS)
    types = [int(TokenType.NORMAL)] * 256
    for merge in MERGES:
        left, right = merge.split(" ")
        assert left in tokens and right in tokens, merge
        tokens.append(left + right)
        types.append(int(TokenType.NORMAL))
    for text, ttype in SPECIAL_TOKENS:
        tokens.append(text)
        types.append(int(ttype))
    return tokens, types, list(MERGES)


_TOKENS = tiny_vocab()[0]
TOKEN_ID = {text: _TOKENS.index(text) for text, _ in SPECIAL_TOKENS}  # e.g. TOKEN_ID["<|im_end|>"]
N_VOCAB = len(_TOKENS)
BOS_ID = TOKEN_ID["<|endoftext|>"]
EOS_ID = TOKEN_ID["<|im_end|>"]

# ChatML with Qwen-style tools (<tools> in the system turn, <tool_call> JSON in assistant turns,
# <tool_response> in user turns) and Qwen3's `enable_thinking=False` switch.
CHAT_TEMPLATE = """\
{%- if messages and messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = 'You are a helpful assistant.' if tools else none %}
    {%- set turns = messages %}
{%- endif %}
{%- if tools %}
    {{- '<|im_start|>system\\n' + system + '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within ' }}
    {{- '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif system is not none %}
    {{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in turns %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- set fn = call.function if call.function is defined else call %}
            {{- '\\n<tool_call>\\n{\\"name\\": \\"' + fn.name + '\\", \\"arguments\\": ' }}
            {{- fn.arguments if fn.arguments is string else fn.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or turns[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or turns[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# The shape of Llama 3.1's template (meta-llama/Llama-3.1-8B-Instruct), trimmed to what matters here:
# header tokens, <|eot_id|>, and tool calls written as a bare JSON object with "parameters".
LLAMA3_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if tools %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n' }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {%- for t in tools %}{{- '\\n' + t | tojson }}{%- endfor %}
    {{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.tool_calls %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- call.arguments | tojson }}
        {{- '}<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

# ---------------------------------------------------------------------------------------------------
# Weights

ARCH_DEFAULTS = {
    # arch: (qkv_bias, qk_norm, tied, rope_base, tokenizer pre)
    "qwen2": (True, False, False, 1_000_000.0, "qwen2"),
    "qwen3": (False, True, True, 1_000_000.0, "qwen2"),
    "llama": (False, False, True, 10_000.0, "smollm"),
}

QTYPES = {
    "f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "q5_0": QT.Q5_0,
    "q5_1": QT.Q5_1, "q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K,
}

# "mixed": per GGUF tensor kind, loosely after llama.cpp's Q4_K_M recipe.
MIXED = {
    "token_embd": QT.Q4_K, "output": QT.Q8_0, "attn_q": QT.Q5_0, "attn_k": QT.Q5_0, "attn_v": QT.Q6_K,
    "attn_output": QT.Q4_K, "ffn_gate": QT.Q4_K, "ffn_up": QT.Q5_K, "ffn_down": QT.Q6_K,
}


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's converter permutation of Llama Q/K rows (HF rotate-half pairs -> adjacent pairs)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_kquant(rng: np.random.Generator, rows: int, cols: int, qtype: QT, std: float) -> np.ndarray:
    """Random K-quant blocks (gguf-py cannot quantize K-types): random quants and sub-block scales, then
    the super-block scale d (and dmin, to keep the mean near zero) set so the weights have `std`."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)

    def set_scales(d: float) -> None:
        if qtype == QT.Q6_K:  # ql[128] qh[64] scales[16] d:f16 -- d is last
            raw[:, :, 208:210] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
        else:  # Q4_K / Q5_K: d:f16, dmin:f16 first; mean of q is 7.5 (Q4_K) or 15.5 (Q5_K)
            q_mean = 7.5 if qtype == QT.Q4_K else 15.5
            raw[:, :, 0:2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
            raw[:, :, 2:4] = np.frombuffer(np.float16(d * q_mean).tobytes(), np.uint8)

    set_scales(1e-3)
    measured = float(dequantize(raw.reshape(rows, -1), qtype).std())
    set_scales(1e-3 * std / measured)
    return raw.reshape(rows, -1)


def _encode(rng: np.random.Generator, w: np.ndarray, qtype: QT) -> tuple[np.ndarray, QT | None]:
    """A float32 matrix in the requested storage, as (array for GGUFWriter.add_tensor, raw_dtype)."""
    if qtype == QT.F32:
        return w.astype(np.float32), None
    if qtype == QT.F16:
        return w.astype(np.float16), None
    if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        return _random_kquant(rng, w.shape[0], w.shape[1], qtype, float(w.std())), qtype
    return quantize(w.astype(np.float32), qtype), qtype


def write_tiny_model(
    path: str | Path,
    arch: str = "qwen2",
    *,
    qtype: str = "f32",
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int | None = None,
    d_ff: int = 128,
    n_ctx: int = 512,
    rope_base: float | None = None,
    rope_scaling_factor: float | None = None,
    tied: bool | None = None,
    rope_freqs: np.ndarray | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
    seed: int = 0,
) -> Path:
    """Write a tiny random model; returns the .gguf path (a directory `path` gets `tiny-{arch}-{qtype}.gguf`).

    Defaults per arch: qwen2 has QKV biases and a separate output matrix; qwen3 has QK-norm, tied output
    and head_dim = 2 * d_model / n_heads (its key_length differs from d_model / n_heads, as in real
    Qwen3); llama has tied output and GGUF-permuted Q/K. `rope_freqs` (head_dim/2,) writes Llama 3's
    `rope_freqs.weight` frequency divisors.
    """
    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"unknown tiny arch {arch!r}")
    qkv_bias, qk_norm, default_tied, default_base, pre = ARCH_DEFAULTS[arch]
    tied = default_tied if tied is None else tied
    rope_base = default_base if rope_base is None else rope_base
    if head_dim is None:
        head_dim = 2 * d_model // n_heads if arch == "qwen3" else d_model // n_heads
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim

    path = Path(path)
    if path.is_dir():
        path = path / f"tiny-{arch}-{qtype}.gguf"
    rng = np.random.default_rng(seed)
    tokens, token_types, merges = tiny_vocab()
    n_vocab = len(tokens)

    def normal(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def storage(kind: str) -> QT:
        return MIXED[kind] if qtype == "mixed" else QTYPES[qtype]

    tensors: list[tuple[str, np.ndarray, QT | None]] = []

    def add_matrix(name: str, kind: str, w: np.ndarray) -> None:
        tensors.append((name, *_encode(rng, w, storage(kind))))

    def add_vector(name: str, v: np.ndarray) -> None:
        tensors.append((name, v.astype(np.float32), None))

    add_matrix("token_embd.weight", "token_embd", normal(n_vocab, d_model, std=0.25))
    for i in range(n_layers):
        blk = f"blk.{i}"
        wq = normal(q_dim, d_model, std=d_model**-0.5)
        wk = normal(kv_dim, d_model, std=d_model**-0.5)
        if arch == "llama":  # HF layout -> GGUF layout, exactly as convert_hf_to_gguf.py does
            wq, wk = llama_permute(wq, n_heads, n_heads), llama_permute(wk, n_heads, n_kv_heads)
        add_vector(f"{blk}.attn_norm.weight", norm_weight(d_model))
        add_matrix(f"{blk}.attn_q.weight", "attn_q", wq)
        add_matrix(f"{blk}.attn_k.weight", "attn_k", wk)
        add_matrix(f"{blk}.attn_v.weight", "attn_v", normal(kv_dim, d_model, std=d_model**-0.5))
        if qkv_bias:
            add_vector(f"{blk}.attn_q.bias", normal(q_dim, std=0.3))
            add_vector(f"{blk}.attn_k.bias", normal(kv_dim, std=0.3))
            add_vector(f"{blk}.attn_v.bias", normal(kv_dim, std=0.3))
        if qk_norm:
            add_vector(f"{blk}.attn_q_norm.weight", norm_weight(head_dim))
            add_vector(f"{blk}.attn_k_norm.weight", norm_weight(head_dim))
        add_matrix(f"{blk}.attn_output.weight", "attn_output", normal(d_model, q_dim, std=q_dim**-0.5))
        add_vector(f"{blk}.ffn_norm.weight", norm_weight(d_model))
        add_matrix(f"{blk}.ffn_gate.weight", "ffn_gate", normal(d_ff, d_model, std=d_model**-0.5))
        add_matrix(f"{blk}.ffn_up.weight", "ffn_up", normal(d_ff, d_model, std=d_model**-0.5))
        add_matrix(f"{blk}.ffn_down.weight", "ffn_down", normal(d_model, d_ff, std=d_ff**-0.5))
    add_vector("output_norm.weight", norm_weight(d_model))
    if not tied:
        add_matrix("output.weight", "output", normal(n_vocab, d_model, std=d_model**-0.5))
    if rope_freqs is not None:
        add_vector("rope_freqs.weight", np.asarray(rope_freqs, np.float32))

    writer = GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}-{qtype}")
    writer.add_block_count(n_layers)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(d_model)
    writer.add_feed_forward_length(d_ff)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(rope_base)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(n_vocab)
    if rope_scaling_factor is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling_factor)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(BOS_ID)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, data, raw_dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_hf_overrides(fields: dict) -> dict:
    """Config overrides transformers needs to read a GGUF faithfully, from its metadata `fields` as
    gguf-py reads them ({key: value}).

    transformers' GGUF loader ignores `qwen3.attention.key_length` (Qwen3Config then defaults head_dim
    to 128) and every `rope.scaling.*` key; they are passed explicitly.
    """
    arch = fields["general.architecture"]
    overrides: dict = {}
    if f"{arch}.attention.key_length" in fields:
        overrides["head_dim"] = int(fields[f"{arch}.attention.key_length"])
    if fields.get(f"{arch}.rope.scaling.type") == "linear":
        overrides["rope_parameters"] = {
            "rope_type": "linear",
            "factor": float(fields[f"{arch}.rope.scaling.factor"]),
            "rope_theta": float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        }
    return overrides


def load_hf_model(path: str | Path):
    """The same GGUF loaded by transformers (weights dequantized by gguf-py, float32, eval mode):
    an independent oracle for the engine. Nothing here uses Kawai's own GGUF reader, so a reader bug
    cannot reach the oracle's input.

    transformers' loader spends most of a minute on a real model in pure-Python work that does not touch
    the weights: converting every vocabulary string (twice), and rebuilding gguf-py's tensor-name table
    once per module. So transformers reads a copy made by gguf-py's own reader and writer, with identical
    metadata and tensor bytes but without the vocabulary arrays (`{arch}.vocab_size` stands in for
    them), and with the name table cached.
    """
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp, _cached_tensor_name_maps():
        light, fields = _copy_without_vocabulary(path, Path(tmp) / path.name)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=light.name, dtype=torch.float32, **tiny_hf_overrides(fields)
        )
    return model.eval()


VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                   "tokenizer.ggml.scores")


def _copy_without_vocabulary(src: Path, dst: Path) -> tuple[Path, dict]:
    """Copy a GGUF minus the vocabulary string arrays, read and written with gguf-py (GGUFReader and
    GGUFWriter). Returns (dst, {key: value} of the kept metadata)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    kept = {"general.architecture": arch}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in VOCABULARY_KEYS:
            continue  # GGUF.*: gguf-py's header pseudo-fields
        value = kept[key] = field.contents()
        if key == "general.alignment":
            writer.add_custom_alignment(int(value))
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    if f"{arch}.vocab_size" not in reader.fields:
        writer.add_vocab_size(len(reader.fields["tokenizer.ggml.tokens"].data))
    for t in reader.tensors:  # quantized data comes as bytes (rows..., row_bytes); the writer rebuilds the shape
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst, kept


class _cached_tensor_name_maps:
    """Within the block, gguf-py's `get_tensor_name_map(arch, n_blocks)` (a pure function) is memoized."""

    def __enter__(self):
        import functools

        import gguf

        self._original = gguf.get_tensor_name_map
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(self._original)

    def __exit__(self, *exc):
        import gguf

        gguf.get_tensor_name_map = self._original
