"""The vision projector GGUF ("mmproj"): a Qwen2-VL / Qwen2.5-VL vision encoder and its patch merger.

Files follow llama.cpp's tools/mtmd convention (convert_hf_to_gguf.py `Qwen2VLVisionModel`, clip.cpp):
`general.architecture` = "clip", `clip.projector_type` = "qwen2vl_merger" or "qwen2.5vl_merger",
`clip.vision.*` hyper-parameters, and tensors

    v.patch_embd.weight, v.patch_embd.weight.1   (D, 3, P, P) each: HF's Conv3d (D, 3, 2, P, P) split over time
    v.blk.{i}.ln1 / ln2                          LayerNorm weight+bias (Qwen2-VL) or RMSNorm weight (Qwen2.5-VL)
    v.blk.{i}.attn_q / attn_k / attn_v           (D, D) + bias: HF's fused qkv split in three
    v.blk.{i}.attn_out                           (D, D) + bias
    v.blk.{i}.ffn_up / ffn_down [/ ffn_gate]     MLP: fc1/fc2 (Qwen2-VL), gate/up/down SiLU (Qwen2.5-VL)
    v.post_ln                                    the merger's ln_q
    mm.0, mm.2                                   merger MLP: (4D, 4D) -> GELU -> (d_out, 4D)

Sizes that the metadata may get wrong (the converter writes the LM width as Qwen2-VL's
feed_forward_length, the older qwen2_vl_surgery.py script writes 0) are read from tensor shapes. That
older script also swapped the names of fc1 and fc2 (ffn_down holds fc1); like clip.cpp, the loader
recognizes the swap by shape. Letters: D encoder width, F MLP width, d_out LM width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kawai.engine.errors import KawaiError
from kawai.engine.gguf import GGUFError, GGUFFile, open_gguf
from kawai.engine.vision.preprocess import CLIP_MEAN, CLIP_STD, ImageSpec
from kawai.engine.weights import TensorLoader
from kawai.kernels.matmul import PackedMatrix, pack_dense

PROJECTOR_TYPES = ("qwen2vl_merger", "qwen2.5vl_merger")
DEFAULT_WINDOW = 112  # Qwen2.5-VL's attention window in pixels (llama.cpp's default when the key is absent)
# Image tokens per image by default. The encoder costs about 2 * params * 4 patches FLOPs per token
# (~5 GFLOP per token for a 600M-parameter ViT): 256 tokens (a 448x448 image) take tens of seconds
# on two cores, transformers' 1280 several minutes.
DEFAULT_MAX_IMAGE_TOKENS = 256
MAX_DIM = 1 << 16


class ProjectorError(KawaiError):
    """A projector file that is not a supported Qwen-VL vision encoder, or does not fit the model."""


@dataclass(frozen=True)
class VisionConfig:
    projector: str  # "qwen2vl_merger" | "qwen2.5vl_merger"
    n_layers: int
    d_model: int  # encoder width D
    n_heads: int
    d_ff: int  # MLP width F
    d_out: int  # merger output = the language model's embedding width
    patch_size: int
    merge_size: int
    eps: float
    norm: str  # "layer" (Qwen2-VL: LayerNorm with bias) | "rms" (Qwen2.5-VL)
    act: str  # "quick_gelu" | "gelu" | "silu"
    gated: bool  # MLP is down(act(gate(x)) * up(x)) (Qwen2.5-VL)
    full_attention_layers: tuple[int, ...]  # all layers unless the encoder uses window attention
    window_size: int  # attention window in pixels for the other layers (Qwen2.5-VL)
    rope_theta: float
    image: ImageSpec

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def merge_units(self) -> int:
        """Patches merged into one LM token."""
        return self.merge_size * self.merge_size

    @property
    def windowed(self) -> bool:
        return len(self.full_attention_layers) < self.n_layers


@dataclass(frozen=True, eq=False)
class VisionLayer:
    ln1_w: np.ndarray  # (D,)
    ln1_b: np.ndarray | None  # (D,) LayerNorm only
    attn_q: PackedMatrix  # (D, D)
    attn_k: PackedMatrix
    attn_v: PackedMatrix
    attn_q_b: np.ndarray  # (D,)
    attn_k_b: np.ndarray
    attn_v_b: np.ndarray
    attn_out: PackedMatrix  # (D, D)
    attn_out_b: np.ndarray
    ln2_w: np.ndarray
    ln2_b: np.ndarray | None
    ffn_up: PackedMatrix  # (F, D)
    ffn_up_b: np.ndarray  # (F,)
    ffn_gate: PackedMatrix | None  # (F, D) gated MLP only
    ffn_gate_b: np.ndarray | None
    ffn_down: PackedMatrix  # (D, F)
    ffn_down_b: np.ndarray  # (D,)


@dataclass(frozen=True, eq=False)
class VisionWeights:
    patch_embd: PackedMatrix  # (D, 3*T*P*P): the Conv3d as a matrix over flattened patches
    layers: tuple[VisionLayer, ...]
    post_ln_w: np.ndarray  # (D,)
    post_ln_b: np.ndarray | None
    mm0: PackedMatrix  # (4D, 4D)
    mm0_b: np.ndarray
    mm2: PackedMatrix  # (d_out, 4D)
    mm2_b: np.ndarray

    @property
    def nbytes(self) -> int:
        total = self.patch_embd.nbytes + self.mm0.nbytes + self.mm2.nbytes
        for layer in self.layers:
            total += sum(v.nbytes for v in vars(layer).values() if v is not None)
        return int(total)


@dataclass(frozen=True, eq=False)
class Projector:
    """A loaded vision projector: `config` and `weights`, plus where it came from."""

    config: VisionConfig
    weights: VisionWeights
    path: Path


def load_projector(
    path: str | Path, *, exact: bool = False, max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS
) -> Projector:
    """Open, check and pack a Qwen2-VL / Qwen2.5-VL mmproj GGUF. `exact` dequantizes every matrix to
    float32 (tests). Images are resized to at most `max_image_tokens` LM tokens (None: the file's or
    transformers' limit)."""
    try:
        gguf = open_gguf(path)
    except GGUFError as e:
        raise ProjectorError(f"vision projector {Path(path).name}: {e}") from None
    except OSError as e:
        raise ProjectorError(f"cannot open vision projector {Path(path).name}: {e.strerror}") from None
    try:
        cfg = vision_config(gguf, max_image_tokens)
        weights = load_vision_weights(gguf, cfg, exact=exact)
    except GGUFError as e:
        raise ProjectorError(f"vision projector {Path(path).name}: {e}") from None
    return Projector(cfg, weights, Path(path))


def vision_config(gguf: GGUFFile, max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS) -> VisionConfig:
    """VisionConfig from clip.* metadata; a missing or ill-typed key is an error naming it."""
    arch = gguf.get_str("general.architecture", "")
    if arch != "clip":
        raise ProjectorError(f"not a vision projector file: general.architecture is {arch!r}, expected 'clip'")
    if not gguf.get_bool("clip.has_vision_encoder", False):
        raise ProjectorError("projector file has no vision encoder (clip.has_vision_encoder)")
    projector = gguf.get_str("clip.vision.projector_type", None) or gguf.get_str("clip.projector_type", "")
    if projector not in PROJECTOR_TYPES:
        raise ProjectorError(
            f"vision projector type {projector!r} is not supported (supported: {', '.join(PROJECTOR_TYPES)})"
        )

    def size(key: str, default=None) -> int:
        value = gguf.get_int(key, default)
        if value is None:
            raise ProjectorError(f"GGUF metadata key {key!r} is missing")
        if not 1 <= value <= MAX_DIM:
            raise ProjectorError(f"GGUF metadata key {key!r} must be in 1..{MAX_DIM}, got {value}")
        return int(value)

    n_layers = size("clip.vision.block_count")
    d_model = size("clip.vision.embedding_length")
    n_heads = size("clip.vision.attention.head_count")
    if d_model % n_heads or (d_model // n_heads) % 4:
        raise ProjectorError(
            f"clip.vision.embedding_length {d_model} / head_count {n_heads} must give a head size divisible by 4"
        )
    patch_size = size("clip.vision.patch_size")
    merge_size = size("clip.vision.spatial_merge_size", 2)
    d_out = size("clip.vision.projection_dim")
    eps = gguf.get_float("clip.vision.attention.layer_norm_epsilon", 1e-6)
    if not 0 < eps < 1:
        raise ProjectorError(f"clip.vision.attention.layer_norm_epsilon must be in (0, 1), got {eps}")

    qwen25 = projector == "qwen2.5vl_merger"
    use_gelu = gguf.get_bool("clip.use_gelu", False)
    use_silu = gguf.get_bool("clip.use_silu", False)
    if use_gelu and use_silu:
        raise ProjectorError("clip.use_gelu and clip.use_silu are both set")
    act = "silu" if use_silu else "gelu" if use_gelu else "quick_gelu"  # clip.cpp's rule

    full_layers = _full_attention_layers(gguf, n_layers, qwen25)
    window_size = size("clip.vision.window_size", DEFAULT_WINDOW)
    if window_size < patch_size * merge_size:
        raise ProjectorError(f"clip.vision.window_size {window_size} is smaller than one merged patch")

    _, _, d_ff = _ffn_names(gguf, d_model)
    token_pixels = (patch_size * merge_size) ** 2
    min_pixels = _optional_pixels(gguf, "clip.vision.image_min_pixels", ImageSpec.min_pixels)
    max_pixels = _optional_pixels(gguf, "clip.vision.image_max_pixels", ImageSpec.max_pixels)
    if max_image_tokens is not None:
        if max_image_tokens < 1:
            raise ProjectorError(f"max_image_tokens must be positive, got {max_image_tokens}")
        max_pixels = min(max_pixels, max_image_tokens * token_pixels)
    image = ImageSpec(
        patch_size=patch_size,
        merge_size=merge_size,
        min_pixels=min(min_pixels, max_pixels),
        max_pixels=max_pixels,
        mean=_triple(gguf, "clip.vision.image_mean", CLIP_MEAN),
        std=_triple(gguf, "clip.vision.image_std", CLIP_STD, positive=True),
    )
    return VisionConfig(
        projector=projector,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_ff=d_ff,
        d_out=d_out,
        patch_size=patch_size,
        merge_size=merge_size,
        eps=float(eps),
        norm="rms" if qwen25 else "layer",
        act=act,
        gated="v.blk.0.ffn_gate.weight" in gguf.tensors,
        full_attention_layers=full_layers,
        window_size=window_size,
        rope_theta=10000.0,
        image=image,
    )


def _full_attention_layers(gguf: GGUFFile, n_layers: int, qwen25: bool) -> tuple[int, ...]:
    """Layers with full attention: every layer, or for Qwen2.5-VL every n_wa_pattern-th one
    ((i + 1) % pattern == 0, e.g. 7, 15, 23, 31) or an explicit `wa_layer_indexes` list."""
    explicit = gguf.metadata.get("clip.vision.wa_layer_indexes")
    if explicit is not None:
        layers = tuple(int(i) for i in np.asarray(explicit).reshape(-1))
        if any(not 0 <= i < n_layers for i in layers):
            raise ProjectorError(f"clip.vision.wa_layer_indexes {list(layers)} name layers outside 0..{n_layers - 1}")
        return tuple(sorted(set(layers)))
    pattern = gguf.get_int("clip.vision.n_wa_pattern", 0)
    if qwen25 and pattern < 1:
        raise ProjectorError("GGUF metadata key 'clip.vision.n_wa_pattern' is missing (required for Qwen2.5-VL)")
    if pattern < 1:
        return tuple(range(n_layers))
    return tuple(i for i in range(n_layers) if (i + 1) % pattern == 0)


def _ffn_names(gguf: GGUFFile, d_model: int) -> tuple[str, str, int]:
    """(up name, down name, F): "ffn_up" is (F, D) and "ffn_down" (D, F), or the two names swapped
    in files from the legacy surgery script (its ffn_down is (F, D))."""
    up = gguf.tensors.get("v.blk.0.ffn_up.weight")
    down = gguf.tensors.get("v.blk.0.ffn_down.weight")
    if up is None or down is None or len(up.shape) != 2 or len(down.shape) != 2:
        raise ProjectorError("tensors 'v.blk.0.ffn_up.weight' and 'v.blk.0.ffn_down.weight' must be matrices")
    if up.shape[1] == d_model:
        return "ffn_up", "ffn_down", int(up.shape[0])
    if down.shape[1] == d_model and up.shape[0] == d_model and "v.blk.0.ffn_gate.weight" not in gguf.tensors:
        return "ffn_down", "ffn_up", int(down.shape[0])
    raise ProjectorError(f"tensor 'v.blk.0.ffn_up.weight' has shape {up.shape}, expected (F, {d_model})")


def _optional_pixels(gguf: GGUFFile, key: str, default: int) -> int:
    value = gguf.get_int(key, default)
    if not 1 <= value <= 1 << 28:
        raise ProjectorError(f"GGUF metadata key {key!r} must be in 1..2^28, got {value}")
    return int(value)


def _triple(gguf: GGUFFile, key: str, default: tuple[float, ...], positive: bool = False) -> tuple[float, ...]:
    value = gguf.metadata.get(key)
    if value is None:
        return default
    arr = np.asarray(value)
    if arr.shape != (3,) or arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or (positive and np.any(arr <= 0)):
        raise ProjectorError(f"GGUF metadata key {key!r} must hold 3 {'positive ' if positive else ''}finite floats")
    return tuple(float(v) for v in arr)


def load_vision_weights(gguf: GGUFFile, cfg: VisionConfig, *, exact: bool = False) -> VisionWeights:
    """Read, check and pack every tensor the encoder needs; a missing tensor is an error naming it."""
    get = TensorLoader(gguf, exact, error=ProjectorError, file_kind="projector file")
    d, f, d4 = cfg.d_model, cfg.d_ff, cfg.d_model * cfg.merge_units
    up, down, _ = _ffn_names(gguf, d)
    layer_norm = cfg.norm == "layer"
    layers = []
    for i in range(cfg.n_layers):
        blk = f"v.blk.{i}"
        layers.append(
            VisionLayer(
                ln1_w=get.vector(f"{blk}.ln1.weight", d),
                ln1_b=get.vector(f"{blk}.ln1.bias", d) if layer_norm else None,
                attn_q=get.matrix(f"{blk}.attn_q.weight", d, d),
                attn_k=get.matrix(f"{blk}.attn_k.weight", d, d),
                attn_v=get.matrix(f"{blk}.attn_v.weight", d, d),
                attn_q_b=get.vector(f"{blk}.attn_q.bias", d),
                attn_k_b=get.vector(f"{blk}.attn_k.bias", d),
                attn_v_b=get.vector(f"{blk}.attn_v.bias", d),
                attn_out=get.matrix(f"{blk}.attn_out.weight", d, d),
                attn_out_b=get.vector(f"{blk}.attn_out.bias", d),
                ln2_w=get.vector(f"{blk}.ln2.weight", d),
                ln2_b=get.vector(f"{blk}.ln2.bias", d) if layer_norm else None,
                ffn_up=get.matrix(f"{blk}.{up}.weight", f, d),
                ffn_up_b=get.vector(f"{blk}.{up}.bias", f),
                ffn_gate=get.matrix(f"{blk}.ffn_gate.weight", f, d) if cfg.gated else None,
                ffn_gate_b=get.vector(f"{blk}.ffn_gate.bias", f) if cfg.gated else None,
                ffn_down=get.matrix(f"{blk}.{down}.weight", d, f),
                ffn_down_b=get.vector(f"{blk}.{down}.bias", d),
            )
        )
    if "v.patch_embd.bias" in gguf.tensors or "v.class_embd" in gguf.tensors:
        raise ProjectorError("a patch embedding bias or class embedding is not part of a Qwen-VL encoder")
    return VisionWeights(
        patch_embd=_patch_embedding(get, cfg),
        layers=tuple(layers),
        post_ln_w=get.vector("v.post_ln.weight", d),
        post_ln_b=get.vector("v.post_ln.bias", d) if layer_norm else None,
        mm0=get.matrix("mm.0.weight", d4, d4),
        mm0_b=get.vector("mm.0.bias", d4),
        mm2=get.matrix("mm.2.weight", cfg.d_out, d4),
        mm2_b=get.vector("mm.2.bias", cfg.d_out),
    )


def _patch_embedding(get: TensorLoader, cfg: VisionConfig) -> PackedMatrix:
    """The two temporal halves (D, 3, P, P) -> one dense (D, 3*2*P*P) matrix over transformers' patch
    vectors (channel, time, row, col), undoing the converter's Conv3d split."""
    p, d = cfg.patch_size, cfg.d_model
    halves = [get.floats(name, (d, 3, p, p)) for name in ("v.patch_embd.weight", "v.patch_embd.weight.1")]
    conv3d = np.stack(halves, axis=2)  # (D, 3, T=2, P, P)
    return pack_dense(conv3d.reshape(d, -1))
