"""The forward function of one prompt with images, for the generation loop (engine/generate.py).

`ImagePromptForward(...)` has the loop's `forward(ids, cache) -> logits (V,)` signature. During prefill
(cache slots inside the prompt) it encodes the images once, puts their embeddings on the pad tokens
and runs the chunk at its M-RoPE positions; after the prompt it decodes single tokens at position
`cache.length + rope_delta` on all three components (docs/vision.md, section 4).

The prompt's ids are already expanded (one `<|image_pad|>` per image token). A cache may be reused only
up to the first image pad: pads of different images have the same id (see `reusable_prefix`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from kawai.engine.config import ModelConfig
from kawai.engine.errors import KawaiError
from kawai.engine.kv_cache import KVCache
from kawai.engine.model import forward
from kawai.engine.vision.multimodal import encode_image, image_token_count
from kawai.engine.vision.mrope import mrope_positions
from kawai.engine.vision.projector import Projector
from kawai.engine.weights import Weights


def reusable_prefix(prompt: Sequence[int], image_pad: int) -> int:
    """Prompt tokens a cache may share with an earlier conversation: those before the first image."""
    for i, t in enumerate(prompt):
        if t == image_pad:
            return i
    return len(prompt)


class ImagePromptForward:
    """forward(ids, cache) for one image prompt; `vision_seconds` and `image_tokens` once prefilled."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Weights,
        projector: Projector,
        prompt: Sequence[int],
        images: Sequence[Image.Image],
        image_pad: int,
    ):
        if not cfg.rope_sections:
            raise KawaiError(f"a {cfg.arch} model does not take images (it has no multimodal RoPE)")
        self.cfg = cfg
        self.weights = weights
        self.projector = projector
        self.prompt = np.asarray([int(t) for t in prompt], dtype=np.int64)  # (n,)
        self.images = list(images)
        self.image_pad = image_pad
        counts = [image_token_count(projector, *im.size) for im in self.images]
        self.image_tokens = int((self.prompt == image_pad).sum())
        if sum(counts) != self.image_tokens:
            raise KawaiError(f"the prompt has {self.image_tokens} image tokens for {len(counts)} image(s) of {sum(counts)}")
        self.vision_seconds = 0.0
        self.stats = None  # engine.generate.GenerationStats to report vision_seconds to
        self._embeddings: np.ndarray | None = None  # (image_tokens, d_model), all images in order
        self._positions: np.ndarray | None = None  # (3, n)
        self.rope_delta = 0

    def _encode(self) -> None:
        merge = self.projector.config.merge_size
        encoded = [encode_image(self.projector, im) for im in self.images]
        self.vision_seconds = sum(e.seconds for e in encoded)
        if self.stats is not None:
            self.stats.vision_seconds = self.vision_seconds
        for e in encoded:
            if e.embeddings.shape[1] != self.cfg.d_model:
                raise KawaiError(
                    f"image embeddings have width {e.embeddings.shape[1]}, the model expects {self.cfg.d_model}: "
                    "the vision projector does not belong to this model"
                )
        self._embeddings = np.concatenate([e.embeddings for e in encoded]) if encoded else None
        self._positions, next_position = mrope_positions(self.prompt, self.image_pad, [e.grid for e in encoded], merge)
        self.rope_delta = next_position - len(self.prompt)

    def __call__(self, ids: Sequence[int], cache: KVCache) -> np.ndarray:
        ids = np.asarray([int(t) for t in ids], dtype=np.int64)
        start, n = cache.length, len(self.prompt)
        if start >= n:  # decoding after the prompt
            if self._positions is None:
                raise KawaiError("an image prompt must be prefilled before decoding")
            positions = np.arange(start, start + len(ids), dtype=np.int64) + self.rope_delta
            return forward(self.cfg, self.weights, ids, cache, positions=positions)[-1]
        if start + len(ids) > n or not np.array_equal(self.prompt[start : start + len(ids)], ids):
            raise KawaiError("prefill chunks must follow the image prompt in order")
        if self._positions is None:
            self._encode()
        embeddings = self.weights.token_embd.lookup(np.where(ids == self.image_pad, 0, ids))  # (T, d)
        is_image = ids == self.image_pad
        if is_image.any():
            first = int((self.prompt[:start] == self.image_pad).sum())  # image rows already fed
            embeddings[is_image] = self._embeddings[first : first + int(is_image.sum())]
        positions = self._positions[:, start : start + len(ids)]
        return forward(self.cfg, self.weights, None, cache, embeddings=embeddings, positions=positions)[-1]
