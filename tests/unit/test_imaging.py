"""Unit tests for distributed_downloader.imaging; every image is generated in memory with Pillow."""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin

from distributed_downloader.errors import ErrorCode, ImageError
from distributed_downloader.imaging import process as imaging
from distributed_downloader.imaging.process import (
    IMAGE_FORMATS,
    ImageSettings,
    ProcessedImage,
    decode_stored_image,
    encode_image,
    process_image,
    resize_image,
    target_size,
)

# Source images are W x H = 240 x 160 and stored with a longer side of 100 -> (h, w) = (67, 100).
SRC_W, SRC_H = 240, 160
SMALL_SIZE = 100
RESIZED = (67, 100)


# --------------------------------------------------------------------------- helpers


def _save(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _gradient(w: int = SRC_W, h: int = SRC_H) -> Image.Image:
    """A colourful RGB test card: smooth gradients plus a solid block."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([255 * x // max(w - 1, 1), 255 * y // max(h - 1, 1), np.full_like(x, 96)], axis=-1)
    arr[h // 4 : h // 2, w // 4 : w // 2] = (20, 200, 40)
    return Image.fromarray(arr.astype(np.uint8))


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like content: low-frequency structure, sharp edges and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([128 + 100 * np.sin(x / 170.0) * np.cos(y / 230.0), 255 * x / w, 255 * y / h], axis=-1)
    arr[h // 4 : h // 2, w // 4 : w // 2] = (30, 200, 60)
    arr[h // 3 : h // 3 + 40, :] = (250, 250, 250)
    arr += rng.normal(0, 12, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _crafted_png(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height RGB pixels but whose IDAT holds almost nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _raw(data: bytes, image_size: int = SMALL_SIZE) -> tuple[ProcessedImage, np.ndarray]:
    """Process to raw_bgr and return the result plus the stored pixels as an RGB array."""
    out = process_image(data, ImageSettings(image_size=image_size, image_format="raw_bgr"))
    rgb = np.asarray(decode_stored_image(out.image, out.resized_size, "raw_bgr"))
    return out, rgb


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --------------------------------------------------------------------------- input builders


def _jpeg() -> bytes:
    return _save(_gradient(), "JPEG", quality=92)


def _jpeg_progressive() -> bytes:
    return _save(_gradient(), "JPEG", quality=92, progressive=True)


def _jpeg_cmyk() -> bytes:
    return _save(_gradient().convert("CMYK"), "JPEG", quality=92)


def _jpeg_gray() -> bytes:
    return _save(_gradient().convert("L"), "JPEG", quality=92)


def _png_rgb() -> bytes:
    return _save(_gradient(), "PNG")


def _png_rgba() -> bytes:
    img = _gradient().convert("RGBA")
    img.putalpha(Image.linear_gradient("L").resize(img.size))
    return _save(img, "PNG")


def _png_i16() -> bytes:
    arr = np.tile(np.linspace(0, 65535, SRC_W, dtype=np.uint16), (SRC_H, 1))
    return _save(Image.fromarray(arr), "PNG")


def _png_palette_transparent() -> bytes:
    img = _gradient().quantize(colors=16)
    return _save(img, "PNG", transparency=0)


def _gif_animated() -> bytes:
    frames = [Image.new("RGB", (SRC_W, SRC_H), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _bmp() -> bytes:
    return _save(_gradient(), "BMP")


def _tiff() -> bytes:
    return _save(_gradient(), "TIFF")


def _webp() -> bytes:
    return _save(_gradient(), "WEBP", quality=90)


def _webp_rgba() -> bytes:
    return _save(_gradient().convert("RGBA"), "WEBP", lossless=True)


INPUTS: dict[str, Callable[[], bytes]] = {
    "jpeg": _jpeg,
    "jpeg_progressive": _jpeg_progressive,
    "jpeg_cmyk": _jpeg_cmyk,
    "jpeg_gray": _jpeg_gray,
    "png_rgb": _png_rgb,
    "png_rgba": _png_rgba,
    "png_i16": _png_i16,
    "png_palette_transparent": _png_palette_transparent,
    "gif_animated": _gif_animated,
    "bmp": _bmp,
    "tiff": _tiff,
    "webp": _webp,
    "webp_rgba": _webp_rgba,
}


# --------------------------------------------------------------------------- target_size


@pytest.mark.parametrize(
    ("height", "width", "image_size", "expected"),
    [
        (2000, 3000, 720, (480, 720)),  # landscape
        (3000, 2000, 720, (720, 480)),  # portrait
        (1000, 1000, 720, (720, 720)),  # square
        (500, 300, 720, (500, 300)),  # smaller than the target: unchanged
        (720, 100, 720, (720, 100)),  # exactly the target: unchanged
        (160, 240, 100, (67, 100)),  # rounds 66.67 up
        (10000, 3, 720, (720, 1)),  # extreme aspect: shorter side never below 1
        (3, 10000, 720, (1, 720)),
        (1, 1, 1, (1, 1)),
    ],
)
def test_target_size(height: int, width: int, image_size: int, expected: tuple[int, int]) -> None:
    assert target_size(height, width, image_size) == expected


def test_target_size_rejects_non_positive() -> None:
    with pytest.raises(ValueError):
        target_size(0, 10, 720)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
@pytest.mark.parametrize("source", sorted(INPUTS))
def test_round_trip(source: str, image_format: str) -> None:
    data = INPUTS[source]()
    out = process_image(data, ImageSettings(image_size=SMALL_SIZE, image_format=image_format))

    assert out.original_size == (SRC_H, SRC_W)
    assert out.resized_size == RESIZED
    assert out.hashsum_original == _md5(data)
    assert out.hashsum_resized == _md5(out.image)
    if image_format == "raw_bgr":
        assert len(out.image) == RESIZED[0] * RESIZED[1] * 3

    stored = decode_stored_image(out.image, list(out.resized_size), image_format)
    assert stored.mode == "RGB"
    assert (stored.height, stored.width) == RESIZED


@pytest.mark.parametrize("source", ["jpeg", "png_rgb", "webp"])
def test_round_trip_keeps_colours(source: str) -> None:
    data = INPUTS[source]()
    _, rgb = _raw(data)
    expected = np.asarray(_gradient().resize((RESIZED[1], RESIZED[0]), Image.Resampling.LANCZOS))
    assert np.abs(rgb.astype(int) - expected.astype(int)).mean() < 3


def test_small_image_is_not_upscaled() -> None:
    data = _png_rgb()
    out, rgb = _raw(data, image_size=720)
    assert out.original_size == out.resized_size == (SRC_H, SRC_W)
    assert np.array_equal(rgb, np.asarray(_gradient()))  # lossless in, lossless out


# --------------------------------------------------------------------------- colour normalisation


def test_cmyk_jpeg_red() -> None:
    data = _save(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    _, rgb = _raw(data)
    assert np.abs(rgb.reshape(-1, 3).mean(axis=0) - (255, 0, 0)).max() < 4


def test_fully_transparent_png_is_white() -> None:
    data = _save(Image.new("RGBA", (64, 48), (200, 10, 10, 0)), "PNG")
    _, rgb = _raw(data)
    assert (rgb == 255).all()


def test_half_transparent_png_is_blended_on_white() -> None:
    data = _save(Image.new("RGBA", (64, 48), (255, 0, 0, 128)), "PNG")
    _, rgb = _raw(data)
    assert np.abs(rgb[0, 0].astype(int) - (255, 127, 127)).max() <= 1


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    arr = np.array([[65535, 32896, 1000, 0]], dtype=np.uint16).repeat(4, axis=0)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    _, rgb = _raw(_save(img, "PNG"))
    assert rgb[0, :, 0].tolist() == [255, 128, 4, 0]  # v / 257: clipping would give 255 for 1000
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_thirty_two_bit_int_gray_is_scaled() -> None:
    img = Image.new("I", (8, 8), 65535)
    _, rgb = _raw(_save(img, "TIFF"))
    assert (rgb == 255).all()


def test_palette_with_transparency_is_white_where_transparent() -> None:
    img = Image.new("P", (40, 20), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (20, 0, 40, 20))  # right half red, left half index 0 = transparent
    _, rgb = _raw(_save(img, "PNG", transparency=0))
    assert (rgb[:, :20] == 255).all()
    assert (rgb[:, 20:] == (255, 0, 0)).all()


def test_gif_animation_uses_first_frame() -> None:
    _, rgb = _raw(_gif_animated())
    assert (rgb == (255, 0, 0)).all()


def test_gif_with_transparency_is_white() -> None:
    img = Image.new("P", (30, 30), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 30, 15))
    _, rgb = _raw(_save(img, "GIF", transparency=0))
    assert (rgb[:15] == (0, 0, 255)).all()
    assert (rgb[15:] == 255).all()


def test_progressive_jpeg_decodes() -> None:
    data = _jpeg_progressive()
    assert Image.open(io.BytesIO(data)).info.get("progressive")
    out, rgb = _raw(data)
    assert out.resized_size == RESIZED
    assert rgb.std() > 10  # real content, not a blank frame


def test_raw_bgr_byte_order() -> None:
    data = _save(Image.new("RGB", (10, 6), (255, 0, 0)), "PNG")
    out = process_image(data, ImageSettings(image_format="raw_bgr"))
    assert out.image == bytes([0, 0, 255]) * 60


# --------------------------------------------------------------------------- EXIF orientation


def _oriented_jpeg(orientation: int, size: tuple[int, int] = (60, 40)) -> bytes:
    img = _gradient(*size)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(img, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_exif_transpose(orientation: int) -> None:
    data = _oriented_jpeg(orientation)
    out, rgb = _raw(data, image_size=720)  # no resize: pixels must match Pillow's reference exactly
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert out.original_size == reference.shape[:2]
    assert np.array_equal(rgb, reference)


def test_exif_orientation_6_swaps_sizes() -> None:
    out = process_image(_oriented_jpeg(6, (400, 200)), ImageSettings(image_size=100))
    assert out.original_size == (400, 200)  # stored 400 wide x 200 high, displayed upright
    assert out.resized_size == (100, 50)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_with_downscale_matches_reference(orientation: int) -> None:
    # Odd sizes exercise the draft() box; the result must match "orient, then LANCZOS" of the full image.
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(_photo(601, 397), "JPEG", quality=92, exif=exif.tobytes())
    out, rgb = _raw(data, image_size=SMALL_SIZE)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert out.original_size == (upright.height, upright.width)
    reference = upright.resize((out.resized_size[1], out.resized_size[0]), Image.Resampling.LANCZOS)
    assert _psnr(rgb, np.asarray(reference)) >= 35


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_corrupt_exif_is_ignored() -> None:
    data = _save(_gradient(), "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    out = process_image(data, ImageSettings(image_size=SMALL_SIZE))
    assert out.original_size == (SRC_H, SRC_W)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!DOCTYPE html><html><body>Not found</body></html>",
        b'{"error": "forbidden"}',
        np.random.default_rng(1).bytes(4096),
        b"\x89PNG\r\n\x1a\n",  # a signature alone
    ],
    ids=["empty", "html", "json", "random", "png_signature_only"],
)
def test_not_an_image(data: bytes) -> None:
    with pytest.raises(ImageError) as info:
        process_image(data, ImageSettings())
    assert info.value.code == ErrorCode.IMAGE_DECODE
    assert info.value.message


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("PNG", {}),
        ("WEBP", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
    ],
    ids=["jpeg", "jpeg_progressive", "png", "webp", "gif", "bmp", "tiff"],
)
def test_truncated_image(fmt: str, params: dict[str, object]) -> None:
    # Noise, so that half of the file cuts through the (first frame's) pixel data.
    noise = np.random.default_rng(2).integers(0, 256, (SRC_H, SRC_W, 3), dtype=np.uint8)
    data = _save(Image.fromarray(noise), fmt, **params)
    with pytest.raises(ImageError) as info:
        process_image(data[: len(data) // 2], ImageSettings(image_size=SMALL_SIZE))
    assert info.value.code == ErrorCode.IMAGE_DECODE
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_header_bomb_rejected_before_decoding() -> None:
    data = _crafted_png(30000, 30000)
    start = time.perf_counter()
    with pytest.raises(ImageError) as info:
        process_image(data, ImageSettings())
    assert time.perf_counter() - start < 5.0  # decoding 900 MP (2.7 GB of RGB) would take far longer
    # TOO_MANY_PIXELS (not a decode error about the empty IDAT) proves no pixel was decoded.
    assert info.value.code == ErrorCode.TOO_MANY_PIXELS


def test_own_pixel_cap_applies_under_pillows_limit() -> None:
    data = _crafted_png(2000, 2000)  # 4 MP: far under Pillow's global limit
    with pytest.raises(ImageError) as info:
        process_image(data, ImageSettings(max_image_pixels=1_000_000))
    assert info.value.code == ErrorCode.TOO_MANY_PIXELS
    assert "2000x2000" in info.value.message
    with pytest.raises(ImageError) as info:  # same bytes under the cap: now decoding fails
        process_image(data, ImageSettings(max_image_pixels=4_000_000))
    assert info.value.code == ErrorCode.IMAGE_DECODE


def test_pixel_cap_is_inclusive() -> None:
    data = _png_rgb()
    process_image(data, ImageSettings(max_image_pixels=SRC_W * SRC_H))
    with pytest.raises(ImageError) as info:
        process_image(data, ImageSettings(max_image_pixels=SRC_W * SRC_H - 1))
    assert info.value.code == ErrorCode.TOO_MANY_PIXELS


def test_unsupported_format_is_a_decode_error() -> None:
    # TGA has no magic number: without the input allow-list Pillow would "decode" many bodies as TGA.
    with pytest.raises(ImageError) as info:
        process_image(_save(_gradient(), "TGA"), ImageSettings())
    assert info.value.code == ErrorCode.IMAGE_DECODE


def test_unexpected_exception_becomes_image_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(img: Image.Image) -> Image.Image:
        raise RuntimeError("boom")

    monkeypatch.setattr(imaging, "_normalise", boom)
    with pytest.raises(ImageError) as info:
        process_image(_png_rgb(), ImageSettings())
    assert info.value.code == ErrorCode.IMAGE_DECODE
    assert info.value.message == "RuntimeError: boom"


def test_global_pillow_state_untouched() -> None:
    before = Image.MAX_IMAGE_PIXELS
    for data in (_jpeg(), _crafted_png(30000, 30000), b"junk"):
        with contextlib.suppress(ImageError):
            process_image(data, ImageSettings(max_image_pixels=10))
    assert before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------- decode_stored_image


def test_decode_stored_raw_bgr_size_mismatch() -> None:
    out = process_image(_png_rgb(), ImageSettings(image_size=SMALL_SIZE, image_format="raw_bgr"))
    with pytest.raises(ImageError) as info:
        decode_stored_image(out.image, (RESIZED[0] + 1, RESIZED[1]), "raw_bgr")
    assert info.value.code == ErrorCode.IMAGE_DECODE
    with pytest.raises(ImageError):
        decode_stored_image(out.image[:-1], RESIZED, "raw_bgr")


@pytest.mark.parametrize("image_format", ["jpeg", "webp", "png"])
def test_decode_stored_encoded_errors(image_format: str) -> None:
    out = process_image(_png_rgb(), ImageSettings(image_size=SMALL_SIZE, image_format=image_format))
    with pytest.raises(ImageError) as info:
        decode_stored_image(out.image, (RESIZED[1], RESIZED[0]), image_format)  # swapped h, w
    assert info.value.code == ErrorCode.IMAGE_DECODE
    with pytest.raises(ImageError) as info:
        decode_stored_image(out.image[: len(out.image) // 2], RESIZED, image_format)
    assert info.value.code == ErrorCode.IMAGE_DECODE
    with pytest.raises(ImageError):
        decode_stored_image(b"not an image", RESIZED, image_format)


def test_decode_stored_raw_bgr_pixels() -> None:
    raw = bytes([0, 0, 255, 0, 255, 0, 255, 0, 0])  # red, green, blue in BGR
    img = decode_stored_image(raw, [1, 3], "raw_bgr")
    assert [img.getpixel((x, 0)) for x in range(3)] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


# --------------------------------------------------------------------------- encode / resize helpers


def test_resize_image() -> None:
    img = _gradient(300, 100)
    assert resize_image(img, 300) is img
    assert resize_image(img, 500) is img
    assert resize_image(img, 150).size == (150, 50)


def test_encode_image_formats() -> None:
    img = _gradient(30, 20)
    for image_format in IMAGE_FORMATS:
        data = encode_image(img, ImageSettings(image_format=image_format))
        back = decode_stored_image(data, (20, 30), image_format)
        assert back.size == (30, 20)
    assert encode_image(img, ImageSettings(image_format="raw_bgr")) == np.asarray(img)[:, :, ::-1].tobytes()


def test_settings_validation() -> None:
    with pytest.raises(ValueError):
        ImageSettings(image_format="gif")
    with pytest.raises(ValueError):
        ImageSettings(image_size=0)
    with pytest.raises(ValueError):
        ImageSettings(jpeg_quality=101)


def test_extreme_aspect_image() -> None:
    data = _save(_gradient(2000, 3), "PNG")
    out = process_image(data, ImageSettings(image_size=720, image_format="raw_bgr"))
    assert out.original_size == (3, 2000)
    assert out.resized_size == (1, 720)
    assert len(out.image) == 720 * 3


# --------------------------------------------------------------------------- quality and speed path


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return _save(_photo(3000, 2000), "JPEG", quality=90)


def test_downscale_quality_matches_lanczos(big_jpeg: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    scales: list[int] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> object:
        result = original_draft(self, mode, size)
        scales.append(self.decoderconfig[0] if self.decoderconfig else 1)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out, rgb = _raw(big_jpeg, image_size=720)
    assert out.original_size == (2000, 3000)  # the true size, not the draft size
    assert out.resized_size == (480, 720)
    assert scales == [4]  # libjpeg decoded at 1/4 scale (750x500) rather than full size

    reference = Image.open(io.BytesIO(big_jpeg)).convert("RGB").resize((720, 480), Image.Resampling.LANCZOS)
    assert _psnr(rgb, np.asarray(reference)) >= 35


# --------------------------------------------------------------------------- threads


def test_thread_safety() -> None:
    jobs = [
        (INPUTS[source](), ImageSettings(image_size=size, image_format=image_format))
        for source in sorted(INPUTS)
        for image_format in IMAGE_FORMATS
        for size in (SMALL_SIZE, 720)
    ]
    jobs.append((_crafted_png(30000, 30000), ImageSettings()))
    jobs.append((b"<html></html>", ImageSettings()))

    def run(job: tuple[bytes, ImageSettings]) -> tuple[object, ...]:
        try:
            out = process_image(*job)
        except ImageError as exc:
            return ("error", exc.code)
        return (out.hashsum_original, out.hashsum_resized, out.original_size, out.resized_size)

    serial = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            assert list(pool.map(run, jobs)) == serial
