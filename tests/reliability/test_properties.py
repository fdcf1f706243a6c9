"""Preprocessing on any image Pillow can make: whatever the mode, size and format, the
decoder gives the configured (height, width, 3) uint8 array (or, for the pixel limit, a
DataError naming the file), never an exception of another type or another shape."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lesionml.data.images import decode_image
from lesionml.errors import DataError

# The formats each mode can be written in. PNG and JPEG where the mode allows (what a
# release holds); TIFF for the modes neither takes (32-bit integer and float), which
# `lesionml predict` accepts.
FORMATS = {
    "1": ("PNG", "JPEG"),
    "L": ("PNG", "JPEG"),
    "LA": ("PNG",),
    "P": ("PNG",),
    "RGB": ("PNG", "JPEG"),
    "RGBA": ("PNG",),
    "CMYK": ("JPEG",),
    "I;16": ("PNG",),
    "I": ("TIFF",),
    "F": ("TIFF",),
}
SIZES = st.tuples(st.integers(8, 64), st.integers(8, 64))  # configured (height, width)


def _make(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """An image of `mode` with random content (random: a constant picture hides bugs)."""
    rng = np.random.default_rng(seed)
    u8 = rng.integers(0, 256, (height, width), dtype=np.uint8)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if mode == "1":
        im = Image.fromarray(u8 > 127)
    elif mode == "L":
        im = Image.fromarray(u8)
    elif mode == "LA":
        im = Image.merge("LA", [Image.fromarray(u8), Image.fromarray(u8[::-1].copy())])
    elif mode == "P":
        im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
        if seed % 2:
            im.info["transparency"] = 0
    elif mode == "RGB":
        im = Image.fromarray(rgb)
    elif mode == "RGBA":
        im = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))
    elif mode == "CMYK":
        im = Image.fromarray(rgb).convert("CMYK")
    elif mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16))
    elif mode == "I":
        im = Image.fromarray(rng.integers(0, 2**20, (height, width)).astype(np.int32))
    else:
        im = Image.fromarray(rng.random((height, width), dtype=np.float32) * 255)
    assert im.mode == mode, (mode, im.mode)
    return im


@st.composite
def encoded_images(draw) -> tuple[str, str, tuple[int, int], bytes]:
    mode = draw(st.sampled_from(sorted(FORMATS)))
    fmt = draw(st.sampled_from(FORMATS[mode]))
    width, height = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    im = _make(mode, width, height, draw(st.integers(0, 2**16)))
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": draw(st.integers(5, 100))} if fmt == "JPEG" else {}))
    return mode, fmt, (width, height), buf.getvalue()


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=encoded_images(), size=SIZES)
def test_any_mode_size_and_format_decodes_to_the_configured_array(image, size):
    mode, fmt, (width, height), data = image
    arr = decode_image(data, size, 40_000_000, f"x.{fmt.lower()}")
    assert arr.shape == (*size, 3) and arr.dtype == np.uint8, (mode, fmt, width, height)


@settings(max_examples=20, deadline=None, database=None)
@given(image=encoded_images(), size=SIZES)
def test_over_the_pixel_limit_is_a_data_error_naming_the_file(image, size):
    _mode, _fmt, (width, height), data = image
    limit = width * height - 1
    if limit < 1:
        return  # a 1x1 image is within every limit the config accepts
    with pytest.raises(DataError) as err:
        decode_image(data, size, limit, "photo.img")
    assert str(err.value) == (
        f"photo.img: {width}x{height} pixels is over the limit of {limit:,} (data.max_image_pixels); "
        "refusing a possible decompression bomb"
    )


def test_every_listed_mode_and_format_can_be_written():
    """The table above is what Pillow writes: a mode it cannot save is not silently skipped."""
    for mode, formats in FORMATS.items():
        for fmt in formats:
            _make(mode, 3, 2, 0).save(io.BytesIO(), format=fmt)
