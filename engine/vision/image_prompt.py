"""The rows of a prompt with images, as the scheduler (engine/scheduler.py) feeds them to the model.

    image = encode_image_prompt(cfg, projector, prompt.ids, prompt.images, image_pad)  # encoder, timed
    image = image_prompt(cfg, ids, encoded_images, image_pad, merge_size)             # already encoded
    image.chunk(ids, lo, hi)       # prompt rows lo..hi-1: image rows as embeddings, M-RoPE positions
    image.decode_chunk(ids, s)     # generated tokens at cache slots s..: position s + rope_delta

The prompt's ids are already expanded (one `<|image_pad|>` per image token). Its image rows take the
images' embeddings in order; every row of the prompt sits at its M-RoPE (t, h, w) position. After the
prompt, the token at cache slot s has position s + rope_delta on all three components (docs/vision.md,
section 4).

Letters: P prompt rows, m image rows, d d_model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kawai.engine.config import ModelConfig
from kawai.engine.errors import KawaiError
from kawai.engine.model import Chunk
from kawai.engine.vision.multimodal import ImageEmbedding, encode_image, image_token_count
from kawai.engine.vision.mrope import mrope_positions
from kawai.engine.vision.projector import Projector


@dataclass(frozen=True, eq=False)
class ImagePrompt:
    """One prompt's encoded images and positions."""

    embeddings: np.ndarray  # (m, d) float32 image rows, all images in prompt order
    is_image: np.ndarray  # (P,) bool: the prompt's image rows
    positions: np.ndarray  # (3, P) int64 M-RoPE t/h/w positions of the prompt rows
    rope_delta: int  # M-RoPE position of cache slot s after the prompt: s + rope_delta
    seconds: float  # preprocessing + vision encoder, wall time

    def chunk(self, ids: Sequence[int], lo: int, hi: int) -> Chunk:
        """Prompt rows lo..hi-1 (ids: those rows' ids)."""
        rows = np.flatnonzero(self.is_image[lo:hi])  # (k,) image rows of the chunk
        first = int(self.is_image[:lo].sum())  # image rows fed before it
        embeddings = self.embeddings[first : first + rows.size] if rows.size else None
        return Chunk(np.asarray(ids, dtype=np.int64), self.positions[:, lo:hi], embeddings,
                     rows if rows.size else None)

    def decode_chunk(self, ids: Sequence[int], start: int) -> Chunk:
        """Tokens after the prompt, at cache slots start.. ."""
        positions = np.arange(start, start + len(ids), dtype=np.int64) + self.rope_delta  # (n,)
        return Chunk(np.asarray(ids, dtype=np.int64), positions, prompt=False)


def check_image_prompt(projector: Projector, ids: Sequence[int], images: Sequence[Image.Image], image_pad: int) -> int:
    """The prompt's image rows, once checked against its images' sizes (before anything is encoded)."""
    return _check_rows(ids, image_pad, [image_token_count(projector, *im.size) for im in images])


def _check_rows(ids: Sequence[int], image_pad: int, counts: Sequence[int]) -> int:
    n_rows = sum(1 for t in ids if t == image_pad)
    if sum(counts) != n_rows:
        raise KawaiError(f"the prompt has {n_rows} image placeholder tokens for {len(counts)} image(s) of "
                         f"{sum(counts)} tokens")
    return n_rows


def encode_image_prompt(
    cfg: ModelConfig, projector: Projector, ids: Sequence[int], images: Sequence[Image.Image], image_pad: int
) -> ImagePrompt:
    """Encode the images of a prompt (ids with expanded image pads, checked first) and place its rows."""
    if not cfg.rope_sections:
        raise KawaiError(f"a {cfg.arch} model does not take images (it has no multimodal RoPE)")
    check_image_prompt(projector, ids, images, image_pad)
    encoded = [encode_image(projector, im) for im in images]
    return image_prompt(cfg, ids, encoded, image_pad, projector.config.merge_size)


def image_prompt(
    cfg: ModelConfig, ids: Sequence[int], encoded: Sequence[ImageEmbedding], image_pad: int, merge_size: int
) -> ImagePrompt:
    """A prompt's rows from its encoded images: the image rows' embeddings and every row's position."""
    if not cfg.rope_sections:
        raise KawaiError(f"a {cfg.arch} model does not take images (it has no multimodal RoPE)")
    _check_rows(ids, image_pad, [e.n_tokens for e in encoded])
    for e in encoded:
        if e.embeddings.ndim != 2 or e.embeddings.shape[1] != cfg.d_model:
            raise KawaiError(
                f"image embeddings have width {e.embeddings.shape[-1]}, the model expects {cfg.d_model}: "
                "the vision projector does not belong to this model"
            )
    tokens = np.asarray(ids, dtype=np.int64)  # (P,)
    positions, next_position = mrope_positions(tokens, image_pad, [e.grid for e in encoded], merge_size)
    d = cfg.d_model
    embeddings = np.concatenate([e.embeddings for e in encoded]).astype(np.float32) if encoded else np.zeros((0, d), np.float32)
    return ImagePrompt(embeddings, tokens == image_pad, positions, next_position - len(tokens),
                       sum(e.seconds for e in encoded))
