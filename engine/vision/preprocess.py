"""Image bytes -> the pixel patches a Qwen2-VL / Qwen2.5-VL vision encoder reads.

    probe_image(data) -> (width, height)        from the header only: no pixel decoded
    decode_image(data) -> PIL.Image (RGB)      JPEG, PNG, GIF (first frame), WebP; EXIF orientation applied;
                                               with max_pixels, downscaled straight after decoding
    preprocess(image, spec) -> Pixels          smart_resize, bicubic, rescale 1/255, mean/std normalization
    to_patches(pixels, spec) -> (n, C*T*P*P)   the flattened patch layout of transformers' processor

The steps follow transformers' `Qwen2VLImageProcessorPil` operation for operation (Pillow bicubic on uint8,
float64 rescale then float32, float32 normalization), so the patches equal its `pixel_values` exactly.

Letters: H, W resized image height/width in pixels; P patch size; M merge size; T temporal patch size;
gh = H / P, gw = W / P the patch grid; n = gh * gw patches.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kawai.engine.errors import KawaiError

# OpenAI CLIP normalization, used by every Qwen-VL preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_SIDE = 8000  # pixels per side accepted from a client (security.md)
MAX_ASPECT_RATIO = 200  # smart_resize's limit: thinner images have no valid grid

# Accepted formats by magic bytes -> Pillow's format name. Nothing else is ever handed to a decoder.
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FORMATS = ("JPEG", "PNG", "GIF", "WEBP")


class ImageError(KawaiError):
    """An image that cannot be used: unknown format, corrupt, too large, or with an impossible shape."""


@dataclass(frozen=True)
class ImageSpec:
    """How images are cut for one vision encoder (from the projector GGUF; defaults are Qwen2-VL's)."""

    patch_size: int = 14
    merge_size: int = 2  # patches merged per side into one LM token
    temporal_patch_size: int = 2  # a still image is repeated over the temporal patch
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280  # transformers' default: at most 1280 image tokens
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this (one LM token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True, eq=False)
class Pixels:
    """A preprocessed image: normalized pixels and its grid in patches (t, gh, gw)."""

    data: np.ndarray  # (3, H, W) float32, normalized
    grid: tuple[int, int, int]  # (t, gh, gw): t = 1 for a still image

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def sniff_format(data: bytes) -> str | None:
    """The image format named by the magic bytes, or None when it is not one we accept."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == _PNG_MAGIC:
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def probe_image(data: bytes, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) of untrusted image bytes, read from the header: nothing is decoded, so a request's
    images can be counted (pixels, image tokens) before any of them costs memory."""
    with _open(data, max_side) as image:
        return image.size


def decode_image(data: bytes, max_side: int = MAX_SIDE, max_pixels: int | None = None) -> Image.Image:
    """Decode untrusted image bytes into an RGB image.

    The format is decided by magic bytes and only that decoder runs; the size is checked from the header
    before any pixel is decoded. GIF and animated WebP give their first frame. EXIF orientation is applied
    (a phone photo shows upright). Transparency is composited onto white, as transformers does.

    max_pixels (the encoder's ImageSpec.max_pixels): a larger image is brought down right after decoding
    to at most DOWNSCALE_MARGIN**2 times that many pixels (each side still at least the size
    `smart_resize` will give, mostly about twice it, so its bicubic resize keeps its quality). A JPEG is decoded at the
    reduced scale directly (draft mode: 1/2, 1/4 or 1/8), other formats are reduced by an integer
    factor (box filter), so only one full-size image is ever held, and only briefly.
    """
    try:
        with _open(data, max_side) as image:
            turn = EXIF_TURNS.get(image.getexif().get(EXIF_ORIENTATION, 1))  # read before any conversion
            factor = _reduction(image.width * image.height, max_pixels)
            if factor > 1 and image.format == "JPEG":
                image.draft("RGB", (-(-image.width // factor), -(-image.height // factor)))
            image.seek(0)  # the first frame of an animation
            image.load()
            factor = _reduction(image.width * image.height, max_pixels)
            if factor > 1:
                if image.mode not in ("L", "LA", "RGB", "RGBA"):  # the modes reduce() takes
                    image = image.convert("L") if image.mode == "1" else to_rgb(image)
                image = image.reduce(factor)
            image = to_rgb(image)
            return image if turn is None else image.transpose(turn)
    except ImageError:
        raise
    except Exception:  # noqa: BLE001 - untrusted bytes: any decoder failure (struct.error, KeyError in
        # EXIF parsing, MemoryError, ...) means a bad image, a client error, never a server crash
        raise ImageError(f"corrupt or unreadable {sniff_format(data)} image") from None


EXIF_ORIENTATION = 0x0112
EXIF_TURNS = {  # EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
DOWNSCALE_MARGIN = 2  # a downscaled image keeps this many times each side the encoder needs


def _reduction(pixels: int, max_pixels: int | None) -> int:
    """The smallest integer factor that brings `pixels` to at most DOWNSCALE_MARGIN**2 * max_pixels (so at
    least max_pixels remain: each side keeps at least the size smart_resize gives); 1 for none."""
    if max_pixels is None:
        return 1
    return max(1, math.ceil(math.sqrt(pixels / (DOWNSCALE_MARGIN**2 * max_pixels))))


def _open(data: bytes, max_side: int) -> Image.Image:
    """Image.open with only the sniffed format's decoder, each side checked from the header."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError("unsupported image format: expected JPEG, PNG, GIF or WebP")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own, larger limit
        raise ImageError(f"image is too large: each side must be at most {max_side} pixels") from None
    except Exception:  # noqa: BLE001 - see decode_image
        raise ImageError(f"corrupt or unreadable {fmt} image") from None
    width, height = image.size
    if not (1 <= width <= max_side and 1 <= height <= max_side):
        image.close()
        raise ImageError(f"image is {width}x{height} pixels; each side must be at most {max_side}")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto a white background (transformers' `convert_to_rgb`)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) closest to the original aspect ratio with both sides multiples of `factor`
    and height * width within [min_pixels, max_pixels] (Qwen2-VL's rule, same rounding)."""
    if height < 1 or width < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"image aspect ratio {width}x{height} exceeds {MAX_ASPECT_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess(image: Image.Image, spec: ImageSpec) -> Pixels:
    """An RGB image -> normalized pixels (3, H, W) resized to a whole number of merged patches."""
    if image.mode != "RGB":
        image = to_rgb(image)
    height, width = smart_resize(image.height, image.width, spec.factor, spec.min_pixels, spec.max_pixels)
    resized = image.resize((width, height), Image.Resampling.BICUBIC)
    rgb = np.asarray(resized, dtype=np.uint8)  # (H, W, 3)
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    grid = (1, height // spec.patch_size, width // spec.patch_size)
    return Pixels(np.ascontiguousarray(x.transpose(2, 0, 1)), grid)


def to_patches(pixels: Pixels, spec: ImageSpec) -> np.ndarray:
    """Pixels (3, H, W) -> patches (n, 3*T*P*P) float32, in transformers' order.

    Patches are listed merge-block by merge-block (each M x M block of neighbouring patches is
    consecutive, so the merger can concatenate them); each patch vector is (channel, time, row, col)
    with the still frame repeated over the T temporal slots.
    """
    c, height, width = pixels.data.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = height // p, width // p
    if gh * p != height or gw * p != width or gh % m or gw % m:
        raise ImageError(f"{width}x{height} pixels are not a whole number of {p * m}-pixel merged patches")
    x = pixels.data.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/M, gw/M, M, M, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # repeat the frame over time
    return np.ascontiguousarray(x, dtype=np.float32).reshape(gh * gw, c * t * p * p)
