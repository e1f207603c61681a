"""Rotary positions for images: the vision encoder's 2-D RoPE and the language model's M-RoPE.

Both rotate NeoX-style pairs (j, j + hd/2) of each head, like `kernels.ops.rope`, but the angle of pair j
reads one of several position components:

- vision encoder (2-D RoPE): a patch has (row, col) in the patch grid; the first hd/4 pairs turn with the
  row, the last hd/4 with the column, both at frequencies theta^(-4k/hd), k < hd/4.
- language model (M-RoPE, Qwen2-VL): a token has (t, h, w); `rope.dimension_sections` = [s_t, s_h, s_w, 0]
  (pairs, s_t + s_h + s_w = hd/2) says pairs [0, s_t) use t, the next s_h use h, the last s_w use w, at the
  usual frequencies base^(-2j/hd). A text token has t = h = w, so for text M-RoPE is plain RoPE.

    vision_positions(gh, gw, merge) -> (2, n)            patch (row, col) in merge-block order
    vision_rope_tables(positions, head_dim, theta)        -> cos, sin (n, hd/2)
    mrope_positions(tokens, image_pad_id, grids, merge)   -> (3, n) positions, next position
    rope_multi(x, positions, inv_freq, sections)          M-RoPE in place, for the text forward pass
    apply_rope(x, cos, sin)                               rotate (n, H, hd) in place

Letters: n tokens or patches, H heads, hd head dimension, c position components (2 or 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kawai.engine.errors import KawaiError


def vision_positions(grid_h: int, grid_w: int, merge: int) -> np.ndarray:
    """(2, gh*gw) int64 (row, col) of every patch, listed merge-block by merge-block as the patches are."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")  # (gh, gw) each
    shape = (grid_h // merge, merge, grid_w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols]).astype(np.int64)


def vision_rope_tables(positions: np.ndarray, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n, hd/2) float32 of the encoder's 2-D RoPE for patch positions (2, n)."""
    quarter = head_dim // 4
    inv_freq = (1.0 / theta ** (np.arange(0, 2 * quarter, 2, dtype=np.float32) / (2 * quarter))).astype(np.float32)
    inv_freq = np.concatenate([inv_freq, inv_freq])  # (hd/2,): row frequencies, then column frequencies
    sections = (quarter, quarter)
    return rope_tables(positions, inv_freq, sections)


def rope_tables(positions: np.ndarray, inv_freq: np.ndarray, sections: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n, hd/2) float32 where pair j turns by positions[component(j)] * inv_freq[j].

    positions (c, n); inv_freq (hd/2,) float32; sections: pairs per component, summing to hd/2.
    Angles are float32 products, as in transformers.
    """
    positions = np.asarray(positions)
    inv_freq = np.asarray(inv_freq, np.float32)
    half = inv_freq.shape[0]
    sections = [int(s) for s in sections if s]
    if sum(sections) != half or len(sections) > positions.shape[0]:
        raise KawaiError(f"rope sections {list(sections)} do not cover {half} dimension pairs")
    component = np.repeat(np.arange(len(sections)), sections)  # (hd/2,) which position each pair reads
    pos = positions[component].astype(np.float32)  # (hd/2, n)
    angles = pos.T * inv_freq  # (n, hd/2) float32
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotate x (n, H, hd) in place, pairs (j, j + hd/2) by angles with cos, sin (n, hd/2)."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]  # (n, 1, hd/2): shared by all heads
    x1 = x[..., :half].copy()
    x2 = x[..., half:]
    x[..., :half] = x1 * c - x2 * s
    x[..., half:] = x2 * c + x1 * s


def rope_multi(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, sections: Sequence[int]) -> None:
    """M-RoPE in place: x (n, H, hd) query or key heads; positions (3, n) t/h/w; sections per component.

    The hook for the text forward pass (engine/model.py) when a prompt holds image tokens.
    """
    cos, sin = rope_tables(positions, inv_freq, sections)
    apply_rope(x, cos, sin)


def mrope_positions(
    tokens: Sequence[int] | np.ndarray,
    image_pad_id: int,
    grids: Sequence[tuple[int, int, int]],
    merge: int,
    start: int = 0,
) -> tuple[np.ndarray, int]:
    """M-RoPE positions (3, n) int64 of a prompt whose images are runs of `image_pad_id` tokens.

    Image i (in order) has patch grid grids[i] = (t, gh, gw) and fills t * (gh/merge) * (gw/merge)
    consecutive pad tokens. Text tokens count up from `start` on all three components; an image token
    at (frame, row, col) of its merged grid sits at (p + frame, p + row, p + col) where p is the next
    position, and the text after it resumes at p + max(gh/merge, gw/merge) (as transformers'
    `get_rope_index` and llama.cpp's mtmd do; still images have t = 1). Returns the positions and the
    next free position.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.shape[0]
    positions = np.empty((3, n), np.int64)
    pos, i, image = int(start), 0, 0
    while i < n:
        if tokens[i] != image_pad_id:
            positions[:, i] = pos
            pos += 1
            i += 1
            continue
        if image >= len(grids):
            raise KawaiError(f"the prompt holds more image placeholders than the {len(grids)} image(s) given")
        t, gh, gw = (int(v) for v in grids[image])
        lh, lw = gh // merge, gw // merge
        count = t * lh * lw
        run = tokens[i : i + count]
        if run.shape[0] != count or not np.all(run == image_pad_id) or (i + count < n and tokens[i + count] == image_pad_id):
            raise KawaiError(f"image {image} needs exactly {count} consecutive placeholder tokens")
        frame, row, col = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        positions[0, i : i + count] = pos + frame.reshape(-1)
        positions[1, i : i + count] = pos + row.reshape(-1)
        positions[2, i : i + count] = pos + col.reshape(-1)
        pos += max(lh, lw)
        i += count
        image += 1
    if image != len(grids):
        raise KawaiError(f"{len(grids)} image(s) given but the prompt has placeholders for {image}")
    return positions, pos
