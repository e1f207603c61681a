"""The supported architectures, one row each: what the engine needs to know about a GGUF family.

Every architecture runs the same transformer (engine/model.py: RMSNorm, attention with RoPE, SwiGLU);
a row says which variant of it a family is. `ModelConfig.from_gguf` (engine/config.py) looks the file's
`general.architecture` up here and copies the row's flags onto the config, which engine/model.py and
engine/weights.py read. Adding an architecture that fits the shared transformer is one row here
(docs/adding-a-model.md walks through it).

Conventions every row shares, from llama.cpp's converter (convert_hf_to_gguf.py, gguf-py's names):
- metadata keys are prefixed by the architecture name: `qwen2.block_count`, `llama.rope.freq_base`, ...
- tensors have the same names in every family: `token_embd`, `blk.{i}.attn_q`, `blk.{i}.ffn_gate`,
  `output_norm`, `output` (gguf-py maps each family's Hugging Face names onto these)
- three tensors are optional in every family, and their presence is a property of the file, not of the
  row: q/k/v biases (`blk.{i}.attn_q.bias`: Qwen2 has them), the output matrix (`output.weight`;
  without it the output is tied to `token_embd`), and Llama 3's `rope_freqs.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kawai.engine.errors import KawaiError

ROPE_STYLES = ("neox", "normal")

# The optional tensors (see above): their presence sets ModelConfig.qkv_bias and .tied_output.
QKV_BIAS_TENSOR = "blk.0.attn_q.bias"  # present: attn_q/k/v have biases in every block
OUTPUT_TENSOR = "output.weight"  # absent: the logits reuse token_embd (tied output)
ROPE_FREQS_TENSOR = "rope_freqs.weight"  # present: per-pair RoPE frequency divisors (Llama 3)


@dataclass(frozen=True)
class Architecture:
    name: str  # `general.architecture`; also the prefix of the family's metadata keys
    models: str  # the model families it covers (for people: docs, error messages)
    # RoPE pairing. "neox": dims (i, i + head_dim/2) rotate together (HF's rotate_half; Qwen).
    # "normal": adjacent dims (2i, 2i+1) rotate together. llama.cpp's converter permutes Llama's Q/K rows
    # (convert_hf_to_gguf.py `LlamaModel.permute`) so that GGUF Llama weights use the "normal" pairing.
    rope_style: str
    qk_norm: bool  # blk.{i}.attn_q_norm / attn_k_norm: per-head RMSNorm on q and k before RoPE (Qwen3)
    mrope: bool  # multimodal RoPE from `{name}.rope.dimension_sections`; images via a vision projector
    chat_format: str  # the chat format when template and vocabulary do not tell (engine/chat_format.py)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("qwen2", "Qwen2, Qwen2.5, Qwen2.5-Coder", "neox", qk_norm=False, mrope=False, chat_format="hermes"),
        Architecture("qwen3", "Qwen3", "neox", qk_norm=True, mrope=False, chat_format="hermes"),
        # Llama 2/3, SmolLM, Mistral 7B, TinyLlama...: llama.cpp converts them all to "llama". A Llama 3
        # template is recognised by its own markers; ChatML-speaking ones (SmolLM2) get hermes.
        Architecture("llama", "Llama, SmolLM, Mistral", "normal", qk_norm=False, mrope=False, chat_format="hermes"),
        Architecture("qwen2vl", "Qwen2-VL, Qwen2.5-VL", "neox", qk_norm=False, mrope=True, chat_format="hermes"),
    )
}


def architecture(name: str) -> Architecture:
    """The row of `general.architecture` name; a KawaiError listing the supported ones otherwise."""
    row = ARCHITECTURES.get(name)
    if row is None:
        raise KawaiError(f"model architecture {name!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return row
