"""Image + text prompts end to end: our logits against transformers' Qwen2VLForConditionalGeneration and
Qwen2_5_VLForConditionalGeneration on tiny random models, with the same GGUF files as input (a `qwen2vl`
language model and a `clip` mmproj, named as llama.cpp names them)."""

from __future__ import annotations

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from kawai.engine.config import ModelConfig
from kawai.engine.errors import KawaiError
from kawai.engine.gguf import open_gguf
from kawai.engine.kv_cache import KVCache
from kawai.engine.scheduler import CHUNK
from one_sequence import forward
from kawai.engine.vision.multimodal import (
    encode_image,
    expand_image_placeholders,
    find_projector,
    image_token_count,
    vision_token_ids,
)
from kawai.engine.vision.image_prompt import image_prompt
from kawai.engine.vision.preprocess import preprocess, to_patches
from kawai.engine.vision.projector import load_projector
from kawai.engine.weights import load_weights
from pictures import photo
from tiny_models import write_tiny_model
from vision_models import KINDS, hf_logits, tiny_hf_model, write_language_model, write_mmproj

IMAGES = [photo(100, 73, seed=1), photo(260, 150, seed=2)]  # 12 and 45 image tokens


class Tiny:
    """One tiny model: transformers' version and ours, loaded from the same GGUF files."""

    def __init__(self, kind: str, root):
        self.hf = tiny_hf_model(kind)
        self.lm_path = write_language_model(self.hf, root / f"{kind}.gguf")
        self.projector = load_projector(write_mmproj(self.hf, root / f"mmproj-{kind}-f16.gguf"), exact=True)
        gguf = open_gguf(self.lm_path)
        self.cfg = ModelConfig.from_gguf(gguf)
        self.weights = load_weights(gguf, self.cfg, exact=True)
        self.tokens = vision_token_ids(gguf.metadata["tokenizer.ggml.tokens"])

    def prompt(self, n_images: int, text=(6, 5, 4), seed: int = 0) -> list[int]:
        """A rendered chat prompt: text, then `<|vision_start|><|image_pad|><|vision_end|>` + text per image."""
        rng = np.random.default_rng(seed)
        ids = list(rng.integers(0, 256, text[0]))
        for i in range(n_images):
            ids += [self.tokens.start, self.tokens.image_pad, self.tokens.end] + list(rng.integers(0, 256, text[1 + i % 2]))
        return ids

    def reference(self, ids, images) -> np.ndarray:
        spec = self.projector.config.image
        pixels = [preprocess(im, spec) for im in images]
        patches = np.concatenate([to_patches(p, spec) for p in pixels]) if pixels else None
        return hf_logits(self.hf, np.asarray(ids), patches, [p.grid for p in pixels])

    def run(self, ids, images, cache=None, before=()):
        """The prompt (placeholders expanded) through the model, its images as embedding rows at M-RoPE
        positions (engine/vision/image_prompt.py). `before`: ids the cache already holds."""
        embedded = [encode_image(self.projector, im) for im in images]
        ids = expand_image_placeholders(ids, self.tokens.image_pad, [e.n_tokens for e in embedded])
        cache = cache or KVCache(self.cfg, CHUNK + 256, "f32")  # room for a prompt longer than a chunk
        whole = list(before) + ids
        image = image_prompt(self.cfg, whole, embedded, self.tokens.image_pad, 2)
        skip = len(before)
        rows = np.flatnonzero(image.is_image[skip:])
        logits = forward(self.cfg, self.weights, np.array(ids), cache, all_logits=True,
                         positions=image.positions[:, skip:], embeddings=image.embeddings, embedding_rows=rows)
        return ids, Prefilled(logits, image.rope_delta, int(rows.size)), cache


class Prefilled:
    def __init__(self, logits, rope_delta, image_tokens):
        self.logits, self.rope_delta, self.image_tokens = logits, rope_delta, image_tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {kind: Tiny(kind, root) for kind in KINDS}


def _close(ours, expected):
    # measured: max |diff| 3.1e-7..1.03e-6 of max(1, max |expected|) over every comparison in this file
    np.testing.assert_allclose(ours, expected, atol=2e-6 * max(1.0, np.abs(expected).max()), rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_images", [1, 2])
def test_image_prompt_logits_match_transformers(tiny, kind, n_images):
    model = tiny[kind]
    ids, out, _ = model.run(model.prompt(n_images), IMAGES[:n_images])
    expected = model.reference(ids, IMAGES[:n_images])
    assert out.logits.shape == expected.shape
    assert out.image_tokens == [12, 57][n_images - 1]
    _close(out.logits, expected)


@pytest.mark.parametrize("max_tokens", [None, 256, 64])
def test_image_token_count_matches_transformers_processor(tiny, max_tokens):
    """Token counts (for usage) equal the processor's; the default cap is 256 tokens per image."""
    path = tiny["qwen2vl"].projector.path
    projector = load_projector(path, max_image_tokens=max_tokens)
    limit = 28 * 28 * (1280 if max_tokens is None else max_tokens)  # transformers' default: 1280 tokens
    processor = Qwen2VLImageProcessorPil(max_pixels=limit)
    for image in IMAGES + [photo(1500, 900), photo(20, 30), photo(900, 1900)]:
        grid = processor(images=[image], return_tensors="np")["image_grid_thw"][0]
        n_hf = int(grid.prod()) // 4
        assert image_token_count(projector, image.width, image.height) == n_hf <= limit // 784
    assert encode_image(projector, IMAGES[0]).n_tokens == 12
    assert load_projector(path).config.image.max_pixels == 256 * 28 * 28


def test_image_across_a_chunk_boundary(tiny):
    """The prompt is longer than CHUNK and the image straddles the boundary: positions are sliced per chunk."""
    model = tiny["qwen25vl"]
    ids = model.prompt(1, text=(CHUNK - 20, 40, 0))
    expanded, out, _ = model.run(ids, IMAGES[1:])
    assert len(expanded) > CHUNK and expanded.index(model.tokens.image_pad) < CHUNK < len(expanded) - 40
    _close(out.logits, model.reference(expanded, IMAGES[1:]))


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_after_an_image_uses_the_rope_delta(tiny, kind):
    """Prefill without the last tokens, then decode them one by one at cache slot + rope_delta: the
    logits equal transformers' on the full prompt."""
    model = tiny[kind]
    ids = model.prompt(1)
    expanded, _, _ = model.run(ids, IMAGES[:1])
    expected = model.reference(expanded, IMAGES[:1])
    tail = 3
    _, head, cache = model.run(ids[:-tail], IMAGES[:1])
    assert head.rope_delta == 4 - 12  # a 3 x 4 merged grid advances positions by 4 for 12 tokens
    steps = []
    for token in expanded[-tail:]:
        position = np.array([cache.length + head.rope_delta])
        steps.append(forward(model.cfg, model.weights, np.array([token]), cache, positions=position))
    _close(np.concatenate(steps), expected[-tail:])


def test_text_only_prompt_on_a_vision_model(tiny):
    model = tiny["qwen2vl"]
    ids = model.prompt(0, text=(30, 0, 0))
    ours = forward(model.cfg, model.weights, np.array(ids), KVCache(model.cfg, 64, "f32"), all_logits=True)
    _close(ours, model.reference(ids, []))
    _, out, _ = model.run(ids, [])  # the multimodal prefill with no image is the same thing
    _close(out.logits, ours)
    assert out.rope_delta == 0


def test_prefill_after_cached_text_continues_positions(tiny):
    """A second turn with an image appended to a cache that already holds text."""
    model = tiny["qwen2vl"]
    first = model.prompt(0, text=(10, 0, 0), seed=3)
    second = model.prompt(1, seed=4)
    expanded, _, _ = model.run(first + second, IMAGES[:1])
    expected = model.reference(expanded, IMAGES[:1])
    cache = KVCache(model.cfg, 512, "f32")
    forward(model.cfg, model.weights, np.array(first), cache)
    _, out, _ = model.run(second, IMAGES[:1], cache=cache, before=first)
    _close(out.logits, expected[len(first):])


def test_expand_image_placeholders():
    assert expand_image_placeholders([1, 9, 2, 9, 3], 9, [2, 3]) == [1, 9, 9, 2, 9, 9, 9, 3]
    with pytest.raises(KawaiError, match="2 image placeholder"):
        expand_image_placeholders([1, 9, 2, 9], 9, [2])
    with pytest.raises(KawaiError, match="at least one"):
        expand_image_placeholders([9], 9, [0])


def test_image_prompt_errors(tiny, tmp_path):
    model = tiny["qwen2vl"]
    image = encode_image(model.projector, IMAGES[0])
    ids = expand_image_placeholders(model.prompt(1), model.tokens.image_pad, [12])
    pad = model.tokens.image_pad
    first_pad = ids.index(model.tokens.image_pad)
    with pytest.raises(KawaiError, match="placeholder"):  # one pad short
        image_prompt(model.cfg, ids[:first_pad] + ids[first_pad + 1 :], [image], pad, 2)
    with pytest.raises(KawaiError, match="2 image"):  # an image without a placeholder
        image_prompt(model.cfg, ids, [image, image], pad, 2)
    narrow = type(image)(image.embeddings[:, :32], image.grid, 0.0)
    with pytest.raises(KawaiError, match="does not belong to this model"):
        image_prompt(model.cfg, ids, [narrow], pad, 2)
    text_path = write_tiny_model(tmp_path, "qwen2")
    text_gguf = open_gguf(text_path)
    text_cfg = ModelConfig.from_gguf(text_gguf)
    with pytest.raises(KawaiError, match="does not take images"):
        image_prompt(text_cfg, [1, 2], [], pad, 2)
    with pytest.raises(KawaiError, match="no <\\|vision_start\\|>"):
        vision_token_ids(text_gguf.metadata["tokenizer.ggml.tokens"])


def test_forward_checks_embeddings_and_positions(tiny):
    model = tiny["qwen2vl"]
    cache = KVCache(model.cfg, 16, "f32")
    with pytest.raises(KawaiError, match="embeddings must have shape"):
        forward(model.cfg, model.weights, np.array([1, 2]), cache, embeddings=np.zeros((2, 5), np.float32),
                embedding_rows=np.array([0, 1]))
    with pytest.raises(KawaiError, match="NaN"):
        forward(model.cfg, model.weights, np.array([1, 2]), cache, embeddings=np.full((2, 64), np.nan, np.float32),
                embedding_rows=np.array([0, 1]))
    with pytest.raises(KawaiError, match="positions must be integers"):
        forward(model.cfg, model.weights, np.array([1, 2]), cache, positions=np.zeros((3, 3), np.int64))
    with pytest.raises(KawaiError, match="non-negative"):
        forward(model.cfg, model.weights, np.array([1, 2]), cache, positions=np.array([-1, 0]))
    assert cache.length == 0


@pytest.mark.parametrize(
    "model_name, projector_name, found",
    [
        ("Qwen2-VL-2B-Instruct-Q4_K_M.gguf", "mmproj-Qwen2-VL-2B-Instruct-f16.gguf", True),
        ("qwen2.5-vl-3b-instruct-q8_0.gguf", "qwen2.5-vl-3b-instruct-mmproj-f16.gguf", True),
        ("Qwen2.5-VL-7B-Instruct-IQ4_XS.gguf", "mmproj-Qwen2.5-VL-7B-Instruct-Q8_0.gguf", True),
        ("Qwen2-VL-2B-Instruct-Q4_K_M.gguf", "mmproj-Qwen2-VL-7B-Instruct-f16.gguf", False),
        ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "mmproj-Qwen2-VL-2B-Instruct-f16.gguf", False),
    ],
)
def test_find_projector_by_name(tmp_path, model_name, projector_name, found):
    (tmp_path / model_name).write_bytes(b"")
    (tmp_path / projector_name).write_bytes(b"")
    (tmp_path / "unrelated.gguf").write_bytes(b"")
    assert find_projector(tmp_path / model_name) == ((tmp_path / projector_name) if found else None)


def test_find_projector_needs_a_single_match(tmp_path):
    model = tmp_path / "Qwen2-VL-2B-Instruct-Q4_K_M.gguf"
    model.write_bytes(b"")
    (tmp_path / "mmproj-Qwen2-VL-2B-Instruct-f16.gguf").write_bytes(b"")
    (tmp_path / "mmproj-Qwen2-VL-2B-Instruct-q8_0.gguf").write_bytes(b"")
    assert find_projector(model) is None
