"""Tiny random Qwen2-VL / Qwen2.5-VL models built with transformers and written to GGUF the way llama.cpp's
convert_hf_to_gguf.py does (a `qwen2vl` language model file and a `clip` mmproj file), so the engine can
be checked against transformers on the very same weights.

    model = tiny_hf_model("qwen2vl")                  # Qwen2VLForConditionalGeneration, float32, eval
    write_language_model(model, path)                 # general.architecture = "qwen2vl"
    write_mmproj(model, path)                         # general.architecture = "clip"

Weights are random with unit-scale activations and rounded to float16, so F16 tensors in the GGUF hold
exactly the values transformers uses. Uses `gguf` and `transformers` (test-only dependencies).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter, TokenType

from tiny_models import BOS_ID, EOS_ID, tiny_vocab

# Qwen-VL's special tokens, appended after the tiny vocabulary (ids are read back with vision_token_ids).
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

KINDS = ("qwen2vl", "qwen25vl")


def vision_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens, types, merges = tiny_vocab()
    return tokens + VISION_TOKENS, types + [int(TokenType.CONTROL)] * len(VISION_TOKENS), merges


def vision_token_ids() -> dict[str, int]:
    tokens = vision_vocab()[0]
    return {t: tokens.index(t) for t in VISION_TOKENS}


def tiny_hf_model(kind: str = "qwen2vl", seed: int = 0, **vision_overrides):
    """A small random Qwen2-VL ("qwen2vl") or Qwen2.5-VL ("qwen25vl") model in float32 eval mode."""
    ids = vision_token_ids()
    text = dict(
        vocab_size=len(vision_vocab()[0]),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if kind == "qwen2vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2) | vision_overrides
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        model_class = Qwen2VLForConditionalGeneration
    elif kind == "qwen25vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1, 3], hidden_act="silu") | vision_overrides
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        model_class = Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"unknown kind {kind!r}")
    config.text_config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _randomize(model, seed)
    return model


def _randomize(model, seed: int) -> None:
    """Unit-scale random weights, rounded to float16 values (so F16 GGUF tensors are exact)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if "norm" in name or "ln_q" in name:
                value = (1.0 + 0.1 * rng.standard_normal(shape)) if name.endswith("weight") else 0.1 * rng.standard_normal(shape)
            elif name.endswith("bias"):
                value = 0.2 * rng.standard_normal(shape)
            elif "embed_tokens" in name:
                value = 0.5 * rng.standard_normal(shape)
            else:  # matrices and the Conv3d: unit-variance outputs
                fan_in = int(np.prod(shape[1:]))
                value = rng.standard_normal(shape) / np.sqrt(fan_in)
            p.copy_(torch.from_numpy(value.astype(np.float16).astype(np.float32)))


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def write_language_model(model, path: str | Path, qtype: str = "f32") -> Path:
    """The language model as llama.cpp's `Qwen2VLModel` converter writes it (arch "qwen2vl")."""
    path = Path(path)
    cfg = model.config.text_config
    sd = _state(model)
    tokens, types, merges = vision_vocab()
    sections = list(cfg.rope_parameters["mrope_section"]) + [0]

    writer = GGUFWriter(path, "qwen2vl")
    writer.add_name(path.stem)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_sections(sections)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)

    def matrix(name: str, w: np.ndarray) -> None:
        if qtype == "f16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, w.astype(np.float32))

    lm = "model.language_model"
    matrix("token_embd.weight", sd[f"{lm}.embed_tokens.weight"])
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        src, dst = f"{lm}.layers.{i}", f"blk.{i}"
        writer.add_tensor(f"{dst}.attn_norm.weight", sd[f"{src}.input_layernorm.weight"])
        writer.add_tensor(f"{dst}.ffn_norm.weight", sd[f"{src}.post_attention_layernorm.weight"])
        for hf, gg in names.items():
            matrix(f"{dst}.{gg}.weight", sd[f"{src}.{hf}.weight"])
            if f"{src}.{hf}.bias" in sd:
                writer.add_tensor(f"{dst}.{gg}.bias", sd[f"{src}.{hf}.bias"])
    writer.add_tensor("output_norm.weight", sd[f"{lm}.norm.weight"])
    matrix("output.weight", sd["lm_head.weight"])
    _finish(writer)
    return path


def write_tiny_vl(root: Path) -> tuple[Path, Path]:
    """A tiny Qwen2-VL GGUF and its projector next to it, under the names `kawai pull` gives them (so
    engine.load finds the projector): (model path, projector path)."""
    hf = tiny_hf_model("qwen2vl")
    return write_language_model(hf, root / "tiny-vl-f32.gguf"), write_mmproj(hf, root / "tiny-vl.mmproj.gguf")


def write_mmproj(model, path: str | Path) -> Path:
    """The vision tower as llama.cpp's `Qwen2VLVisionModel` converter writes it: arch "clip", Q/K/V split
    out of qkv, the Conv3d split into two Conv2d halves, 2-D tensors F16, 1-D tensors F32."""
    path = Path(path)
    vc = model.config.vision_config
    qwen25 = model.config.model_type == "qwen2_5_vl"
    sd = {k.removeprefix("model."): v for k, v in _state(model).items() if k.startswith("model.visual.")}
    width = vc.hidden_size if qwen25 else vc.embed_dim

    writer = GGUFWriter(path, "clip")
    writer.add_type("mmproj")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("qwen2.5vl_merger" if qwen25 else "qwen2vl_merger")
    writer.add_vision_projection_dim(model.config.text_config.hidden_size)
    writer.add_vision_image_size(560)
    writer.add_vision_patch_size(vc.patch_size)
    writer.add_vision_embedding_length(width)
    # As the converter does: Qwen2-VL's "hidden_size" (the LM width) lands in feed_forward_length.
    writer.add_vision_feed_forward_length(vc.intermediate_size if qwen25 else vc.hidden_size)
    writer.add_vision_block_count(vc.depth)
    writer.add_vision_head_count(vc.num_heads)
    writer.add_vision_image_mean([0.48145466, 0.4578275, 0.40821073])
    writer.add_vision_image_std([0.26862954, 0.26130258, 0.27577711])
    writer.add_vision_attention_layernorm_eps(1e-6)
    if qwen25:
        writer.add_vision_use_silu(True)
        full = list(vc.fullatt_block_indexes)
        writer.add_vision_n_wa_pattern(full[0] + 1)

    def add(name: str, w: np.ndarray) -> None:
        writer.add_tensor(name, w.astype(np.float16) if w.ndim > 1 else w.astype(np.float32))

    conv = sd["visual.patch_embed.proj.weight"]  # (D, 3, 2, P, P)
    add("v.patch_embd.weight", np.ascontiguousarray(conv[:, :, 0]))
    add("v.patch_embd.weight.1", np.ascontiguousarray(conv[:, :, 1]))
    mlp = {"fc1": "ffn_up", "fc2": "ffn_down", "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i in range(vc.depth):
        src, dst = f"visual.blocks.{i}", f"v.blk.{i}"
        for part in ("weight", "bias"):
            qkv = sd[f"{src}.attn.qkv.{part}"]
            for j, letter in enumerate("qkv"):
                add(f"{dst}.attn_{letter}.{part}", qkv[j * width : (j + 1) * width])
            add(f"{dst}.attn_out.{part}", sd[f"{src}.attn.proj.{part}"])
            for hf, gg in (("norm1", "ln1"), ("norm2", "ln2")):
                if f"{src}.{hf}.{part}" in sd:
                    add(f"{dst}.{gg}.{part}", sd[f"{src}.{hf}.{part}"])
            for hf, gg in mlp.items():
                if f"{src}.mlp.{hf}.{part}" in sd:
                    add(f"{dst}.{gg}.{part}", sd[f"{src}.mlp.{hf}.{part}"])
    for part in ("weight", "bias"):
        if f"visual.merger.ln_q.{part}" in sd:
            add(f"v.post_ln.{part}", sd[f"visual.merger.ln_q.{part}"])
        add(f"mm.0.{part}", sd[f"visual.merger.mlp.0.{part}"])
        add(f"mm.2.{part}", sd[f"visual.merger.mlp.2.{part}"])
    _finish(writer)
    return path


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_image_features(model, patches: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """transformers' vision tower + merger output (n_tokens, d_out) for one image."""
    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(patches), torch.tensor([grid]))
    return torch.cat(out.pooler_output).numpy()


def hf_logits(model, ids: np.ndarray, patches: np.ndarray | None, grids: list[tuple[int, int, int]]) -> np.ndarray:
    """transformers' logits (n, V) for a prompt with image placeholders already expanded."""
    input_ids = torch.from_numpy(np.asarray(ids, np.int64))[None]
    kwargs = {}
    if patches is not None:
        kwargs = dict(
            pixel_values=torch.from_numpy(patches),
            image_grid_thw=torch.tensor(grids),
            mm_token_type_ids=(input_ids == model.config.image_token_id).int(),
        )
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits[0].numpy()
