"""The single-pass body reader (issue #16): the body and its MD5 in one read, and the decode threads.

``ServerFetcher._read_body`` hashes each chunk as it arrives and reads an unencoded body without
urllib3's decoded-content copies; ``imaging.process_image`` then takes that MD5 instead of
hashing the original again. Everything the store holds must be what it was: the exact bytes and
the MD5 of the original bytes, whatever the framing (Content-Length, chunked, gzip, redirects).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest

from distributed_downloader.demo.testserver import HostSpec, ImageFarm
from distributed_downloader.errors import DownloadError, ErrorCode, ImageError
from distributed_downloader.imaging import process as imaging
from distributed_downloader.net.fetch import CHUNK_BYTES, FetchSettings, ServerFetcher

UA = "distributed-downloader/1.0 (+https://example.org/contact; unit tests)"
LARGE = "w=1600&h=1200"  # a PNG of this size is several MB: many reads


@pytest.fixture(scope="module")
def farm() -> Iterator[ImageFarm]:
    with ImageFarm([HostSpec("h1")], seed=16) as running:
        yield running


@pytest.fixture
def fetcher() -> Iterator[ServerFetcher]:
    f = ServerFetcher(
        FetchSettings(
            user_agent=UA,
            connect_timeout=3.0,
            read_timeout=5.0,
            total_timeout=10.0,
            max_bytes=20_000_000,
            allow_private_addresses=True,
        )
    )
    yield f
    f.close()


@pytest.mark.parametrize(
    "path",
    [
        f"/img/one.png?{LARGE}",  # Content-Length, larger than a read
        "/img/small.jpg?w=64&h=48",  # one read: the chunk itself is the body
        f"/gzip/g.png?{LARGE}",  # decoded: the MD5 is that of the image file, not of the gzip stream
        f"/redirect/2/r.jpg?{LARGE}",
    ],
)
def test_body_and_md5_come_from_one_pass(farm: ImageFarm, fetcher: ServerFetcher, path: str) -> None:
    result = fetcher.get(farm.url(0, path))
    expected = farm.expected_bytes(path)
    assert result.body == expected
    assert isinstance(result.body, bytes)
    assert result.md5 == hashlib.md5(expected).hexdigest()


def test_a_chunked_body_without_a_length_is_read_whole(farm: ImageFarm, fetcher: ServerFetcher) -> None:
    result = fetcher.get(farm.url(0, "/big/3?chunked=1"))
    assert len(result.body) == 3_000_000 > CHUNK_BYTES
    assert result.md5 == hashlib.md5(result.body).hexdigest()


@pytest.mark.parametrize(
    ("path", "code", "fragment"),
    [
        (f"/badlength/b.png?{LARGE}", ErrorCode.NETWORK, "short of its Content-Length"),
        (f"/reset/r.png?{LARGE}", ErrorCode.NETWORK, "mid-body"),
        (f"/badchunk/c.png?{LARGE}", ErrorCode.NETWORK, "chunked"),
        (f"/badgzip/z.png?{LARGE}", ErrorCode.PROTOCOL, "Content-Encoding"),
    ],
)
def test_a_truncated_or_broken_body_is_still_an_error(
    farm: ImageFarm, fetcher: ServerFetcher, path: str, code: int, fragment: str
) -> None:
    with pytest.raises(DownloadError) as info:
        fetcher.get(farm.url(0, path))
    assert info.value.code == code and fragment in info.value.message, info.value.message


def test_the_byte_cap_still_counts_decoded_bytes(farm: ImageFarm) -> None:
    capped = ServerFetcher(FetchSettings(user_agent=UA, max_bytes=1_500_000, allow_private_addresses=True))
    try:
        for path in ("/big/3?chunked=1", "/gzbomb/20"):
            with pytest.raises(DownloadError) as info:
                capped.get(farm.url(0, path))
            assert info.value.code == ErrorCode.TOO_LARGE, path
    finally:
        capped.close()


def test_the_fetch_md5_is_the_stored_hashsum_original(farm: ImageFarm, fetcher: ServerFetcher) -> None:
    settings = imaging.ImageSettings(image_size=256)
    result = fetcher.get(farm.url(0, f"/img/stored.jpg?{LARGE}"))
    given = imaging.process_image(result.body, settings, original_md5=result.md5)
    hashed_here = imaging.process_image(result.body, settings)
    assert given == hashed_here
    assert given.hashsum_original == hashlib.md5(farm.expected_bytes(f"/img/stored.jpg?{LARGE}")).hexdigest()


def test_pooled_processing_gives_the_same_image_and_errors(farm: ImageFarm) -> None:
    settings = imaging.ImageSettings(image_size=300)
    body = farm.expected_bytes(f"/img/pool.png?{LARGE}")
    assert imaging.process_image_pooled(body, settings) == imaging.process_image(body, settings)
    with pytest.raises(ImageError) as info:
        imaging.process_image_pooled(b"<html>not an image</html>", settings)
    assert info.value.code == ErrorCode.IMAGE_DECODE
    with pytest.raises(ImageError) as info:
        imaging.process_image_pooled(body[: len(body) // 2], settings)  # truncated: fails to decode
    assert info.value.code == ErrorCode.IMAGE_DECODE


def test_decodes_run_on_at_most_one_thread_per_core(farm: ImageFarm) -> None:
    settings = imaging.ImageSettings(image_size=128)
    bodies = [farm.expected_bytes(f"/img/k{i}.jpg?w=800&h=600") for i in range(12)]
    names: set[str] = set()
    original = imaging.process_image

    def spy(*args: object, **kwargs: object) -> imaging.ProcessedImage:
        names.add(threading.current_thread().name)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    imaging.process_image = spy  # type: ignore[assignment]
    try:
        callers = [threading.Thread(target=imaging.process_image_pooled, args=(b, settings)) for b in bodies]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join()
    finally:
        imaging.process_image = original  # type: ignore[assignment]
    assert names and all(name.startswith("decode") for name in names)
    assert len(names) <= imaging.decode_threads()


def test_a_commit_gathers_small_parts_into_large_row_groups(tmp_path) -> None:  # noqa: ANN001
    import pyarrow.parquet as pq

    from distributed_downloader.store.batch_parts import BatchParts
    from distributed_downloader.store.files import ROW_GROUP_ROWS

    parts = BatchParts(tmp_path / "batch", "f" * 32, round_no=1)
    rows = 3 * ROW_GROUP_ROWS + 7
    for i in range(rows):
        parts.append_success(
            {
                "uuid": f"u{i}",
                "source_id": "s",
                "identifier": f"http://h/{i}.jpg",
                "is_license_full": False,
                "license": "l",
                "source": "s",
                "title": "t",
                "hashsum_original": "0" * 32,
                "hashsum_resized": "1" * 32,
                "original_size": [2, 2],
                "resized_size": [2, 2],
                "image": b"x" * 100,
            }
        )
        if i % 5 == 4:  # a checkpoint every 5 rows, as a lane at ~1 image/s makes them
            parts.flush()
    target = tmp_path / "batch" / "successes.parquet"
    assert parts.write_successes(target) == rows
    meta = pq.ParquetFile(target).metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    assert sum(sizes) == rows
    assert all(size >= ROW_GROUP_ROWS for size in sizes[:-1]) and len(sizes) <= 4, sizes
    assert pq.read_table(target).column("uuid").to_pylist() == [f"u{i}" for i in range(rows)]
