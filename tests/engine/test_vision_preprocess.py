"""Image decoding and preprocessing against transformers' Qwen2-VL image processor (the PIL one: there is
no torchvision here), plus the untrusted-image rules of security.md."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from kawai.engine.errors import KawaiError
from kawai.engine.vision.preprocess import (
    ImageError,
    ImageSpec,
    decode_image,
    preprocess,
    smart_resize,
    sniff_format,
    to_patches,
)
from pictures import photo


def test_image_error_is_a_user_error():
    assert issubclass(ImageError, KawaiError)


# --- smart_resize ------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 6000),
    width=st.integers(1, 6000),
    factor=st.sampled_from([28, 32, 56]),
    min_pixels=st.sampled_from([56 * 56, 8 * 28 * 28, 256 * 28 * 28]),
    max_pixels=st.sampled_from([28 * 28 * 64, 28 * 28 * 1280, 12845056]),
)
def test_smart_resize_matches_transformers(height, width, factor, min_pixels, max_pixels):
    if max(height, width) / min(height, width) > 200:
        with pytest.raises(ImageError, match="aspect ratio"):
            smart_resize(height, width, factor, min_pixels, max_pixels)
        return
    ours = smart_resize(height, width, factor, min_pixels, max_pixels)
    assert ours == hf_smart_resize(height, width, factor, min_pixels, max_pixels)
    assert ours[0] % factor == 0 and ours[1] % factor == 0 and min(ours) >= factor


# --- preprocessing vs transformers ---------------------------------------------------------------------




def _hf(image: Image.Image, spec: ImageSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    processor = Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=spec.patch_size,
        merge_size=spec.merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
    )
    out = processor(images=[image], return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


CASES = {
    "odd-size": (photo(100, 73), ImageSpec()),
    "vga": (photo(640, 480, seed=1), ImageSpec()),
    "tiny-upscaled": (photo(20, 30, seed=2), ImageSpec()),  # below min_pixels: scaled up
    "capped": (photo(1500, 900, seed=3), ImageSpec(max_pixels=28 * 28 * 256)),  # above max_pixels: scaled down
    "tall": (photo(31, 400, seed=4), ImageSpec()),
    "rgba": (photo(90, 60, seed=5).convert("RGBA"), ImageSpec()),
    "grey": (photo(70, 50, seed=6).convert("L"), ImageSpec()),
    "other-mean-std": (photo(60, 60, seed=7), ImageSpec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.125))),
}


@pytest.mark.parametrize("case", CASES)
def test_patches_equal_transformers_processor(case):
    image, spec = CASES[case]
    if image.mode == "RGBA":  # half-transparent pixels: composited onto white by both
        alpha = np.tile(np.linspace(0, 255, image.width, dtype=np.uint8), (image.height, 1))
        image.putalpha(Image.fromarray(alpha))
    expected, expected_grid = _hf(image, spec)
    pixels = preprocess(image, spec)
    patches = to_patches(pixels, spec)
    assert pixels.grid == expected_grid
    assert patches.dtype == np.float32 and patches.shape == expected.shape
    np.testing.assert_array_equal(patches, expected)  # same operations in the same order: bit-exact


def test_patch_layout_is_merge_block_major():
    """Patch k of merge block b covers pixels of block b: rows 0..M*P of the first block, etc."""
    spec = ImageSpec(min_pixels=28 * 28)
    pixels = preprocess(photo(28, 28), spec)  # one 2x2 merge block of 14-pixel patches
    patches = to_patches(pixels, spec).reshape(4, 3, 2, 14, 14)
    np.testing.assert_array_equal(patches[1, :, 0], pixels.data[:, 0:14, 14:28])  # top-right patch second
    np.testing.assert_array_equal(patches[2, :, 1], pixels.data[:, 14:28, 0:14])  # bottom-left third, frame 2
    assert pixels.n_patches == 4
    big = preprocess(photo(56, 28), spec)  # two merge blocks side by side: block 1 starts at column 28
    np.testing.assert_array_equal(to_patches(big, spec).reshape(8, 3, 2, 14, 14)[4, :, 0], big.data[:, 0:14, 28:42])


def test_to_patches_rejects_a_partial_merge_block():
    spec = ImageSpec()
    pixels = preprocess(photo(56, 56), spec)
    bad = type(pixels)(pixels.data[:, :42, :], (1, 3, 4))
    with pytest.raises(ImageError, match="merged patches"):
        to_patches(bad, spec)


# --- decoding untrusted bytes ------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_decode_accepted_formats(fmt):
    image = photo(40, 30)
    data = _encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert sniff_format(data) == fmt
    decoded = decode_image(data)
    assert decoded.mode == "RGB" and decoded.size == (40, 30)
    if fmt in ("PNG", "WEBP"):  # lossless
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))


def test_decode_gif_takes_the_first_frame():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = _encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert np.asarray(decode_image(data))[0, 0].tolist() == [255, 0, 0]


def test_decode_applies_exif_orientation():
    image = photo(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = _encode(image, "JPEG", exif=exif, quality=95)
    decoded = decode_image(data)
    assert decoded.size == (20, 40)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(expected))


def test_decode_composites_transparency_on_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    assert np.asarray(decode_image(_encode(image, "PNG")))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0])
    data = _encode(palette, "GIF", transparency=0)
    assert np.asarray(decode_image(data))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"BM" + bytes(64),  # BMP: a real format, but not accepted
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"\x00\x00\x01\x00" + bytes(32),  # ICO
    ],
    ids=["empty", "bmp", "svg", "ico"],
)
def test_decode_rejects_other_formats(data):
    with pytest.raises(ImageError, match="unsupported image format"):
        decode_image(data)


def test_decode_rejects_corrupt_images():
    png = _encode(photo(30, 30), "PNG")
    for bad in (png[:40], png[:8] + bytes(len(png) - 8), b"\xff\xd8\xff" + bytes(100), b"GIF89a" + bytes(5)):
        with pytest.raises(ImageError):
            decode_image(bad)
    with pytest.raises(ImageError, match="must be bytes"):
        decode_image("not bytes")  # type: ignore[arg-type]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a valid CRC and a tiny (wrong) image body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = zlib.compress(b"\x00" * 16)
    idat = b"IDAT" + body
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(body)) + idat + struct.pack(">I", zlib.crc32(idat))
        + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    )


@pytest.mark.parametrize("size", [(8001, 10), (10, 8001), (60000, 60000)])
def test_decode_rejects_oversized_images_before_decoding(size):
    with pytest.raises(ImageError, match="at most 8000"):
        decode_image(_png_header_only(*size))


def test_decode_size_limit_is_configurable():
    data = _encode(photo(64, 32), "PNG")
    with pytest.raises(ImageError, match="at most 50"):
        decode_image(data, max_side=50)
    assert decode_image(data, max_side=64).size == (64, 32)


_VALID = {fmt: _encode(photo(24, 16), fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP")}


@settings(max_examples=200, deadline=None)
@given(fmt=st.sampled_from(sorted(_VALID)), data=st.data())
def test_decode_damaged_images_fail_cleanly(fmt, data):
    """Flipped bytes and truncations of real images: either an RGB image or an ImageError, nothing else."""
    raw = bytearray(_VALID[fmt])
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(8, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(12, len(raw)))]
    try:
        image = decode_image(bytes(raw))
    except ImageError:
        return
    assert image.mode == "RGB" and image.width <= 8000 and image.height <= 8000
