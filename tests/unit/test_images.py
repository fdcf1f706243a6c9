"""Decoding real and awkward images into the configured uint8 RGB array."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from lesionml.data import images as images_module
from lesionml.data.images import decode_image, load_image_array, load_images, save_image_array
from lesionml.errors import DataError
from tests.helpers import SAMPLE

SIZE = (75, 100)  # height, width: the configured default
LIMIT = 40_000_000
REAL = sorted((SAMPLE / "images").glob("*.jpg"))
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes, size=SIZE, limit=LIMIT, name="x.jpg") -> np.ndarray:
    arr = decode_image(data, size, limit, name)
    assert arr.shape == (*size, 3) and arr.dtype == np.uint8
    return arr


# --- real images ---------------------------------------------------------------------


def test_real_jpeg_becomes_the_configured_array_showing_the_same_picture():
    with Image.open(REAL[0]) as im:
        assert im.size == (200, 150)
    arr = _decode(REAL[0].read_bytes())
    # Reference: a full decode then a plain resize. The reduced-size (DCT) decode must
    # give the same picture, not a shifted, transposed or differently coloured one.
    with Image.open(REAL[0]) as im:
        plain = np.asarray(im.convert("RGB").resize((100, 75), Image.Resampling.BILINEAR), dtype=np.int16)
    assert np.abs(arr.astype(np.int16) - plain).mean() < 6
    other = _decode(REAL[1].read_bytes())
    assert np.abs(other.astype(np.int16) - plain).mean() > 6, "a different photo differs"


def test_at_a_scale_only_libjpeg_turbo_has_the_picture_is_the_same():
    # 96x128 from 200x150: decoded at 6/8 (150x113) in the DCT, which Pillow's 1/2, 1/4 and
    # 1/8 scales cannot do; the result must still be the full decode's picture.
    arr = _decode(REAL[0].read_bytes(), size=(96, 128))
    with Image.open(REAL[0]) as im:
        plain = np.asarray(im.convert("RGB").resize((128, 96), Image.Resampling.BILINEAR), dtype=np.int16)
    assert np.abs(arr.astype(np.int16) - plain).mean() < 3


def test_a_jpeg_that_strict_libjpeg_turbo_refuses_is_decoded_by_pillow():
    # Stray bytes before a marker: libjpeg calls it corrupt but recoverable, Pillow reads it.
    data = REAL[0].read_bytes()
    at = data.find(b"\xff\xdb")
    stray = data[:at] + b"\x12\x34" + data[at:]
    arr = _decode(stray, size=(96, 128))
    assert np.abs(arr.astype(np.int16) - _decode(data, size=(96, 128))).mean() < 3


def test_grayscale_jpeg_becomes_three_equal_channels():
    arr = _decode(_encode(Image.new("L", (200, 150), 200), "JPEG", quality=95), size=(96, 128))
    assert (np.abs(arr.astype(int) - 200) <= 2).all()
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_other_configured_sizes():
    assert _decode(REAL[0].read_bytes(), size=(32, 48)).shape == (32, 48, 3)
    assert _decode(REAL[0].read_bytes(), size=(300, 400)).shape == (300, 400, 3)


# --- broken files --------------------------------------------------------------------


def test_truncated_jpeg_names_the_file(tmp_path):
    data = REAL[0].read_bytes()
    with pytest.raises(DataError, match=r"^broken\.jpg: cannot decode image \(image file is truncated"):
        decode_image(data[: len(data) // 2], SIZE, LIMIT, "broken.jpg")
    bad = tmp_path / "ISIC_0000001.jpg"
    bad.write_bytes(data[:700])
    with pytest.raises(DataError) as err:
        load_images([(str(bad), "")], SIZE, LIMIT, workers=1)
    assert str(err.value).startswith(f"{bad}: cannot decode image (")


def test_text_file_named_jpg(tmp_path):
    fake = tmp_path / "ISIC_0000002.jpg"
    fake.write_text("lesion_id,image_id,dx\nthis is not a photo\n")
    with pytest.raises(DataError) as err:
        load_images([(str(fake), "")], SIZE, LIMIT, workers=1)
    assert str(err.value) == f"{fake}: not an image Pillow can read"


def test_empty_file():
    with pytest.raises(DataError, match=r"^empty\.jpg: image file is empty \(0 bytes\)$"):
        decode_image(b"", SIZE, LIMIT, "empty.jpg")


def test_unreadable_zip_member_is_named(tmp_path):
    archive = tmp_path / "part.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ISIC_0000003.jpg", REAL[0].read_bytes())
    with pytest.raises(DataError) as err:
        load_images([(str(archive), "ISIC_0000099.jpg")], SIZE, LIMIT, workers=1)
    assert str(err.value).startswith(f"{archive}:ISIC_0000099.jpg: cannot read (")


# --- every mode becomes RGB ----------------------------------------------------------


def test_png_with_alpha_is_composited_on_black():
    arr = _decode(_encode(Image.new("RGBA", (200, 150), (255, 0, 0, 128)), "PNG"))
    assert abs(int(arr[..., 0].mean()) - 128) <= 2 and arr[..., 1:].max() == 0


def test_fully_transparent_png_is_black_not_its_hidden_colour():
    arr = _decode(_encode(Image.new("RGBA", (200, 150), (255, 255, 255, 0)), "PNG"))
    assert arr.max() == 0


def test_grayscale_png():
    arr = _decode(_encode(Image.new("L", (200, 150), 200), "PNG"))
    assert (arr == 200).all()


def test_cmyk_jpeg():
    data = _encode(Image.new("CMYK", (200, 150), (0, 255, 255, 0)), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK"
    arr = _decode(data)
    assert arr[..., 0].mean() > 240 and arr[..., 1].mean() < 15 and arr[..., 2].mean() < 15


def test_sixteen_bit_png_is_scaled_not_clipped():
    data = _encode(Image.fromarray(np.full((150, 200), 40000, np.uint16)), "PNG")
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "I;16"
    arr = _decode(data)
    assert (np.abs(arr.astype(int) - 40000 * 255 // 65535) <= 1).all()  # 155, not clipped to 255


def test_sixteen_bit_ramp_keeps_its_order():
    ramp = np.tile(np.linspace(0, 65535, 200).astype(np.uint16), (150, 1))
    arr = _decode(_encode(Image.fromarray(ramp), "PNG"))
    row = arr[40, :, 0].astype(int)
    assert row[0] <= 3 and row[-1] >= 252 and (np.diff(row) >= 0).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("P", (200, 150), 3),
        lambda: Image.new("1", (200, 150), 1),
        lambda: Image.new("LA", (200, 150), (90, 255)),
    ],
    ids=["palette", "bilevel", "gray-alpha"],
)
def test_other_modes_become_rgb(make):
    _decode(_encode(make(), "PNG"))


# --- EXIF orientation ----------------------------------------------------------------


def _tall_photo_with_red_top(orientation: int | None) -> bytes:
    """Stored 450 wide x 600 tall (the release's 600x450 frame on its side): top quarter red."""
    pixels = np.zeros((600, 450, 3), np.uint8)
    pixels[:] = BLUE
    pixels[:150] = RED
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)


def _red(region: np.ndarray) -> bool:
    return region[..., 0].mean() > 200 and region[..., 2].mean() < 50


def _blue(region: np.ndarray) -> bool:
    return region[..., 2].mean() > 200 and region[..., 0].mean() < 50


def test_exif_orientation_6_is_rotated_clockwise_before_resizing():
    arr = _decode(_tall_photo_with_red_top(6))
    # Shown rotated 90 degrees clockwise: a landscape picture whose right quarter is red.
    assert _red(arr[:, 80:]) and _blue(arr[:, :70])


def test_exif_orientation_8_is_rotated_counter_clockwise():
    arr = _decode(_tall_photo_with_red_top(8))
    assert _red(arr[:, :20]) and _blue(arr[:, 30:])


def test_without_orientation_the_stored_picture_is_used_as_is():
    for orientation in (None, 1):
        arr = _decode(_tall_photo_with_red_top(orientation))
        # Squeezed into the landscape frame, but the red band stays at the top.
        assert _red(arr[:15]) and _blue(arr[25:])


# --- decompression bombs -------------------------------------------------------------


def test_pixel_limit_refuses_a_large_image():
    data = REAL[0].read_bytes()  # 200 x 150 = 30,000 pixels
    with pytest.raises(DataError) as err:
        decode_image(data, SIZE, 29_999, "big.jpg")
    assert str(err.value) == (
        "big.jpg: 200x150 pixels is over the limit of 29,999 (data.max_image_pixels); "
        "refusing a possible decompression bomb"
    )
    _decode(data, limit=30_000)  # exactly at the limit is allowed


def test_pixel_limit_is_checked_from_the_header_of_a_png_too():
    data = _encode(Image.new("L", (300, 300)), "PNG")
    with pytest.raises(DataError, match=r"300x300 pixels is over the limit of 50,000"):
        decode_image(data, SIZE, 50_000, "wide.png")


# --- many images ---------------------------------------------------------------------


def test_parallel_equals_serial_in_order(monkeypatch):
    # Small chunks, so 40 images are 6 chunks shared by the two threads.
    monkeypatch.setattr(images_module, "_CHUNK", 7)
    locs = [(str(p), "") for p in REAL[:40]]
    serial = load_images(locs, SIZE, LIMIT, workers=1)
    done: list[int] = []
    parallel = load_images(locs, SIZE, LIMIT, workers=2, progress=done.append)
    np.testing.assert_array_equal(serial, parallel)
    assert sorted(done) == [5, 7, 7, 7, 7, 7]
    for k in (0, 13, 39):
        np.testing.assert_array_equal(parallel[k], decode_image(REAL[k].read_bytes(), SIZE, LIMIT, "x"))
    backwards = load_images(locs[::-1], SIZE, LIMIT, workers=2)
    np.testing.assert_array_equal(backwards, parallel[::-1])


def test_zip_members_decode_like_files(tmp_path):
    archive = tmp_path / "HAM10000_images_part_1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in REAL[:10]:
            zf.write(p, p.name)
    from_files = load_images([(str(p), "") for p in REAL[:10]], SIZE, LIMIT, workers=2)
    from_zip = load_images([(str(archive), p.name) for p in REAL[:10]], SIZE, LIMIT, workers=2)
    np.testing.assert_array_equal(from_files, from_zip)


def test_one_bad_file_among_many_fails_the_load_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "_CHUNK", 8)
    bad = tmp_path / "ISIC_bad.jpg"
    bad.write_bytes(REAL[0].read_bytes()[:500])
    locs = [(str(p), "") for p in REAL[:30]] + [(str(bad), "")] + [(str(p), "") for p in REAL[30:40]]
    with pytest.raises(DataError, match=f"^{bad}: cannot decode image"):
        load_images(locs, SIZE, LIMIT, workers=2)


def test_no_images_gives_an_empty_array():
    assert load_images([], SIZE, LIMIT, workers=2).shape == (0, 75, 100, 3)


def test_image_array_round_trip_without_pickle(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 9, 3), dtype=np.uint8)
    save_image_array(tmp_path / "a.npz", pixels, ["ISIC_1", "ISIC_2", "ISIC_3"])
    back, ids = load_image_array(tmp_path / "a.npz")
    np.testing.assert_array_equal(back, pixels)
    assert list(ids) == ["ISIC_1", "ISIC_2", "ISIC_3"]
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a valid image array file .*; re-run preprocess"):
        load_image_array(tmp_path / "bad.npz")


def test_image_array_shape_reads_only_the_header(tmp_path):
    from lesionml.data.images import image_array_shape

    images = np.zeros((5, 7, 9, 3), np.uint8)
    save_image_array(tmp_path / "a.npz", images, list("abcde"))
    assert image_array_shape(tmp_path / "a.npz") == (5, 7, 9, 3)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a valid image array file"):
        image_array_shape(tmp_path / "bad.npz")
