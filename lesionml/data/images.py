"""Decode and resize images into one uint8 array, fast and safely.

Speed: JPEG files are decoded by libjpeg-turbo (simplejpeg) at the smallest of its M/8 DCT
scales that still covers the target, so the decoder skips the detail the resize would
throw away and the resize starts from fewer pixels. The copy's 200x150 JPEGs decode at
6/8 (150x113) for 96x128, where Pillow's scales (1/2, 1/4, 1/8) would leave only a full
decode. Chunks of images are decoded in parallel threads (both libraries release the GIL).
Safety: the pixel count is checked from the header before any pixel is decoded
(decompression bombs), EXIF orientation is honoured, every mode Pillow reads is
converted to RGB, and a truncated or undecodable file is an error naming the file.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from lesionml.data.source import ImageReader, describe_location
from lesionml.errors import DataError
from lesionml.io import atomic_path

# Our own limit is checked explicitly (with a clear message); Pillow's global guard is
# disabled so that it does not raise its own warning/exception first.
Image.MAX_IMAGE_PIXELS = None
# load_images' threads already use every core; OpenCV's own pool would only oversubscribe them.
cv2.setNumThreads(1)

Location = tuple[str, str]  # (file, zip member or "")
_CHUNK = 64
_ORIENTATION = 0x0112  # EXIF tag
# What each EXIF orientation asks for to show the picture upright (Pillow's exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; 16-bit grayscale is scaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.uint32)
        peak = 65535 if im.mode.startswith("I;16") else max(int(arr.max()), 1)
        im = Image.fromarray((arr * 255 // peak).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def _turbo_decode(data: bytes, stored_size: tuple[int, int]) -> np.ndarray | None:
    """A YCbCr or grayscale JPEG decoded at the smallest DCT scale covering `stored_size`
    (width, height), never enlarged; None where libjpeg-turbo objects, so that Pillow
    decides: it refuses a truncated file with its own message, as before, and accepts
    the recoverable oddities (stray bytes between markers) that strict mode refuses."""
    try:
        return simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_width=stored_size[0], min_height=stored_size[1], strict=True
        )
    except ValueError:
        return None


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 -> (height, width, 3): bilinear while the picture shrinks by at most 2x,
    where its 2x2 taps still reach every source pixel; area averaging beyond that, where
    bilinear would skip pixels and alias. OpenCV's SIMD resize is much faster than Pillow's
    (docs/benchmarks.md)."""
    height, width = size
    if pixels.shape[:2] == (height, width):
        return pixels
    shrink = max(pixels.shape[0] / height, pixels.shape[1] / width)
    method = cv2.INTER_LINEAR if shrink <= 2 else cv2.INTER_AREA
    return cv2.resize(np.ascontiguousarray(pixels), (width, height), interpolation=method)


def decode_image(data: bytes, size: tuple[int, int], max_pixels: int, name: str) -> np.ndarray:
    """Bytes of one image -> uint8 array of shape (height, width, 3)."""
    height, width = size
    if not data:
        raise DataError(f"{name}: image file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise DataError(
                    f"{name}: {im.width}x{im.height} pixels is over the limit of {max_pixels:,} "
                    f"(data.max_image_pixels); refusing a possible decompression bomb"
                )
            orientation = im.getexif().get(_ORIENTATION, 1)
            # Orientations 5-8 transpose the picture, so the stored picture's target swaps sides.
            stored_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            pixels = _turbo_decode(data, stored_size) if im.format == "JPEG" and im.mode in ("RGB", "L") else None
            if pixels is None:
                if im.format == "JPEG":  # CMYK, or what libjpeg-turbo refused: Pillow's own DCT scaling
                    im.draft("RGB", stored_size)
                im.load()
                pixels = np.asarray(to_rgb(im))
        if orientation in _UPRIGHT:
            pixels = np.asarray(Image.fromarray(pixels).transpose(_UPRIGHT[orientation]))
        return resize(pixels, size)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc})") from None


def _decode_chunk(locations: Sequence[Location], size: tuple[int, int], max_pixels: int) -> np.ndarray:
    out = np.empty((len(locations), size[0], size[1], 3), dtype=np.uint8)
    with ImageReader() as reader:
        for k, (file, member) in enumerate(locations):
            out[k] = decode_image(reader.read(file, member), size, max_pixels, describe_location(file, member))
    return out


def load_images(
    locations: Sequence[Location],
    size: tuple[int, int],
    max_pixels: int,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Decode all `locations` into an (N, H, W, 3) uint8 array, in order.

    `progress(n)` is called with the number of images finished after each chunk.
    """
    out = np.empty((len(locations), size[0], size[1], 3), dtype=np.uint8)
    chunks = [(i, locations[i : i + _CHUNK]) for i in range(0, len(locations), _CHUNK)]

    def work(start: int, chunk: Sequence[Location]) -> int:
        out[start : start + len(chunk)] = _decode_chunk(chunk, size, max_pixels)
        return len(chunk)

    # Threads, not processes: libjpeg-turbo and Pillow release the GIL while they decode
    # and resize, so threads use every core with no process start-up, no pickling of
    # pixels and no `if __name__ == "__main__"` requirement on the caller.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(work, start, chunk) for start, chunk in chunks]
        try:
            for future in futures:
                n = future.result()
                if progress:
                    progress(n)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return out


def save_image_array(path: Path, images: np.ndarray, image_ids: Sequence[str]) -> None:
    """One file holding pixels and ids together, so they can never get out of step."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, images=images, image_ids=np.asarray(image_ids, dtype=str))


def image_array_shape(path: Path | str) -> tuple[int, ...]:
    """Shape of the pixel array in a save_image_array file, from its header alone (no pixels read)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("images.npy") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(fh)
            return tuple(shape)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a valid image array file ({exc}); re-run preprocess") from None


def load_image_array(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(images, image_ids) as written by save_image_array; never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["images"], npz["image_ids"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a valid image array file ({exc}); re-run preprocess") from None
