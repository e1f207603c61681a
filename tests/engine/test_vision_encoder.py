"""The mmproj loader and the vision encoder against transformers' Qwen2-VL / Qwen2.5-VL vision towers,
on tiny random models written to GGUF with llama.cpp's names (tests/vision_models.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from transformers.vision_utils import get_vision_window_index

from kawai.engine.errors import KawaiError
from kawai.engine.gguf import open_gguf
from kawai.engine.vision.encoder import attention_windows, encode
from kawai.engine.vision.preprocess import ImageError, ImageSpec, preprocess, to_patches
from kawai.engine.vision.projector import ProjectorError, load_projector
from pictures import photo
from vision_models import KINDS, hf_image_features, tiny_hf_model, write_language_model, write_mmproj


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (transformers model, mmproj path)."""
    root = tmp_path_factory.mktemp("vision")
    out = {}
    for kind in KINDS:
        model = tiny_hf_model(kind)
        out[kind] = (model, write_mmproj(model, root / f"{kind}-mmproj-f16.gguf"))
    return out


def _patches(spec: ImageSpec, width: int, height: int, seed: int = 0):
    pixels = preprocess(photo(width, height, seed), spec)
    return to_patches(pixels, spec), pixels.grid


def test_projector_config(models):
    qwen2 = load_projector(models["qwen2vl"][1]).config
    assert (qwen2.projector, qwen2.norm, qwen2.act, qwen2.gated) == ("qwen2vl_merger", "layer", "quick_gelu", False)
    assert (qwen2.n_layers, qwen2.d_model, qwen2.n_heads, qwen2.d_out) == (2, 32, 2, 64)
    assert qwen2.d_ff == 64  # from the tensor: the metadata holds the LM width, as llama.cpp's converter writes
    assert qwen2.full_attention_layers == (0, 1) and not qwen2.windowed
    assert qwen2.image.patch_size == 14 and qwen2.image.merge_size == 2

    qwen25 = load_projector(models["qwen25vl"][1]).config
    assert (qwen25.projector, qwen25.norm, qwen25.act, qwen25.gated) == ("qwen2.5vl_merger", "rms", "silu", True)
    assert qwen25.full_attention_layers == (1, 3) and qwen25.windowed and qwen25.window_size == 112
    assert qwen25.d_ff == 48


# (width, height) in pixels: one merge block; one attention window; several windows with ragged edges.
IMAGE_SIZES = [(28, 28), (100, 73), (260, 150)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_encoder_matches_transformers(models, kind, size):
    model, path = models[kind]
    projector = load_projector(path, exact=True)
    spec = ImageSpec(min_pixels=28 * 28)
    patches, grid = _patches(spec, *size)
    expected = hf_image_features(model, patches, grid)
    ours = encode(projector, patches, grid)
    assert ours.shape == expected.shape == (grid[1] * grid[2] // 4, 64)
    # measured: max |diff| 5.9e-7..1.0e-6 of max |expected| over both kinds and the three sizes
    np.testing.assert_allclose(ours, expected, atol=2e-6 * np.abs(expected).max(), rtol=0)


def test_window_attention_matters(models):
    """Qwen2.5-VL's windowed layers change the result once the image spans several windows (so the
    comparison above checks the windows, not a full-attention look-alike)."""
    _, path = models["qwen25vl"]
    projector = load_projector(path, exact=True)
    patches, grid = _patches(ImageSpec(), 260, 150)
    windowed = encode(projector, patches, grid)
    cfg = replace(projector.config, full_attention_layers=tuple(range(projector.config.n_layers)))
    full = replace(projector, config=cfg)
    assert np.abs(encode(full, patches, grid) - windowed).max() > 1e-2


@pytest.mark.parametrize("grid", [(1, 8, 8), (1, 10, 18), (1, 16, 16), (1, 2, 34), (2, 10, 6)])
def test_attention_windows_match_transformers(models, grid):
    cfg = load_projector(models["qwen25vl"][1]).config
    window_index, cu = get_vision_window_index(torch.tensor([grid]), 2, 112, 14)
    windows = attention_windows(cfg, *grid)
    units = np.concatenate([w[::4] // 4 for w in windows])  # merge blocks in window order
    np.testing.assert_array_equal(units, window_index.numpy())
    np.testing.assert_array_equal(np.cumsum([0] + [len(w) for w in windows]), cu.numpy())
    for w in windows:  # each merge block's four patches stay together
        np.testing.assert_array_equal(w.reshape(-1, 4) - w.reshape(-1, 4)[:, :1], np.tile(np.arange(4), (len(w) // 4, 1)))


def test_quantized_projector_is_close(models, tmp_path):
    """Q8_0 matrices (llama.cpp's quantized mmproj files) go through the integer matmul kernels."""
    model, _ = models["qwen2vl"]
    f16 = load_projector(write_mmproj(model, tmp_path / "f16.gguf"), exact=True)
    q8 = load_projector(_requantize(write_mmproj(model, tmp_path / "src.gguf"), tmp_path / "q8.gguf"))
    assert q8.weights.layers[0].attn_q.fmt != "dense"
    patches, grid = _patches(ImageSpec(), 100, 73)
    expected = encode(f16, patches, grid)
    ours = encode(q8, patches, grid)
    rel = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    assert rel < 3e-2  # measured 0.0142 (int8 activations on Q8_0 weights vs F16 float products)


def _requantize(src, dst):
    """Copy an mmproj GGUF, storing every matrix whose rows hold whole Q8_0 blocks as Q8_0."""
    reader = open_gguf(src)
    writer = GGUFWriter(dst, "clip")
    _copy_metadata(reader, writer)
    for name, info in reader.tensors.items():
        data = np.asarray(reader.tensor_array(name), np.float32)
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            writer.add_tensor(name, quantize(data, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16) if data.ndim > 1 else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _copy_metadata(reader, writer, drop=(), replace=None):
    replace = replace or {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment") or key in drop:
            continue
        value = replace.get(key, field.value)
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, (int, np.integer)):
            writer.add_uint32(key, int(value))
        elif isinstance(value, (float, np.floating)):
            writer.add_float32(key, float(value))
        else:
            writer.add_array(key, [float(v) for v in value])
    for key, value in replace.items():
        if key not in reader.fields:
            writer.add_string(key, value) if isinstance(value, str) else writer.add_uint32(key, value)


def _rewrite(src, dst, *, drop=(), replace=None, drop_tensors=(), arch="clip"):
    reader = open_gguf(src)
    writer = GGUFWriter(dst, arch)
    _copy_metadata(reader, writer, drop, replace)
    for name in reader.tensors:
        if name not in drop_tensors:
            writer.add_tensor(name, np.asarray(reader.tensor_array(name)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(arch="llama"), "general.architecture is 'llama'"),
        (dict(replace={"clip.projector_type": "gemma3"}), "'gemma3' is not supported"),
        (dict(drop=("clip.has_vision_encoder",)), "has no vision encoder"),
        (dict(drop=("clip.vision.block_count",)), "clip.vision.block_count"),
        (dict(replace={"clip.vision.attention.head_count": 3}), "head size divisible by 4"),
        (dict(drop_tensors=("v.blk.1.attn_k.weight",)), "v.blk.1.attn_k.weight"),
        (dict(drop_tensors=("v.patch_embd.weight.1",)), "v.patch_embd.weight.1"),
        (dict(replace={"clip.vision.projection_dim": 48}), "mm.2.weight"),
    ],
    ids=["not-clip", "other-projector", "no-vision", "no-block-count", "bad-heads", "missing-tensor",
         "missing-patch-half", "wrong-projection-dim"],
)
def test_projector_errors_name_the_problem(models, tmp_path, change, message):
    bad = _rewrite(models["qwen2vl"][1], tmp_path / "bad.gguf", **change)
    with pytest.raises(ProjectorError, match=message):
        load_projector(bad)


def test_legacy_surgery_file_with_swapped_mlp_names(models, tmp_path):
    """llama.cpp's old qwen2_vl_surgery.py wrote fc1 as ffn_down and fc2 as ffn_up, feed_forward_length 0
    and a dummy position embedding; such files still load and give the same result."""
    model, path = models["qwen2vl"]
    reader = open_gguf(path)
    legacy = tmp_path / "qwen2-vl-2b-instruct-vision.gguf"
    writer = GGUFWriter(legacy, "clip")
    _copy_metadata(reader, writer, drop=("clip.vision.feed_forward_length",))
    writer.add_uint32("clip.vision.feed_forward_length", 0)
    writer.add_bool("clip.has_qwen2vl_merger", True)
    swap = {"ffn_up": "ffn_down", "ffn_down": "ffn_up"}
    for name in reader.tensors:
        parts = name.split(".")
        if len(parts) > 3 and parts[3] in swap:
            parts[3] = swap[parts[3]]
        writer.add_tensor(".".join(parts), np.asarray(reader.tensor_array(name)))
    writer.add_tensor("v.position_embd.weight", np.zeros((10, 10), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    patches, grid = _patches(ImageSpec(), 100, 73)
    old = load_projector(legacy, exact=True)
    assert old.config.d_ff == 64
    np.testing.assert_array_equal(encode(old, patches, grid), encode(load_projector(path, exact=True), patches, grid))


def test_qwen25_projector_needs_its_window_pattern(models, tmp_path):
    bad = _rewrite(models["qwen25vl"][1], tmp_path / "bad.gguf", drop=("clip.vision.n_wa_pattern",))
    with pytest.raises(ProjectorError, match="n_wa_pattern"):
        load_projector(bad)


def test_projector_rejects_non_gguf_and_language_models(models, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(10))
    with pytest.raises(ProjectorError, match="junk.gguf"):
        load_projector(junk)
    with pytest.raises(ProjectorError, match="cannot open"):
        load_projector(tmp_path / "missing.gguf")
    lm = write_language_model(models["qwen2vl"][0], tmp_path / "lm.gguf")
    with pytest.raises(ProjectorError, match="not a vision projector"):
        load_projector(lm)
    assert issubclass(ProjectorError, KawaiError)


def test_encode_checks_its_input(models):
    projector = load_projector(models["qwen2vl"][1])
    patches, grid = _patches(ImageSpec(), 100, 73)
    with pytest.raises(ImageError, match="merge blocks"):
        encode(projector, patches, (1, 3, 4))
    with pytest.raises(ImageError, match="patches must be float32"):
        encode(projector, patches[:-4], grid)
    with pytest.raises(ImageError, match="patches must be float32"):
        encode(projector, patches.astype(np.float64), grid)
