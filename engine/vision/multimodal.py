"""Prompts with images: one image -> its embeddings, placeholders -> image tokens, and the prefill that
puts the image embeddings where their tokens are, at M-RoPE positions.

    encode_image(projector, image) -> ImageEmbedding        preprocessing + encoder, timed
    expand_image_placeholders(ids, pad_id, counts) -> ids    <|image_pad|> x1 -> x N per image
    prefill(cfg, weights, ids, images, cache, ...) -> Prefill  logits + the rope delta for decoding
    vision_token_ids(tokens) -> VisionTokens                  <|vision_start|>, <|image_pad|>, <|vision_end|>
    find_projector(model_path) -> Path | None                 an mmproj file next to the model

A chat template renders each image as `<|vision_start|><|image_pad|><|vision_end|>`; the single pad
becomes one pad per merged patch before the prompt runs (transformers' processor and llama.cpp's mtmd
do the same). After the prompt, a decoded token at cache slot s has M-RoPE position s + rope_delta on
all three components: pass `positions=np.array([cache.length + rope_delta])` to `engine.model.forward`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kawai.engine.config import ModelConfig
from kawai.engine.errors import KawaiError
from kawai.engine.kv_cache import KVCache
from kawai.engine.model import forward
from kawai.engine.vision.encoder import encode
from kawai.engine.vision.mrope import mrope_positions
from kawai.engine.vision.preprocess import preprocess, smart_resize, to_patches
from kawai.engine.vision.projector import Projector
from kawai.engine.weights import Weights

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


@dataclass(frozen=True, eq=False)
class ImageEmbedding:
    """One image ready for the language model."""

    embeddings: np.ndarray  # (n_tokens, d_model) float32
    grid: tuple[int, int, int]  # (t, gh, gw) in patches
    seconds: float  # preprocessing + vision encoder, wall time

    @property
    def n_tokens(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass(frozen=True)
class VisionTokens:
    start: int  # <|vision_start|>
    end: int  # <|vision_end|>
    image_pad: int  # <|image_pad|>


@dataclass(frozen=True, eq=False)
class Prefill:
    logits: np.ndarray  # (n, V) with all_logits, else (1, V)
    rope_delta: int  # M-RoPE position of cache slot s is s + rope_delta from now on
    image_tokens: int  # prompt tokens that were image embeddings


def encode_image(projector: Projector, image: Image.Image) -> ImageEmbedding:
    """An RGB image (engine.vision.preprocess.decode_image) -> its LM embeddings, timed."""
    start = time.perf_counter()
    spec = projector.config.image
    pixels = preprocess(image, spec)
    embeddings = encode(projector, to_patches(pixels, spec), pixels.grid)
    return ImageEmbedding(embeddings, pixels.grid, time.perf_counter() - start)


def image_token_count(projector: Projector, width: int, height: int) -> int:
    """Image tokens an image of this size becomes (for usage accounting before encoding)."""
    spec = projector.config.image
    h, w = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
    return (h // spec.factor) * (w // spec.factor)


def vision_token_ids(tokens: Sequence[str]) -> VisionTokens:
    """The Qwen-VL special token ids from a GGUF vocabulary (`tokenizer.ggml.tokens`)."""
    index = {}
    for name in (VISION_START, VISION_END, IMAGE_PAD):
        try:
            index[name] = list(tokens).index(name)
        except ValueError:
            raise KawaiError(f"the model's vocabulary has no {name} token: it does not take images") from None
    return VisionTokens(index[VISION_START], index[VISION_END], index[IMAGE_PAD])


def expand_image_placeholders(ids: Sequence[int], image_pad: int, counts: Sequence[int]) -> list[int]:
    """Replace the i-th single image pad token of a rendered prompt by counts[i] pad tokens."""
    ids = [int(t) for t in ids]
    where = [i for i, t in enumerate(ids) if t == image_pad]
    if len(where) != len(counts):
        raise KawaiError(f"the prompt has {len(where)} image placeholder(s) for {len(counts)} image(s)")
    out: list[int] = []
    last = 0
    for i, count in zip(where, counts):
        if count < 1:
            raise KawaiError(f"an image must take at least one token, got {count}")
        out.extend(ids[last:i])
        out.extend([image_pad] * int(count))
        last = i + 1
    out.extend(ids[last:])
    return out


def prefill(
    cfg: ModelConfig,
    weights: Weights,
    ids: Sequence[int],
    images: Sequence[ImageEmbedding],
    cache: KVCache,
    *,
    image_pad: int,
    merge_size: int,
    start_position: int | None = None,
    all_logits: bool = False,
) -> Prefill:
    """Run a prompt whose image placeholders are already expanded, after the cache's contents.

    Text tokens are looked up; the pad tokens take the image embeddings in order. `start_position` is
    the M-RoPE position of the first new token (default cache.length: nothing before it had images).
    """
    if not cfg.rope_sections:
        raise KawaiError(f"a {cfg.arch} model does not take images (it has no multimodal RoPE)")
    tokens = np.asarray(ids, dtype=np.int64)
    if tokens.ndim != 1 or tokens.size == 0:
        raise KawaiError("the prompt is empty")
    if tokens.min() < 0 or tokens.max() >= cfg.n_vocab:
        raise KawaiError(f"token ids must be in 0..{cfg.n_vocab - 1}")
    for image in images:
        if image.embeddings.ndim != 2 or image.embeddings.shape[1] != cfg.d_model:
            raise KawaiError(
                f"image embeddings have width {image.embeddings.shape[-1]}, the model expects {cfg.d_model}: "
                "the vision projector does not belong to this model"
            )
    start = cache.length if start_position is None else int(start_position)
    positions, next_position = mrope_positions(tokens, image_pad, [im.grid for im in images], merge_size, start)

    embeddings = weights.token_embd.lookup(np.where(tokens == image_pad, 0, tokens))  # (n, d)
    is_image = tokens == image_pad
    if sum(im.n_tokens for im in images) != int(is_image.sum()):
        raise KawaiError(f"{int(is_image.sum())} image tokens in the prompt, {sum(im.n_tokens for im in images)} image embeddings")
    if images:
        embeddings[is_image] = np.concatenate([im.embeddings for im in images])
    logits = forward(cfg, weights, None, cache, all_logits=all_logits, embeddings=embeddings, positions=positions)
    return Prefill(logits, next_position - cache.length, int(is_image.sum()))


_QUANT_SUFFIX = re.compile(r"([-_.](i?q\d\w*|f16|f32|bf16|fp16|fp32))+$", re.IGNORECASE)


def find_projector(model_path: str | Path) -> Path | None:
    """The mmproj GGUF next to a model, found by name: `mmproj-Qwen2-VL-2B-Instruct-f16.gguf` (or
    `Qwen2-VL-2B-Instruct-mmproj-f16.gguf`) belongs to `Qwen2-VL-2B-Instruct-Q4_K_M.gguf`. Names are
    compared without case, separators, quantization suffix and the word "mmproj"; None if no single match.
    """
    model_path = Path(model_path)
    key = _name_key(model_path.name)
    matches = sorted(
        p
        for p in model_path.parent.glob("*.gguf")
        if p != model_path and "mmproj" in p.name.lower() and _name_key(p.name) == key
    )
    return matches[0] if len(matches) == 1 else None


def _name_key(filename: str) -> str:
    stem = filename[: -len(".gguf")] if filename.lower().endswith(".gguf") else filename
    stem = re.sub(r"mmproj", "", stem, flags=re.IGNORECASE).strip("-_. ")
    stem = _QUANT_SUFFIX.sub("", stem)
    return re.sub(r"[^0-9a-z]", "", stem.lower())
