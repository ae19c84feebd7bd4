"""Decode + resize + encode throughput per core: imaging.process_image vs an OpenCV pipeline.

    python bench/image_bench.py               # 3000x2000 JPEGs, 1600x1200 PNGs, GIF/WebP/BMP/TIFF
    python bench/image_bench.py --seconds 5   # longer timing per format

OpenCV is only needed here:  pip install opencv-python-headless
(without it, only our pipeline is timed).

The OpenCV pipeline is img2dataset's: cv2.imdecode(IMREAD_UNCHANGED) -> alpha composited on
white -> cv2.resize(INTER_AREA) to the same target size -> cv2.imencode(".jpg", quality 90).
Ours: imaging.process_image(image_size=720, jpeg quality 90): decode (JPEG at a reduced DCT scale),
normalise, LANCZOS (after a box reduce), encode, MD5s. One core each (this process is pinned,
cv2.setNumThreads(1)); images are synthetic but photo-like (smooth fields, edges, fine noise).
Quality: PSNR and SSIM (numpy, 11x11 Gaussian window sigma 1.5, on luminance) of each stored JPEG
against a reference resize: full decode, LANCZOS in float32 per channel, no JPEG.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
from PIL import Image

from distributed_downloader.imaging import process as imaging

IMAGE_SIZE = 720
QUALITY = 90


# ---------------------------------------------------------------- test images


def photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour fields + a few hard-edged shapes + fine grain: compresses like a photo."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), np.float32)
    for scale, amplitude in ((8, 90.0), (40, 40.0), (160, 18.0)):
        coarse = rng.normal(0, 1, size=(scale * height // width + 2, scale + 2, 3)).astype(np.float32)
        field = np.asarray(
            Image.fromarray(((coarse - coarse.min()) / np.ptp(coarse) * 255).astype(np.uint8)).resize(
                (width, height), Image.Resampling.BICUBIC
            ),
            np.float32,
        )
        out += (field - 128) * amplitude / 128
    out += 128
    ys, xs = np.mgrid[0:height, 0:width]
    for _ in range(6):  # edges: discs and bars
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(height // 20, height // 5)
        out[(xs - cx) ** 2 + (ys - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
        x0 = rng.integers(0, width - 10)
        out[:, x0 : x0 + rng.integers(3, 12)] *= 0.5
    out += rng.normal(0, 4, size=out.shape).astype(np.float32)  # sensor grain
    return np.clip(out, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img = Image.fromarray(pixels)
    if fmt == "JPEG":
        img.save(buffer, "JPEG", quality=92)
    elif fmt == "PNG":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.fromarray(np.full(pixels.shape[:2], 200, np.uint8)))
        rgba.save(buffer, "PNG", compress_level=6)
    elif fmt == "GIF":
        img.quantize(colors=256).save(buffer, "GIF")
    else:
        img.save(buffer, fmt)
    return buffer.getvalue()


def corpus() -> dict[str, list[bytes]]:
    groups = {
        "JPEG 3000x2000": [encode(photo_like(3000, 2000, s), "JPEG") for s in range(6)],
        "PNG 1600x1200 RGBA": [encode(photo_like(1600, 1200, 10 + s), "PNG") for s in range(3)],
    }
    others = []
    for s, fmt in enumerate(("GIF", "WEBP", "BMP", "TIFF")):
        others.append(encode(photo_like(1600, 1200, 20 + s), fmt))
    groups["GIF/WebP/BMP/TIFF 1600x1200"] = others
    return groups


# ---------------------------------------------------------------- pipelines


def ours(data: bytes) -> bytes:
    settings = imaging.ImageSettings(image_size=IMAGE_SIZE, image_format="jpeg", jpeg_quality=QUALITY)
    return imaging.process_image(data, settings).image


def opencv(data: bytes) -> bytes:
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:  # cv2 decodes no GIF: img2dataset would fail the sample
        raise ValueError("cv2 cannot decode")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255
        img = (img[:, :, :3].astype(np.float32) * alpha + 255 * (1 - alpha)).astype(np.uint8)
    height, width = img.shape[:2]
    th, tw = imaging.target_size(height, width, IMAGE_SIZE)
    if (th, tw) != (height, width):
        img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
    assert ok
    return encoded.tobytes()


def images_per_second(pipelines: list, images: list[bytes], seconds: float) -> list[float]:  # noqa: ANN001
    """img/s of each pipeline: alternating rounds over `images` (fair on a busy machine), median per pipeline."""
    for pipeline in pipelines:  # warm-up, and fail early
        for data in images:
            pipeline(data)
    rates: list[list[float]] = [[] for _ in pipelines]
    deadline = time.perf_counter() + seconds * len(pipelines)
    while time.perf_counter() < deadline or len(rates[0]) < 3:
        for i, pipeline in enumerate(pipelines):
            started = time.perf_counter()
            for data in images:
                pipeline(data)
            rates[i].append(len(images) / (time.perf_counter() - started))
    return [float(np.median(r)) for r in rates]


# ---------------------------------------------------------------- quality


def reference(data: bytes) -> np.ndarray:
    """Full decode, alpha on white, LANCZOS in float32 per channel to the target size."""
    img = Image.open(io.BytesIO(data))
    img.load()
    rgba = img.convert("RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, (0, 0), rgba)
    th, tw = imaging.target_size(white.height, white.width, IMAGE_SIZE)
    channels = [
        np.asarray(Image.fromarray(np.asarray(white, np.float32)[:, :, c]).resize((tw, th), Image.Resampling.LANCZOS))
        for c in range(3)
    ]
    return np.stack(channels, axis=2)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _gaussian_blur(image: np.ndarray, sigma: float = 1.5, size: int = 11) -> np.ndarray:
    """Separable Gaussian filter, 'valid' region only (as in the SSIM paper's reference code)."""
    x = np.arange(size) - size // 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    w /= w.sum()
    rows = sum(w[k] * image[:, k : image.shape[1] - size + 1 + k] for k in range(size))
    return sum(w[k] * rows[k : rows.shape[0] - size + 1 + k, :] for k in range(size))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two RGB images on luminance (Wang et al. 2004; K1=0.01, K2=0.03, L=255)."""
    x, y = _luma(a.astype(np.float64)), _luma(b.astype(np.float64))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _gaussian_blur(x), _gaussian_blur(y)
    sxx = _gaussian_blur(x * x) - mx * mx
    syy = _gaussian_blur(y * y) - my * my
    sxy = _gaussian_blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(value.mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def decode_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)


def quality(pipeline, images: list[bytes]) -> tuple[float, float]:  # noqa: ANN001
    scores = []
    for data in images:
        ref = reference(data)
        out = decode_rgb(pipeline(data))
        assert out.shape == ref.shape, (out.shape, ref.shape)
        scores.append((psnr(out, np.clip(ref, 0, 255)), ssim(out, np.clip(ref, 0, 255))))
    return float(np.mean([p for p, _ in scores])), float(np.mean([s for _, s in scores]))


# ---------------------------------------------------------------- where our time goes


def breakdown(data: bytes, repeats: int = 5) -> dict[str, float]:
    """ms per stage of our pipeline on one large JPEG (same calls as imaging._process)."""
    settings = imaging.ImageSettings(image_size=IMAGE_SIZE, jpeg_quality=QUALITY)
    times: dict[str, float] = {"open+draft+decode": 0.0, "resize": 0.0, "encode": 0.0, "md5 x2": 0.0}
    for _ in range(repeats):
        t0 = time.perf_counter()
        img = imaging._open(data, settings.max_image_pixels)
        height, width = img.height, img.width
        th, tw = imaging.target_size(height, width, IMAGE_SIZE)
        drafted = img.draft("RGB", (tw, th))
        img.load()
        t1 = time.perf_counter()
        out = imaging._downscale(imaging._normalise(img), (tw, th), drafted[1] if drafted else None)
        t2 = time.perf_counter()
        encoded = imaging.encode_image(out, settings)
        t3 = time.perf_counter()
        imaging._md5(data), imaging._md5(encoded)
        t4 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[key] += value * 1000 / repeats
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per format and pipeline")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    try:
        import cv2

        cv2.setNumThreads(1)
        have_cv2 = True
    except ImportError:
        print("OpenCV is not installed: only our pipeline is timed.")
        print("For the comparison: pip install opencv-python-headless")
        have_cv2 = False
    started = time.monotonic()
    groups = corpus()
    print(
        f"image bench: one core, image_size {IMAGE_SIZE}, JPEG quality {QUALITY}; corpus built in "
        f"{time.monotonic() - started:.0f}s (mean sizes: "
        + ", ".join(f"{name} {np.mean([len(d) for d in ds]) / 1e6:.2f} MB" for name, ds in groups.items())
        + ")"
    )
    for name, images in groups.items():
        line = f"  {name:28s}"
        theirs = None
        decodable = images
        if have_cv2:
            decodable = [
                d for d in images if cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_UNCHANGED) is not None
            ]
        skipped = len(images) - len(decodable)
        if have_cv2 and decodable:
            mine, theirs = images_per_second([ours, opencv], decodable, args.seconds)
            line += f" ours {mine:6.1f} img/s | OpenCV {theirs:6.1f} img/s | ours/OpenCV x{mine / theirs:.2f}"
            line += f" (on the {len(decodable)} images cv2 decodes; it cannot read GIF)" if skipped else ""
        else:
            (mine,) = images_per_second([ours], images, args.seconds)
            line += f" ours {mine:6.1f} img/s"
        print(line, flush=True)
        if name.startswith("JPEG"):
            p, s = quality(ours, images)
            line = f"      quality vs float LANCZOS reference: ours PSNR {p:.2f} dB SSIM {s:.4f}"
            if have_cv2:
                p, s = quality(opencv, images)
                line += f" | OpenCV PSNR {p:.2f} dB SSIM {s:.4f}"
            print(line)
            stages = breakdown(images[0])
            print("      ours, ms per 3000x2000 JPEG: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
            if theirs is not None:
                print(f"      goal: ours >= 1.5x OpenCV on large JPEGs: {'met' if mine >= 1.5 * theirs else 'MISSED'}")
        elif name.startswith("PNG"):
            p, s = quality(ours, images)
            line = f"      quality vs float LANCZOS reference: ours PSNR {p:.2f} dB SSIM {s:.4f}"
            if have_cv2:
                p, s = quality(opencv, images)
                line += f" | OpenCV PSNR {p:.2f} dB SSIM {s:.4f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
