"""Decoding real and awkward images into the configured uint8 RGB array."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import SAMPLE
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lesionml.data.images import decode_image, load_image_array, load_images, save_image_array
from lesionml.errors import DataError

SIZE = (75, 100)
LIMIT = 40_000_000
REAL = sorted((SAMPLE / "images").glob("*.jpg"))


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_real_jpeg_to_configured_shape():
    arr = decode_image(REAL[0].read_bytes(), SIZE, LIMIT, str(REAL[0]))
    assert arr.shape == (75, 100, 3) and arr.dtype == np.uint8
    plain = np.asarray(Image.open(REAL[0]).convert("RGB").resize((100, 75), Image.Resampling.BILINEAR))
    assert np.abs(arr.astype(int) - plain).mean() < 6  # reduced-size decode looks the same


def test_truncated_jpeg_names_the_file():
    data = REAL[0].read_bytes()
    with pytest.raises(DataError, match=r"^broken\.jpg: cannot decode image"):
        decode_image(data[: len(data) // 2], SIZE, LIMIT, "broken.jpg")


@pytest.mark.parametrize("data,needle", [(b"", "image file is empty"), (b"this is text", "not an image Pillow can read")])
def test_empty_and_text_files(data, needle):
    with pytest.raises(DataError, match=f"^fake.jpg: {needle}"):
        decode_image(data, SIZE, LIMIT, "fake.jpg")


@pytest.mark.parametrize(
    "make",
    [
        lambda: _encode(Image.new("RGBA", (200, 150), (255, 0, 0, 128)), "PNG"),
        lambda: _encode(Image.new("L", (200, 150), 200), "PNG"),
        lambda: _encode(Image.new("CMYK", (200, 150), (0, 255, 255, 0)), "JPEG"),
        lambda: _encode(Image.fromarray(np.full((150, 200), 40000, np.uint16)), "PNG"),
        lambda: _encode(Image.new("P", (200, 150), 3), "GIF"),
    ],
    ids=["rgba-png", "gray-png", "cmyk-jpeg", "16bit-png", "palette-gif"],
)
def test_any_mode_becomes_rgb(make):
    arr = decode_image(make(), SIZE, LIMIT, "x")
    assert arr.shape == (75, 100, 3) and arr.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped():
    data = _encode(Image.fromarray(np.full((150, 200), 32768, np.uint16)), "PNG")
    assert 120 <= decode_image(data, SIZE, LIMIT, "x").mean() <= 135


def test_exif_orientation_is_honoured():
    # A landscape picture, left half red, stored rotated with orientation 6 (rotate 90 CW to view).
    pic = np.zeros((150, 200, 3), np.uint8)
    pic[:, :100] = (255, 0, 0)
    stored = Image.fromarray(pic).transpose(Image.Transpose.ROTATE_90)  # stored as 200 tall x 150 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    arr = decode_image(_encode(stored, "JPEG", exif=exif, quality=95), SIZE, LIMIT, "x")
    assert arr[:, :40, 0].mean() > 200 and arr[:, 60:, 0].mean() < 60


def test_pixel_limit_refuses_before_decoding():
    with pytest.raises(DataError, match=r"200x150 pixels is over the limit of 1,000 .*decompression bomb"):
        decode_image(REAL[0].read_bytes(), SIZE, 1000, "big.jpg")


def test_parallel_equals_serial_and_keeps_order():
    locs = [(str(p), "") for p in REAL[:300]]
    serial = load_images(locs, SIZE, LIMIT, workers=1)
    done = []
    parallel = load_images(locs, SIZE, LIMIT, workers=2, progress=done.append)
    np.testing.assert_array_equal(serial, parallel)
    assert sum(done) == 300


def test_worker_error_names_the_file(tmp_path):
    bad = tmp_path / "ISIC_bad.jpg"
    bad.write_bytes(REAL[0].read_bytes()[:500])
    locs = [(str(p), "") for p in REAL[:200]] + [(str(bad), "")]
    with pytest.raises(DataError, match="ISIC_bad.jpg: cannot decode image"):
        load_images(locs, SIZE, LIMIT, workers=2)


def test_image_array_round_trip_without_pickle(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (3, 8, 9, 3), dtype=np.uint8)
    save_image_array(tmp_path / "a.npz", images, ["a", "b", "c"])
    back, ids = load_image_array(tmp_path / "a.npz")
    np.testing.assert_array_equal(back, images)
    assert list(ids) == ["a", "b", "c"]
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a valid image array file"):
        load_image_array(tmp_path / "bad.npz")


@settings(max_examples=40, deadline=None)
@given(
    w=st.integers(1, 300),
    h=st.integers(1, 300),
    mode=st.sampled_from(["RGB", "RGBA", "L", "LA", "CMYK", "P", "I;16", "1"]),
    fmt=st.sampled_from(["PNG", "JPEG", "TIFF", "BMP"]),
)
def test_property_any_image_pillow_can_make_becomes_the_configured_array(w, h, mode, fmt):
    try:
        data = _encode(Image.new(mode, (w, h)), fmt)
    except (OSError, KeyError, ValueError):
        return  # this format cannot store this mode; nothing to decode
    arr = decode_image(data, (24, 32), LIMIT, "x")
    assert arr.shape == (24, 32, 3) and arr.dtype == np.uint8
