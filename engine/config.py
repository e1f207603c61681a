"""ModelConfig: the frozen description of a model, built by one function from GGUF metadata.

Qwen2, Qwen3 and Llama share one transformer; they differ by a few flags here (QKV bias, QK-norm, RoPE
style, tied output), never by separate model code. The flags come from the architecture's row in
engine/architectures.py and from which optional tensors the file has. Keys follow llama.cpp's names
(`{arch}.block_count`, ...). A missing or ill-typed key is a KawaiError naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kawai.engine.architectures import OUTPUT_TENSOR, QKV_BIAS_TENSOR, architecture
from kawai.engine.errors import KawaiError
from kawai.engine.gguf import GGUFFile

MAX_DIM = 1 << 20  # sanity bound for every size read from metadata


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # a name in engine.architectures.ARCHITECTURES: "qwen2" | "qwen3" | "llama" | "qwen2vl"
    n_layers: int
    d_model: int  # residual stream width
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention: n_heads % n_kv_heads == 0)
    head_dim: int  # may differ from d_model // n_heads (Qwen3)
    d_ff: int  # SwiGLU hidden width
    n_vocab: int
    n_ctx_train: int  # context length the model was trained for
    rms_eps: float
    rope_base: float
    rope_style: str  # "neox" | "normal" (engine/architectures.py explains the pairings)
    rope_scaling: str  # "none" | "linear"
    rope_scaling_factor: float  # positions are divided by this (1.0 without scaling)
    qkv_bias: bool  # attn_q/k/v have biases (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    tied_output: bool  # no output.weight: the output projection reuses token_embd
    # M-RoPE (an `mrope` architecture: Qwen2-VL / Qwen2.5-VL): dimension pairs turned by the t, h, w
    # positions of image tokens (engine/vision/mrope.py); empty for text-only architectures.
    rope_sections: tuple[int, ...] = ()

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> ModelConfig:
        meta = gguf.metadata
        arch = _string(meta, "general.architecture")
        row = architecture(arch)

        def key(name: str) -> str:
            return f"{arch}.{name}"

        n_layers = _int(meta, key("block_count"))
        d_model = _int(meta, key("embedding_length"))
        n_heads = _int(meta, key("attention.head_count"))
        # llama.cpp's default when the key is absent: no grouping.
        n_kv_heads = _int(meta, key("attention.head_count_kv"), default=n_heads)
        if key("attention.key_length") in meta:
            head_dim = _int(meta, key("attention.key_length"))
        else:
            if d_model % n_heads:
                raise KawaiError(
                    f"{key('embedding_length')} {d_model} is not a multiple of "
                    f"{key('attention.head_count')} {n_heads}"
                )
            head_dim = d_model // n_heads
        if n_heads % n_kv_heads:
            raise KawaiError(
                f"{key('attention.head_count')} {n_heads} is not a multiple of "
                f"{key('attention.head_count_kv')} {n_kv_heads}"
            )
        if head_dim % 2:
            raise KawaiError(f"head dimension {head_dim} must be even for RoPE")
        if key("attention.value_length") in meta and _int(meta, key("attention.value_length")) != head_dim:
            raise KawaiError(f"{key('attention.value_length')} different from the key length is not supported")
        n_rot = _int(meta, key("rope.dimension_count"), default=head_dim)
        if n_rot != head_dim:
            raise KawaiError(
                f"{key('rope.dimension_count')} {n_rot} != head dimension {head_dim}: "
                "partial rotary embeddings are not supported"
            )

        n_vocab = _vocab_size(gguf, arch)
        rope_scaling, rope_factor = _rope_scaling(meta, arch)
        return cls(
            arch=arch,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            d_ff=_int(meta, key("feed_forward_length")),
            n_vocab=n_vocab,
            n_ctx_train=_int(meta, key("context_length")),
            rms_eps=_float(meta, key("attention.layer_norm_rms_epsilon"), positive=True),
            rope_base=_float(meta, key("rope.freq_base"), default=10000.0, positive=True),
            rope_style=row.rope_style,
            rope_scaling=rope_scaling,
            rope_scaling_factor=rope_factor,
            qkv_bias=QKV_BIAS_TENSOR in gguf.tensors,
            qk_norm=row.qk_norm,
            tied_output=OUTPUT_TENSOR not in gguf.tensors,
            rope_sections=_rope_sections(meta, arch, head_dim) if row.mrope else (),
        )


def _vocab_size(gguf: GGUFFile, arch: str) -> int:
    """Rows of token_embd; the token list and `{arch}.vocab_size`, when present, must agree."""
    info = gguf.tensors.get("token_embd.weight")
    if info is None:
        raise KawaiError("tensor 'token_embd.weight' is missing")
    if len(info.shape) != 2:
        raise KawaiError(f"tensor 'token_embd.weight' has shape {info.shape}, expected 2 dimensions")
    n_vocab = info.shape[0]
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != n_vocab:
        raise KawaiError(f"tokenizer.ggml.tokens has {len(tokens)} entries but token_embd has {n_vocab} rows")
    if f"{arch}.vocab_size" in gguf.metadata:
        declared = _int(gguf.metadata, f"{arch}.vocab_size")
        if declared != n_vocab:
            raise KawaiError(f"{arch}.vocab_size {declared} != token_embd rows {n_vocab}")
    return n_vocab


def _rope_scaling(meta: dict[str, Any], arch: str) -> tuple[str, float]:
    kind = _string(meta, f"{arch}.rope.scaling.type", default="none")
    if kind == "none":
        return "none", 1.0
    if kind == "linear":
        return "linear", _float(meta, f"{arch}.rope.scaling.factor", positive=True)
    raise KawaiError(f"{arch}.rope.scaling.type {kind!r} is not supported (supported: none, linear)")


def _rope_sections(meta: dict[str, Any], arch: str, head_dim: int) -> tuple[int, int, int]:
    """`{arch}.rope.dimension_sections` [t, h, w, 0]: pairs per position component, covering head_dim/2."""
    name = f"{arch}.rope.dimension_sections"
    value = _get(meta, name, _MISSING)
    is_int_array = getattr(getattr(value, "dtype", None), "kind", None) in ("i", "u")  # GGUF arrays are numpy
    sections = [int(v) for v in value] if is_int_array and len(value) in (3, 4) else None
    if (
        sections is None
        or any(s < 0 for s in sections)
        or any(sections[3:])
        or sum(sections[:3]) != head_dim // 2
    ):
        raise KawaiError(f"GGUF metadata key {name!r} must be [t, h, w, 0] pairs summing to {head_dim // 2}, got {value!r}")
    return tuple(sections[:3])


_MISSING = object()


def _get(meta: dict[str, Any], name: str, default: Any) -> Any:
    if name in meta:
        return meta[name]
    if default is _MISSING:
        raise KawaiError(f"GGUF metadata key {name!r} is missing")
    return default


def _int(meta: dict[str, Any], name: str, default: Any = _MISSING) -> int:
    value = _get(meta, name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIM:
        raise KawaiError(f"GGUF metadata key {name!r} must be an integer in 1..{MAX_DIM}, got {value!r}")
    return value


def _float(meta: dict[str, Any], name: str, default: Any = _MISSING, positive: bool = False) -> float:
    value = _get(meta, name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise KawaiError(f"GGUF metadata key {name!r} must be a number, got {value!r}")
    if positive and not 0 < value < float("inf"):
        raise KawaiError(f"GGUF metadata key {name!r} must be positive and finite, got {value!r}")
    return float(value)


def _string(meta: dict[str, Any], name: str, default: Any = _MISSING) -> str:
    value = _get(meta, name, default)
    if not isinstance(value, str):
        raise KawaiError(f"GGUF metadata key {name!r} must be a string, got {type(value).__name__}")
    return value
