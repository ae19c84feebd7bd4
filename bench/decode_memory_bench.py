"""Decode memory of imaging.process_image: bytes per pixel per input mode, and peak RSS of many threads.

    python bench/decode_memory_bench.py                      # both parts, 4096x4096 images, 16 threads
    python bench/decode_memory_bench.py --part modes         # bytes per pixel of one decode, per input kind
    python bench/decode_memory_bench.py --part stream --threads 32 --budgets 0 256 1024
    python bench/decode_memory_bench.py --part stream --size 3000 2000 --stream-cases jpeg_rgb png_rgb --repeat 20
    python bench/decode_memory_bench.py --imaging-file /tmp/old_imaging.py   # measure another version

Every measurement runs in a fresh child process and reads the kernel's own peak resident set
(``VmHWM``, reset with ``/proc/self/clear_refs`` after the warm-up), so Pillow's C allocations count
too (tracemalloc sees only Python's and numpy's).

``modes``: one image per input kind (16-bit gray PNG with and without a tRNS key, RGBA, palette with
transparency, 16-bit RGBA written by hand, TIFF int32/float, WebP, JPEG, ...), all of the same pixel
count; prints (peak - RSS before) / pixels next to the estimate the decode budget reserves.

``stream``: a stream of worst-case images (smooth, so the files are small: a 16-bit gray PNG of
4096x4096 is ~100 kB) decoded by N threads at once, as a rank's lanes do; prints the child's peak RSS
per ``decode_memory_mb`` (0 = no budget).

``--imaging-file``: load ``imaging.py`` from that path instead of the package's (``git show
<rev>:workflow_scripts/distributed_downloader/imaging/process.py > /tmp/old_imaging.py``), to compare
versions; a version without ``decode_memory_mb`` runs the stream once, without a budget.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss_util import cache_dir  # noqa: E402 - bench helper next to this file

# ---------------------------------------------------------------- inputs


def _smooth(width: int, height: int, top: int, dtype: type, channels: int = 1) -> np.ndarray:
    """Diagonal ramps (one per channel): compress to almost nothing, decode to full size."""
    y = np.arange(height, dtype=np.int64)[:, None]
    x = np.arange(width, dtype=np.int64)[None, :]
    planes = [((x * (3 + c) + y * (5 + 2 * c)) % (top + 1)).astype(dtype) for c in range(channels)]
    return planes[0] if channels == 1 else np.stack(planes, axis=-1)


def _png_by_hand(pixels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of any colour type (Pillow writes 16 bits only for gray)."""
    height, width = pixels.shape[:2]
    rows = pixels.astype(">u2").reshape(height, -1).view(np.uint8)
    rows[1:] -= rows[:-1].copy()  # filter 2 (Up) on every row but the first: ramps compress to ~nothing
    kinds = np.full((height, 1), 2, np.uint8)
    kinds[0] = 0
    raw = np.concatenate([kinds, rows], axis=1).tobytes()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _palette(width: int, height: int) -> Image.Image:
    img = Image.fromarray(_smooth(width, height, 255, np.uint8), "L").convert("P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    return img


# name -> (what it is, bytes for a width x height image)
CASES: dict[str, tuple[str, Callable[[int, int], bytes]]] = {
    "png_i16": ("16-bit gray PNG", lambda w, h: _save(Image.fromarray(_smooth(w, h, 65535, np.uint16)), "PNG")),
    "png_i16_trns": (
        "16-bit gray PNG, tRNS key",
        lambda w, h: _save(Image.fromarray(_smooth(w, h, 65535, np.uint16)), "PNG", transparency=1234),
    ),
    "png_rgba16": ("16-bit RGBA PNG", lambda w, h: _png_by_hand(_smooth(w, h, 65535, np.uint16, 4), 6)),
    "png_la16": ("16-bit gray+alpha PNG", lambda w, h: _png_by_hand(_smooth(w, h, 65535, np.uint16, 2), 4)),
    "png_la": ("gray+alpha PNG", lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8, 2), "LA"), "PNG")),
    "png_rgba": ("RGBA PNG", lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8, 4), "RGBA"), "PNG")),
    "png_rgb": ("RGB PNG", lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8, 3), "RGB"), "PNG")),
    "png_rgb_trns": (
        "RGB PNG, tRNS colour",
        lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8, 3), "RGB"), "PNG", transparency=(0, 0, 0)),
    ),
    "png_l": ("8-bit gray PNG", lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8), "L"), "PNG")),
    "png_p_trns": ("palette PNG, transparent index", lambda w, h: _save(_palette(w, h), "PNG", transparency=0)),
    "png_1": (
        "1-bit PNG",
        lambda w, h: _save(Image.fromarray(_smooth(w, h, 1, np.uint8) * 255, "L").convert("1"), "PNG"),
    ),
    "gif": ("GIF", lambda w, h: _save(_palette(w, h), "GIF")),
    "gif_trns": ("GIF, transparent index", lambda w, h: _save(_palette(w, h), "GIF", transparency=0)),
    "bmp": ("BMP RGB", lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8, 3), "RGB"), "BMP")),
    "tiff_i16": ("TIFF 16-bit gray", lambda w, h: _save(Image.fromarray(_smooth(w, h, 65535, np.uint16)), "TIFF")),
    "tiff_i32": (
        "TIFF int32 gray (deflate)",
        lambda w, h: _save(Image.fromarray(_smooth(w, h, 70000, np.int32)), "TIFF", compression="tiff_adobe_deflate"),
    ),
    "tiff_f": ("TIFF float32", lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.float32)), "TIFF")),
    "tiff_cmyk": (
        "TIFF CMYK (deflate)",
        lambda w, h: _save(
            Image.fromarray(_smooth(w, h, 255, np.uint8, 4), "CMYK"), "TIFF", compression="tiff_adobe_deflate"
        ),
    ),
    "webp_rgba": (
        "WebP RGBA (lossless)",
        lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8, 4), "RGBA"), "WEBP", lossless=True),
    ),
    "webp_rgb": ("WebP RGB", lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8, 3), "RGB"), "WEBP")),
    "jpeg_rgb": (
        "JPEG RGB (decoded at 1/8 scale)",
        lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8, 3)), "JPEG"),
    ),
    "jpeg_progressive": (
        "progressive JPEG RGB 4:2:0 (1/8 scale)",
        lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8, 3)), "JPEG", progressive=True),
    ),
    "jpeg_progressive_444": (
        "progressive JPEG RGB 4:4:4 (1/8 scale)",
        lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8, 3)), "JPEG", progressive=True, subsampling=0),
    ),
    "jpeg_cmyk": (
        "JPEG CMYK (decoded at 1/8 scale)",
        lambda w, h: _save(Image.fromarray(_smooth(w, h, 255, np.uint8, 4), "CMYK"), "JPEG"),
    ),
}

# The stream's worst cases: the most bytes per pixel the pipeline spends, in files of ~100 kB.
STREAM_CASES = ("png_i16", "png_i16_trns", "png_p_trns", "png_rgba", "webp_rgba")


def input_file(case: str, width: int, height: int) -> Path:
    """The case's image, generated once into the bench cache."""
    path = cache_dir("decode_memory") / f"{case}_{width}x{height}.img"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(CASES[case][1](width, height))
        tmp.replace(path)
    return path


# ---------------------------------------------------------------- children

_CHILD_PRELUDE = r"""
import importlib.util, io, json, sys, time
from PIL import Image

def status(key):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

def load_imaging(path):
    if not path:
        from distributed_downloader.imaging import process as imaging
        return imaging
    spec = importlib.util.spec_from_file_location("imaging_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module

imaging = load_imaging(sys.argv[1])

def settings(budget_mb):
    fields = imaging.ImageSettings.__dataclass_fields__
    if budget_mb is not None and "decode_memory_mb" in fields:
        return imaging.ImageSettings(decode_memory_mb=budget_mb)
    return imaging.ImageSettings()

def warm_up():
    # Load every codec and numpy path once, so the measured peak is the decode's own.
    for fmt, mode in (("PNG", "I;16"), ("PNG", "RGBA"), ("PNG", "P"), ("GIF", "P"), ("BMP", "RGB"),
                      ("TIFF", "I"), ("TIFF", "F"), ("TIFF", "CMYK"), ("WEBP", "RGBA"), ("JPEG", "RGB")):
        buf = io.BytesIO()
        Image.new(mode, (1500, 1000)).save(buf, fmt)
        imaging.process_image(buf.getvalue(), settings(None))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
"""

_MODE_CHILD = (
    _CHILD_PRELUDE
    + r"""
data = open(sys.argv[2], "rb").read()
warm_up()
reset_peak()
before = status("VmRSS")
out = imaging.process_image(data, settings(None))
peak = status("VmHWM")
print(json.dumps({"before": before, "peak": peak, "resized": out.resized_size}))
"""
)

_STREAM_CHILD = (
    _CHILD_PRELUDE
    + r"""
from concurrent.futures import ThreadPoolExecutor
paths, threads, repeat = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
budget = None if sys.argv[5] == "none" else int(sys.argv[5])
if sys.argv[6] != "n/a":
    from distributed_downloader.imaging import decode_budget
    if sys.argv[6] == "on":
        assert decode_budget.tune_allocator()
    else:
        decode_budget._tuned = False  # as if already tried: the budget will not tune it either
images = [open(p, "rb").read() for p in paths] * repeat
warm_up()
reset_peak()
before = status("VmRSS")
chosen = settings(budget)
started = time.monotonic()
with ThreadPoolExecutor(max_workers=threads) as pool:
    sizes = list(pool.map(lambda data: imaging.process_image(data, chosen).resized_size, images))
seconds = time.monotonic() - started
print(json.dumps({"before": before, "peak": status("VmHWM"), "seconds": seconds, "images": len(sizes)}))
"""
)


def _child(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _estimates(imaging_file: str) -> Callable[[bytes], int] | None:
    """The budget's reservation for an image, when the measured imaging.py has one."""
    if imaging_file:
        return None
    from distributed_downloader.imaging import process as imaging

    estimate = getattr(imaging, "decode_reservation", None)
    if estimate is None:
        return None
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # images near the cap are the point
    return lambda data: estimate(data, imaging.ImageSettings())


def run_modes(width: int, height: int, imaging_file: str, cases: list[str]) -> None:
    pixels = width * height
    estimate = _estimates(imaging_file)
    print(f"\nbytes per pixel of one process_image, {width}x{height} = {pixels / 1e6:.1f} Mpx, image_size 720")
    print(f"{'case':<16} {'what':<34} {'file kB':>8} {'peak MB':>8} {'B/px':>6} {'reserved B/px':>14}")
    for case in cases:
        what = CASES[case][0]
        path = input_file(case, width, height)
        result = _child(_MODE_CHILD, imaging_file, str(path))
        grown = result["peak"] - result["before"]
        reserved = f"{estimate(path.read_bytes()) / pixels:.1f}" if estimate else "-"
        print(
            f"{case:<16} {what:<34} {path.stat().st_size / 1e3:>8.0f} {grown / 2**20:>8.0f} "
            f"{grown / pixels:>6.1f} {reserved:>14}"
        )


def run_stream(
    width: int,
    height: int,
    threads: int,
    repeat: int,
    runs: list[tuple[int | None, str]],
    imaging_file: str,
    cases: list[str],
) -> None:
    paths = [str(input_file(case, width, height)) for case in cases]
    count = len(paths) * repeat
    print(
        f"\nstream: {count} images ({', '.join(cases)}) of {width}x{height}, {threads} threads, "
        f"peak RSS above the warmed-up process"
    )
    print(f"{'decode_memory_mb':>17} {'malloc tuned':>13} {'peak MB':>8} {'seconds':>8} {'images/s':>9}")
    for budget, tune in runs:
        arg = "none" if budget is None else str(budget)
        result = _child(_STREAM_CHILD, imaging_file, json.dumps(paths), str(threads), str(repeat), arg, tune)
        grown = (result["peak"] - result["before"]) / 2**20
        label = "no budget" if budget == 0 else ("(as is)" if budget is None else str(budget))
        print(
            f"{label:>17} {tune:>13} {grown:>8.0f} {result['seconds']:>8.1f} "
            f"{result['images'] / result['seconds']:>9.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("modes", "stream", "both"), default="both")
    parser.add_argument("--size", type=int, nargs=2, default=(4096, 4096), metavar=("W", "H"))
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=6, help="times the stream repeats its worst-case images")
    parser.add_argument("--budgets", type=int, nargs="*", default=[0, 256, 1024], help="decode_memory_mb values")
    parser.add_argument(
        "--tune",
        choices=("on", "off", "both"),
        default="both",
        help="decode_budget.tune_allocator (glibc mmap threshold)",
    )
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=list(CASES), help="modes part only")
    parser.add_argument("--stream-cases", nargs="*", choices=sorted(CASES), default=list(STREAM_CASES))
    parser.add_argument("--imaging-file", default="", help="measure this imaging.py instead of the package's")
    args = parser.parse_args()
    width, height = args.size
    if args.part in ("modes", "both"):
        run_modes(width, height, args.imaging_file, args.cases)
    if args.part in ("stream", "both"):
        tunes = ("off", "on") if args.tune == "both" else (args.tune,)
        runs: list[tuple[int | None, str]] = [(budget, tune) for budget in args.budgets for tune in tunes]
        if args.imaging_file:
            runs = [(None, "n/a")]  # an older imaging.py may have neither
        run_stream(width, height, args.threads, args.repeat, runs, args.imaging_file, args.stream_cases)


if __name__ == "__main__":
    main()
