"""The Qwen2-VL / Qwen2.5-VL vision transformer: patches in, language-model embeddings out.

    patch embedding (Conv3d over (3, T, P, P) patches, as one matmul)
    -> n_layers x [ norm -> attention (QKV + bias, 2-D RoPE, full or windowed) -> residual
                    norm -> MLP (QuickGELU fc1/fc2, or SiLU-gated) -> residual ]
    -> norm (the merger's ln_q) -> concatenate each merge block of M*M patches
    -> mm.0 -> GELU -> mm.2 -> one embedding per merged patch

Qwen2-VL uses LayerNorm and attends over the whole image in every layer. Qwen2.5-VL uses RMSNorm and
attends inside windows of `window_size` pixels except in its full-attention layers. transformers
reorders the patches window by window and back; attention does not depend on the order of its keys,
so here the patches keep the processor's order and each window is an index set.

An image is hundreds to thousands of patches, so every matmul here is a large GEMM: float weights
(the usual F16 mmproj files) go to NumPy's BLAS sgemm, about 4x faster than kernels/matmul.py's dense
loop on this machine; quantized weights use kernels/matmul.py's integer kernels.

Letters: n patches, D encoder width, H heads, hd head dim, F MLP width, M merge size, d_out LM width.
"""

from __future__ import annotations

import numpy as np

from kawai.engine.vision import encoder_ops as vops
from kawai.engine.vision.mrope import apply_rope, vision_positions, vision_rope_tables
from kawai.engine.vision.preprocess import ImageError
from kawai.engine.vision.projector import Projector, VisionConfig, VisionLayer
from kawai.kernels import ops
from kawai.kernels.matmul import PackedMatrix, matmul, matmul_fused


def encode(projector: Projector, patches: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Patches (n, 3*T*P*P) of one image with patch grid (t, gh, gw) -> embeddings (n / M^2, d_out)."""
    cfg, w = projector.config, projector.weights
    n = _check_patches(cfg, patches, grid, w.patch_embd.cols)
    t, gh, gw = grid

    x = linear(w.patch_embd, patches)  # (n, D) the residual stream
    positions = np.tile(vision_positions(gh, gw, cfg.merge_size), t)  # (2, n) patch row, col
    cos, sin = vision_rope_tables(positions, cfg.head_dim, cfg.rope_theta)  # (n, hd/2) each
    everything = [np.arange(n)]
    windows = attention_windows(cfg, t, gh, gw) if cfg.windowed else everything
    for i, layer in enumerate(w.layers):
        groups = everything if i in cfg.full_attention_layers else windows
        h = norm(cfg, x, layer.ln1_w, layer.ln1_b)
        x += attention(cfg, layer, h, cos, sin, groups)
        h = norm(cfg, x, layer.ln2_w, layer.ln2_b)
        x += mlp(cfg, layer, h)
    h = norm(cfg, x, w.post_ln_w, w.post_ln_b)
    return merge(cfg, projector, h)


def norm(cfg: VisionConfig, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL) of x (n, D) into a new array."""
    if cfg.norm == "layer":
        return vops.layer_norm(x, weight, bias, cfg.eps)
    out = np.empty_like(x)
    ops.rms_norm(x, weight, cfg.eps, out)
    return out


def attention(
    cfg: VisionConfig,
    layer: VisionLayer,
    h: np.ndarray,
    cos: np.ndarray,
    sin: np.ndarray,
    groups: list[np.ndarray],
) -> np.ndarray:
    """Bidirectional self-attention, each patch seeing the patches of its group. h (n, D) -> (n, D)."""
    n = h.shape[0]
    q, k, v = linear_fused([layer.attn_q, layer.attn_k, layer.attn_v], h)  # (n, D) x3
    q += layer.attn_q_b
    k += layer.attn_k_b
    v += layer.attn_v_b
    shape = (n, cfg.n_heads, cfg.head_dim)
    q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)  # (n, H, hd)
    apply_rope(q, cos, sin)
    apply_rope(k, cos, sin)
    scale = cfg.head_dim**-0.5
    out = np.empty_like(q)  # (n, H, hd)
    if len(groups) == 1:
        vops.attention(q, k, v, scale, out)
    else:
        for idx in groups:
            part = np.empty((idx.shape[0], cfg.n_heads, cfg.head_dim), np.float32)
            vops.attention(q[idx], k[idx], v[idx], scale, part)
            out[idx] = part
    y = linear(layer.attn_out, out.reshape(n, cfg.d_model))
    y += layer.attn_out_b
    return y


def mlp(cfg: VisionConfig, layer: VisionLayer, h: np.ndarray) -> np.ndarray:
    """fc2(act(fc1(h))) (Qwen2-VL) or down(silu(gate(h)) * up(h)) (Qwen2.5-VL), with biases. (n, D) -> (n, D)."""
    if cfg.gated:
        gate, up = linear_fused([layer.ffn_gate, layer.ffn_up], h)  # (n, F) x2
        gate += layer.ffn_gate_b
        up += layer.ffn_up_b
        if cfg.act != "silu":
            raise ImageError(f"gated vision MLP with {cfg.act} is not supported")
        ops.silu_mul(gate, up, gate)
        hidden = gate
    else:
        hidden = linear(layer.ffn_up, h)  # (n, F)
        hidden += layer.ffn_up_b
        _activate(cfg.act, hidden)
    y = linear(layer.ffn_down, hidden)
    y += layer.ffn_down_b
    return y


def merge(cfg: VisionConfig, projector: Projector, h: np.ndarray) -> np.ndarray:
    """The patch merger's MLP over each merge block: h (n, D) normalized -> (n / M^2, d_out)."""
    w = projector.weights
    blocks = h.reshape(-1, cfg.merge_units * cfg.d_model)  # (n/M^2, M^2 * D): a block's patches are adjacent
    hidden = linear(w.mm0, blocks)
    hidden += w.mm0_b
    vops.gelu(hidden)
    out = linear(w.mm2, hidden)
    out += w.mm2_b
    return out


def linear(w: PackedMatrix, x: np.ndarray) -> np.ndarray:
    """y (n, R) = x (n, C) @ W.T in float32: BLAS for float weights, the integer kernels otherwise."""
    if w.fmt == "dense":
        return np.matmul(np.ascontiguousarray(x, dtype=np.float32), w.weights.T)
    return matmul(w, x)


def linear_fused(ws: list[PackedMatrix], x: np.ndarray) -> list[np.ndarray]:
    """[x @ W.T for W in ws] sharing one activation quantization when the weights are quantized."""
    if all(w.fmt == "dense" for w in ws):
        return [linear(w, x) for w in ws]
    return matmul_fused(ws, x)


def attention_windows(cfg: VisionConfig, t: int, gh: int, gw: int) -> list[np.ndarray]:
    """Patch index sets of Qwen2.5-VL's attention windows, in the processor's patch order.

    A window is a square of `window_size // merge // patch` merged patches per side, tiled from the
    top-left corner of each frame (the last row and column of windows may be smaller).
    """
    side = max(1, cfg.window_size // cfg.merge_size // cfg.patch_size)  # merged patches per window side
    lh, lw = gh // cfg.merge_size, gw // cfg.merge_size
    units = np.arange(t * lh * lw).reshape(t, lh, lw)  # merged-patch (merge block) index
    inner = np.arange(cfg.merge_units)
    windows = []
    for frame in range(t):
        for y in range(0, lh, side):
            for x in range(0, lw, side):
                block = units[frame, y : y + side, x : x + side].reshape(-1)
                windows.append((block[:, None] * cfg.merge_units + inner).reshape(-1))
    return windows


def _activate(act: str, x: np.ndarray) -> None:
    if act == "quick_gelu":
        vops.quick_gelu(x)
    elif act == "gelu":
        vops.gelu(x)
    elif act == "silu":
        x *= np.float32(1.0) / (np.float32(1.0) + np.exp(-x))
    else:
        raise ImageError(f"vision MLP activation {act!r} is not supported")


def _check_patches(cfg: VisionConfig, patches: np.ndarray, grid: tuple[int, int, int], cols: int) -> int:
    t, gh, gw = (int(v) for v in grid)
    m = cfg.merge_size
    if min(t, gh, gw) < 1 or gh % m or gw % m:
        raise ImageError(f"patch grid {grid} is not a positive whole number of {m}x{m} merge blocks")
    n = t * gh * gw
    if not isinstance(patches, np.ndarray) or patches.shape != (n, cols) or patches.dtype != np.float32:
        shape = getattr(patches, "shape", None)
        raise ImageError(f"patches must be float32 of shape {(n, cols)} for grid {grid}, got {shape}")
    return n
