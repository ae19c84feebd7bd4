"""Turn a downloaded body into the stored image: decode, orient, normalise to RGB, downscale, encode.

``process_image`` is the hot path (called from many threads on ~200M images), so it never touches
global Pillow state, decodes JPEGs at a reduced DCT scale when possible, and resizes the small
image before applying the EXIF orientation.  Everything that is not a good image becomes an
``ImageError`` with a negative code.  Each decode first reserves its working memory, estimated from
the header, from a per-process budget (``decode_budget``), so a burst of large images waits instead
of taking the node's memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import ExifTags, Image

from distributed_downloader.errors import ErrorCode, ImageError
from distributed_downloader.imaging import decode_budget

IMAGE_FORMATS = ("jpeg", "webp", "png", "raw_bgr")

# Input formats we accept.  An explicit list keeps plugins without a magic number (TGA, ...)
# from "decoding" random bytes, and limits the parsers exposed to untrusted data.
# (The JPEG opener also yields MPO, the multi-picture JPEG many cameras write.)
# Pillow registers its plugins lazily; doing it once here avoids the first calls racing to do it and
# lets us drop formats this Pillow build lacks (Image.open raises KeyError on unknown names).
Image.init()
INPUT_FORMATS = tuple(f for f in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP") if f in Image.OPEN)

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# EXIF orientation -> the transpose that makes the image upright (same table as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

# Spend at least this much resolution margin in reduce() before the final LANCZOS pass (Pillow's
# ``reducing_gap``): the box-reduced intermediate stays >= 1.5x the target, so the result is within a
# fraction of a dB of a full LANCZOS resize at a fraction of the cost. 1.5, not 2.0 (issue #16): a
# 2400x1600 PNG -> 720x480 gets reduce(2) first instead of a 3.3x LANCZOS pass, 128 -> 113 ms CPU
# per image, stored JPEG q90 vs a float LANCZOS reference 37.79 -> 37.73 dB PSNR, SSIM 0.9896 ->
# 0.9894 (1.0 saves 34 ms but costs 0.27 dB). JPEGs are unaffected: after their DCT draft the
# factor left is < 2, too small for any reduce() at either gap.
_REDUCING_GAP = 1.5

# Decode budget: peak RSS growth of one process_image, in bytes per pixel of the decoded (drafted) size,
# by mode after open; measured with bench/decode_memory_bench.py (4096x4096, image_size 720) and
# rounded up by ~1 (see bench/README.md).  It counts the decoded image and the copies the pipeline
# makes of it: RGBA 4 + white RGB 4 + the first reduce(); 16-bit 2 + the 1-byte L; ...  Small
# images measure a little less, the fixed per-tile buffers of the 16-bit path included.
_BYTES_PER_PIXEL: dict[str, int] = {
    "1": 3,  # measured 2.1
    "L": 2,  # 1.1
    "P": 7,  # 6.2 (GIF: P, then a 4-byte RGB copy)
    "LA": 13,  # 12.0 (LA is stored in 4 bytes, then RGBA and the white RGB)
    "La": 13,
    "PA": 13,
    "RGB": 6,  # 5.2
    "RGBA": 10,  # 9.2 (16-bit RGBA PNGs open as RGBA too)
    "RGBa": 10,
    "RGBX": 6,
    "CMYK": 10,  # 9.2
    "YCbCr": 10,
    "I;16": 4,  # 3.1 with or without a tRNS key (20.6-21.6 with the former int64 copies)
    "I;16L": 4,
    "I;16B": 4,
    "I;16N": 4,
    "I": 6,  # 5.2 (24.7 before)
    "F": 6,  # 5.1
}
_BYTES_PER_PIXEL_OTHER = 13  # LAB, HSV, ...: a 4-byte image and two 4-byte converted copies, with margin
# A transparency key (tRNS, GIF transparent index) converts to RGBA and composites onto a white RGB.
_BYTES_PER_PIXEL_KEYED: dict[str, int] = {"1": 10, "L": 10, "P": 10, "RGB": 13}  # P 9.0, RGB 12.0
# WebP: libwebp's canvas and the frame's bytes come on top of Pillow's image (RGB 16.3, RGBA 17.2).
_BYTES_PER_PIXEL_WEBP = 18
# A progressive JPEG keeps every DCT coefficient (2 bytes a sample) at full size, whatever the
# draft scale: 3.0 bytes per pixel at 4:2:0, 6.0 at 4:4:4 (a baseline JPEG streams: 0.3).
_JPEG_COEFFICIENT_BYTES = 2

# Pixels converted at a time by the 16-bit path: bounds its int64 working copy to 2 MB per thread.
_TILE_PIXELS = 1 << 18


@dataclass(frozen=True)
class ImageSettings:
    image_size: int = 720  # longer side after resize (only downscale)
    image_format: str = "jpeg"  # one of IMAGE_FORMATS
    jpeg_quality: int = 90  # also used as webp quality
    max_image_pixels: int = 178_956_970  # decompression-bomb guard: width*height cap, checked from the header
    # Process-wide cap on the estimated working memory of the decodes in flight (0: no cap); see decode_budget.
    decode_memory_mb: int = 1024

    @classmethod
    def from_config(cls, params: Mapping[str, Any]) -> ImageSettings:
        """From the config's ``downloader_parameters``."""
        return cls(
            image_size=params["image_size"],
            image_format=params["image_format"],
            jpeg_quality=params["jpeg_quality"],
            max_image_pixels=params["max_image_pixels"],
            decode_memory_mb=params["decode_memory_mb"],
        )

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [0, 100], got {self.jpeg_quality}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.decode_memory_mb < 0:
            raise ValueError(f"decode_memory_mb must be >= 0, got {self.decode_memory_mb}")


@dataclass(frozen=True)
class ProcessedImage:
    original_size: tuple[int, int]  # (height, width) of the decoded original (after EXIF orientation)
    resized_size: tuple[int, int]  # (height, width) of the stored image
    image: bytes  # stored bytes, encoded per image_format
    hashsum_original: str  # md5 hex of the downloaded bytes
    hashsum_resized: str  # md5 hex of `image`


def target_size(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(height, width) after a downscale-only resize so that the longer side is ``image_size``.

    The shorter side is scaled with the same factor, rounded (Python ``round``) and kept >= 1.
    Sizes already within ``image_size`` are returned unchanged.
    """
    if height < 1 or width < 1 or image_size < 1:
        raise ValueError(f"sizes must be positive, got {height}x{width} -> {image_size}")
    longer = max(height, width)
    if longer <= image_size:
        return height, width
    if height >= width:
        return image_size, max(1, round(width * image_size / height))
    return max(1, round(height * image_size / width)), image_size


def _md5(data: bytes) -> str:
    # Content fingerprint, not a security feature (keeps FIPS-mode Pythons happy).
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8); 1 when absent or when the EXIF block is unreadable."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # corrupt EXIF must not cost us an otherwise good image
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION_TRANSPOSE else 1


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int) grayscale -> 8-bit ``L`` by scaling, not clipping; a tRNS key becomes white.

    Converts tile by tile: a whole-image int64 copy cost ~20 bytes per pixel (3.4 GB for a small
    PNG at the pixel cap); here the only full-size allocation is the 1-byte output.
    """
    width, height = img.size
    key = img.info.get("transparency")
    out = np.empty((height, width), np.uint8)
    rows = max(1, _TILE_PIXELS // width)
    cols = min(width, _TILE_PIXELS)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        for left in range(0, width, cols):
            right = min(width, left + cols)
            tile = np.asarray(img.crop((left, top, right, bottom)))
            wide = tile.astype(np.int64)
            np.clip(wide, 0, 65535, out=wide)
            wide += 128
            wide //= 257  # round(v * 255 / 65535)
            block = out[top:bottom, left:right]
            block[...] = wide
            if isinstance(key, int):
                # The key is binary transparency: composited on white it is white, any other pixel is
                # its own gray (what the LA -> RGBA -> paste-on-white path gave, one byte per pixel).
                block[tile == key] = 255
    return Image.fromarray(out)  # mode L, sharing out's memory


def _normalise(img: Image.Image) -> Image.Image:
    """Any decoded mode -> ``RGB`` or ``L`` (8-bit); transparency is composited on white.

    ``L`` is kept as is so that the resize works on one channel; callers convert it to RGB after.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_l(img)
    if img.mode in _ALPHA_MODES or img.has_transparency_data:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, (0, 0), rgba)  # alpha blend: a*c + (1-a)*255
        return background
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("1", "F"):
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, P, LAB, HSV, ...


def _downscale(
    img: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float] | None = None
) -> Image.Image:
    """LANCZOS resize to ``size`` (w, h) with integer box reduce() first for large factors."""
    if img.size == size and box is None:
        return img
    return img.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=_REDUCING_GAP)


def resize_image(img: Image.Image, image_size: int) -> Image.Image:
    """Downscale-only resize of an RGB image so that its longer side is ``image_size``.

    Uses reduce() (box average) for large integer factors, then LANCZOS.  Returns ``img`` itself
    when it is already small enough.
    """
    width, height = img.size
    th, tw = target_size(height, width, image_size)
    if (th, tw) == (height, width):
        return img
    return _downscale(img, (tw, th))


def encode_image(img: Image.Image, settings: ImageSettings) -> bytes:
    """Encode an RGB image per ``settings.image_format``; other modes are normalised to RGB first."""
    if img.mode != "RGB":
        img = _normalise(img).convert("RGB")
    fmt = settings.image_format
    if fmt == "raw_bgr":
        return np.asarray(img, dtype=np.uint8)[:, :, ::-1].tobytes()
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=settings.jpeg_quality, optimize=False)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=settings.jpeg_quality, method=4)
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {fmt!r}")
    return buf.getvalue()


def _open(data: bytes, max_image_pixels: int) -> Image.Image:
    """Identify the image and enforce the pixel cap from the header, before any pixel is decoded."""
    if not data:
        raise ImageError(ErrorCode.IMAGE_DECODE, "empty body")
    try:
        img = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own (global) guard fired first; it is only ever stricter than 2x its limit.
        raise ImageError(ErrorCode.TOO_MANY_PIXELS, f"decompression bomb guard: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(ErrorCode.IMAGE_DECODE, f"not a supported image (body starts with {data[:16]!r})") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(ErrorCode.IMAGE_DECODE, f"image has an empty size {width}x{height}")
    if width * height > max_image_pixels:
        raise ImageError(
            ErrorCode.TOO_MANY_PIXELS,
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_image_pixels}",
        )
    return img


def _reservation(img: Image.Image, header_size: tuple[int, int]) -> int:
    """Bytes ``_decode`` holds at its peak for ``img`` (opened and drafted, not loaded)."""
    width, height = img.size  # the drafted size: what is decoded
    if img.format == "WEBP":
        per_pixel = _BYTES_PER_PIXEL_WEBP
    elif "transparency" in img.info and img.mode in _BYTES_PER_PIXEL_KEYED:
        per_pixel = _BYTES_PER_PIXEL_KEYED[img.mode]
    else:
        per_pixel = _BYTES_PER_PIXEL.get(img.mode, _BYTES_PER_PIXEL_OTHER)
    total = width * height * per_pixel
    if img.format in ("JPEG", "MPO") and (img.info.get("progressive") or img.info.get("progression")):
        samples = header_size[0] * header_size[1] * _jpeg_samples_per_pixel(img)
        total += int(samples * _JPEG_COEFFICIENT_BYTES)
    return total


def _jpeg_samples_per_pixel(img: Image.Image) -> float:
    """Samples per pixel of a JPEG from its components' sampling factors (4:2:0 RGB: 1.5)."""
    layers = getattr(img, "layer", None) or []
    try:
        hmax = max(h for _, h, _, _ in layers)
        vmax = max(v for _, _, v, _ in layers)
        return sum(h * v for _, h, v, _ in layers) / (hmax * vmax)
    except (TypeError, ValueError, ZeroDivisionError):  # no or odd SOF info: assume no subsampling
        return float(len(img.getbands()))


def _prepare(
    data: bytes, settings: ImageSettings
) -> tuple[Image.Image, tuple[int, int], tuple[int, int], tuple[float, float, float, float] | None]:
    """Open, check the pixel cap, and draft: (image, (height, width), target (h, w), draft box)."""
    img = _open(data, settings.max_image_pixels)
    width, height = img.size  # the true size: draft() below changes img.size
    th, tw = target_size(height, width, settings.image_size)  # in stored (pre-orientation) axes
    box: tuple[float, float, float, float] | None = None
    if (th, tw) != (height, width):
        # JPEG only (a no-op returning None elsewhere): libjpeg decodes at 1/2, 1/4 or 1/8 scale while
        # staying >= the target; box maps the (rounded-up) scaled image back onto the exact original area.
        drafted = img.draft("RGB", (tw, th))
        if drafted is not None:
            box = drafted[1]
    return img, (height, width), (th, tw), box


OVERSIZE_FACTOR = 2  # an image alone may reserve up to this many times the budget (2 GB at the default)


def decode_reservation(data: bytes, settings: ImageSettings) -> int:
    """Bytes ``process_image`` reserves from the decode budget for ``data`` (reads the header only).

    Raises ``ImageError`` like ``process_image`` for a body it would refuse before decoding.
    """
    img, (height, width), _, _ = _prepare(data, settings)
    return _reservation(img, (width, height))


def _process(
    data: bytes, settings: ImageSettings, budget: decode_budget.DecodeBudget | None, original_md5: str | None
) -> ProcessedImage:
    img, size, target, box = _prepare(data, settings)
    if budget is None:
        return _decode(img, data, settings, size, target, box, original_md5)
    # Reserved from the header (after draft(), so a JPEG pays for its reduced scale only), before
    # any pixel is decoded; released when the full-size copies are gone, even on error.
    need = _reservation(img, (size[1], size[0]))
    if need > OVERSIZE_FACTOR * budget.capacity:
        # One decode alone may go past the budget (it waits until it runs alone), but not this far:
        # within the pixel cap a WebP or a gray+alpha PNG needs 2-3 GB, a rank's whole memory share.
        raise ImageError(
            ErrorCode.TOO_MANY_PIXELS,
            f"decoding it needs ~{need / 2**20:.0f} MB, over {OVERSIZE_FACTOR}x decode_memory_mb "
            f"({budget.capacity / 2**20:.0f} MB); raise decode_memory_mb to store such images",
        )
    with budget.reserve(need):
        return _decode(img, data, settings, size, target, box, original_md5)


def _decode(
    img: Image.Image,
    data: bytes,
    settings: ImageSettings,
    size: tuple[int, int],
    target: tuple[int, int],
    box: tuple[float, float, float, float] | None,
    original_md5: str | None = None,
) -> ProcessedImage:
    height, width = size
    th, tw = target
    img.load()  # raises on truncated/corrupt data (LOAD_TRUNCATED_IMAGES stays False)
    orientation = _orientation(img)

    out = _normalise(img)
    if (th, tw) != (height, width):
        out = _downscale(out, (tw, th), box)
    if out.mode != "RGB":
        out = out.convert("RGB")
    if orientation != 1:
        # Orient last: transposing the small image is cheaper than the full-size one.
        out = out.transpose(_ORIENTATION_TRANSPOSE[orientation])
    if orientation in _SWAPS_AXES:
        height, width = width, height

    encoded = encode_image(out, settings)
    return ProcessedImage(
        original_size=(height, width),
        resized_size=(out.height, out.width),
        image=encoded,
        hashsum_original=original_md5 or _md5(data),
        hashsum_resized=_md5(encoded),
    )


def process_image(
    data: bytes,
    settings: ImageSettings,
    budget: decode_budget.DecodeBudget | None = None,
    original_md5: str | None = None,
) -> ProcessedImage:
    """Decode, orient, normalise, resize and encode a downloaded body.

    ``original_md5``: the MD5 hex of ``data`` when the caller already has it (the fetch hashes the
    body as it reads it: no second pass over a multi-MB original); computed here otherwise.

    Raises ``ImageError`` (and nothing else) with ``TOO_MANY_PIXELS`` for images over
    ``settings.max_image_pixels`` and ``IMAGE_DECODE`` for anything that is not a good image.

    Safe to call from many threads: each decode first reserves its working memory from ``budget``
    (default: the process's shared budget of ``settings.decode_memory_mb``; none when that is 0)
    and waits while the decodes in flight hold too much.
    """
    if budget is None and settings.decode_memory_mb > 0:
        budget = decode_budget.shared(settings.decode_memory_mb * 2**20)
    try:
        return _process(data, settings, budget, original_md5)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # e.g. a GIF frame or TIFF tile larger than the header said
        raise ImageError(ErrorCode.TOO_MANY_PIXELS, f"decompression bomb guard: {exc}") from None
    except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error, zlib.error, MemoryError...
        raise ImageError(ErrorCode.IMAGE_DECODE, f"{type(exc).__name__}: {exc}") from None


def decode_threads() -> int:
    """Threads a process decodes images on: the cores it may run on.

    Under Slurm that is the rank's ``cpus_per_task`` (= ``cpu_per_worker``); under a plain
    ``mpiexec`` every rank may use every core (one rank may hold every lane while the other idles).
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _decode_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=decode_threads(), thread_name_prefix="decode")
        return _pool


def process_image_pooled(data: bytes, settings: ImageSettings, original_md5: str | None = None) -> ProcessedImage:
    """``process_image`` on the process's few decode threads (``decode_threads``), waiting for it.

    A rank downloads on hundreds of threads (lanes x connections). Decoding on each of them made
    dozens of multi-MB decodes share two cores at once: their working sets evicted each other from
    the caches, and every Python step of each waited in a GIL convoy with the rest (the fetches of
    the lane's other connections included, which then read their bodies late). Here at most one
    decode per core runs, start to end, while the fetch threads only wait (Pillow and hashlib
    release the GIL in decode, resize, encode and MD5, so these threads do use every core).
    Raises what ``process_image`` raises.
    """
    return _decode_pool().submit(process_image, data, settings, None, original_md5).result()


def decode_stored_image(image: bytes, resized_size: tuple[int, int] | list[int], image_format: str) -> Image.Image:
    """Decode a stored image back to an RGB ``PIL.Image`` (inverse of ``encode_image``).

    ``resized_size`` is the row's (height, width); raw_bgr bytes are reshaped with it and encoded
    formats must match it.  Raises ``ImageError(IMAGE_DECODE)`` on corrupt data or a size mismatch.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    try:
        height, width = (int(v) for v in resized_size)
    except (TypeError, ValueError):
        raise ImageError(ErrorCode.IMAGE_DECODE, f"bad resized_size {resized_size!r}") from None
    if height < 1 or width < 1:
        raise ImageError(ErrorCode.IMAGE_DECODE, f"bad resized_size {resized_size!r}")

    if image_format == "raw_bgr":
        expected = height * width * 3
        if len(image) != expected:
            raise ImageError(
                ErrorCode.IMAGE_DECODE,
                f"raw_bgr has {len(image)} bytes, expected {expected} for {height}x{width}x3",
            )
        return Image.frombytes("RGB", (width, height), image, "raw", "BGR")

    try:
        img = Image.open(io.BytesIO(image), formats=(image_format.upper(),))
        if img.size != (width, height):  # checked before decoding any pixel
            raise ImageError(
                ErrorCode.IMAGE_DECODE,
                f"stored {image_format} is {img.height}x{img.width}, row says {height}x{width}",
            )
        img.load()
        return img if img.mode == "RGB" else _normalise(img).convert("RGB")
    except ImageError:
        raise
    except Exception as exc:  # corrupt stored bytes of any kind
        raise ImageError(ErrorCode.IMAGE_DECODE, f"{type(exc).__name__}: {exc}") from None
