"""Rotary positions for images: M-RoPE position ids and the vision encoder's 2-D positions against
transformers, M-RoPE reducing to plain RoPE for text, and the `qwen2vl` config's rope sections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_position_ids

from kawai.engine.config import ModelConfig
from kawai.engine.errors import KawaiError
from kawai.engine.gguf import open_gguf
from kawai.engine.vision.mrope import mrope_positions, rope_multi, rope_tables, vision_positions, vision_rope_tables
from kawai.kernels import ops
from vision_models import tiny_hf_model, vision_token_ids, write_language_model

PAD = vision_token_ids()["<|image_pad|>"]
START = vision_token_ids()["<|vision_start|>"]
END = vision_token_ids()["<|vision_end|>"]


def _prompt(grids, merge=2, text=(5, 3, 4)):
    """text, [start pads end, text] per image, with pads per merged patch."""
    rng = np.random.default_rng(0)
    ids = list(rng.integers(0, 256, text[0]))
    for i, (t, h, w) in enumerate(grids):
        ids += [START] + [PAD] * (t * (h // merge) * (w // merge)) + [END]
        ids += list(rng.integers(0, 256, text[1 + i % 2]))
    return np.array(ids, np.int64)


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model("qwen2vl")


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 10, 4), (1, 2, 2)], [(1, 6, 6), (1, 4, 12), (1, 2, 8)]])
def test_mrope_positions_match_transformers(hf_model, grids):
    ids = _prompt(grids)
    input_ids = torch.from_numpy(ids)[None]
    expected, delta = hf_model.model.get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == PAD).int(), image_grid_thw=torch.tensor(grids)
    )
    positions, next_position = mrope_positions(ids, PAD, grids, merge=2)
    np.testing.assert_array_equal(positions, expected[:, 0].numpy())
    assert next_position - len(ids) == int(delta)


def test_mrope_positions_start_offset_and_text_only():
    ids = _prompt([(1, 4, 4)])
    base, next_base = mrope_positions(ids, PAD, [(1, 4, 4)], merge=2)
    shifted, next_shifted = mrope_positions(ids, PAD, [(1, 4, 4)], merge=2, start=100)
    np.testing.assert_array_equal(shifted, base + 100)
    assert next_shifted == next_base + 100
    text, next_text = mrope_positions(np.arange(7), PAD, [], merge=2, start=3)
    np.testing.assert_array_equal(text, np.tile(np.arange(3, 10), (3, 1)))
    assert next_text == 10


def test_mrope_positions_check_the_placeholders():
    ids = _prompt([(1, 4, 4)])  # 4 pads
    with pytest.raises(KawaiError, match="exactly 4"):
        mrope_positions(np.concatenate([ids[:8], ids[9:]]), PAD, [(1, 4, 4)], merge=2)  # one pad short
    with pytest.raises(KawaiError, match="exactly 4"):
        mrope_positions(np.insert(ids, 7, PAD), PAD, [(1, 4, 4)], merge=2)  # one pad too many
    with pytest.raises(KawaiError, match="more image placeholders"):
        mrope_positions(ids, PAD, [], merge=2)
    with pytest.raises(KawaiError, match="2 image"):
        mrope_positions(ids, PAD, [(1, 4, 4), (1, 2, 2)], merge=2)


@pytest.mark.parametrize("grid", [(1, 4, 6), (1, 10, 18), (2, 4, 4)])
def test_vision_positions_match_transformers(grid):
    t, h, w = grid
    expected = get_vision_position_ids(torch.tensor([grid]), 2).numpy().T  # (2, n)
    np.testing.assert_array_equal(np.tile(vision_positions(h, w, 2), t), expected)


def test_vision_rope_tables_match_transformers():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding

    config = Qwen2VLVisionConfig(embed_dim=80 * 4, num_heads=4)  # head_dim 80, as in the real encoder
    positions = vision_positions(6, 8, 2)
    cos_ref, sin_ref = Qwen2VLVisionRotaryEmbedding(config)(torch.zeros(1), torch.from_numpy(positions.T))
    cos, sin = vision_rope_tables(positions, 80)
    np.testing.assert_allclose(cos, cos_ref[:, :40].numpy(), atol=1e-6)  # transformers repeats the halves
    np.testing.assert_allclose(sin, sin_ref[:, :40].numpy(), atol=1e-6)


def test_mrope_of_text_is_plain_rope():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 4, 16)).astype(np.float32)
    positions = np.arange(20, 29)
    inv_freq = (1e6 ** -(np.arange(0, 16, 2) / 16)).astype(np.float32)
    expected = x.copy()
    ops.rope(expected, positions, inv_freq, True)
    ours = x.copy()
    rope_multi(ours, np.tile(positions, (3, 1)), inv_freq, (2, 3, 3))
    np.testing.assert_allclose(ours, expected, atol=2e-6)


def test_mrope_sections_pick_the_component():
    """Pairs [0, 2) follow t, [2, 5) follow h, [5, 8) follow w."""
    positions = np.array([[3], [5], [7]])
    cos, _ = rope_tables(positions, np.ones(8, np.float32), (2, 3, 3))
    np.testing.assert_allclose(cos[0], np.cos([3, 3, 5, 5, 5, 7, 7, 7]), atol=1e-6)
    with pytest.raises(KawaiError, match="do not cover"):
        rope_tables(positions, np.ones(8, np.float32), (2, 3, 2))


def test_qwen2vl_config_reads_rope_sections(tmp_path):
    path = write_language_model(tiny_hf_model("qwen2vl"), tmp_path / "lm.gguf")
    cfg = ModelConfig.from_gguf(open_gguf(path))
    assert cfg.arch == "qwen2vl" and cfg.rope_sections == (2, 3, 3) and cfg.rope_style == "neox"
    assert cfg.qkv_bias and not cfg.tied_output


@pytest.mark.parametrize(
    "sections",
    [None, np.array([2, 3, 2, 0], np.int32), np.array([2, 3, 3, 1], np.int32), np.array([2.0, 3, 3, 0], np.float32),
     np.array([8], np.int32), "2,3,3"],
    ids=["missing", "short-sum", "fourth-section", "floats", "one-entry", "string"],
)
def test_qwen2vl_config_rejects_bad_rope_sections(tmp_path, sections):
    gguf = open_gguf(write_language_model(tiny_hf_model("qwen2vl"), tmp_path / "lm.gguf"))
    key = "qwen2vl.rope.dimension_sections"
    if sections is None:
        del gguf.metadata[key]
    else:
        gguf.metadata[key] = sections
    with pytest.raises(KawaiError, match="dimension_sections"):
        ModelConfig.from_gguf(gguf)
