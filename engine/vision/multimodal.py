"""Prompts with images: one image -> its embeddings, placeholders -> image tokens.

    encode_image(projector, image) -> ImageEmbedding        preprocessing + encoder, timed
    image_token_count(projector, width, height) -> int       image tokens of an image, before encoding
    expand_image_placeholders(ids, pad_id, counts) -> ids    <|image_pad|> x1 -> x N per image
    vision_token_ids(tokens) -> VisionTokens                  <|vision_start|>, <|image_pad|>, <|vision_end|>
    find_projector(model_path) -> Path | None                 an mmproj file next to the model

A chat template renders each image as `<|vision_start|><|image_pad|><|vision_end|>`; the single pad
becomes one pad per merged patch before the prompt runs (transformers' processor and llama.cpp's mtmd
do the same). How the image rows then reach the model, at their M-RoPE positions, is
engine/vision/image_prompt.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kawai.engine.errors import KawaiError
from kawai.engine.vision.encoder import encode
from kawai.engine.vision.preprocess import preprocess, smart_resize, to_patches
from kawai.engine.vision.projector import Projector

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
