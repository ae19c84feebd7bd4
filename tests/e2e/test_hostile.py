"""One real workflow run (local profile, real MPI ranks) against hostile loopback servers.

Every hostile case of the test farm, a dead host and a blackholed host, mixed with good URLs on the
same and on other hosts: each bad URL must end as an error row with its documented code and a clear
message, every good URL must succeed with the right MD5, and the bad ones must not hold up the rest.
Run with ``-s`` to see the table "hostile case -> error code -> message".
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from distributed_downloader.demo import scenario as demo
from distributed_downloader.demo.testserver import HostSpec, ImageFarm, SilentHost, closed_port
from tests.conftest import run, snakemake_cmd
from tests.e2e.helpers import check_dataset, read_all

pytestmark = pytest.mark.e2e

TOTAL, READ, CONNECT = 3.0, 2.0, 1.0  # seconds: timeout.total / read / connect of the run
IMAGE = "w=320&h=240"
MAX_BYTES = 5_000_000


@dataclass(frozen=True)
class Case:
    name: str
    url: Callable[[ImageFarm, dict], str]  # (farm, extra hosts) -> URL
    code: int
    says: str  # a fragment the error message must contain


def _via(farm: ImageFarm, target: str) -> str:
    return farm.url(0, "/redirect-to/" + quote(target, safe=""))


CASES = [
    Case("connection reset mid-body", lambda f, x: f.url(0, f"/reset/r.jpg?{IMAGE}"), -1, "reset mid-body"),
    Case("stall after half the body", lambda f, x: f.url(0, f"/stall/s.jpg?{IMAGE}"), -3, "read timeout mid-body"),
    Case("trickle (1 byte / 0.5 s)", lambda f, x: f.url(0, f"/trickle/t.jpg?{IMAGE}"), -3, "trickles it"),
    Case("trickled headers", lambda f, x: f.url(0, "/slowheaders/h.jpg"), -3, "response headers"),
    Case("8 redirects (max 5)", lambda f, x: f.url(0, f"/redirect/8/c.jpg?{IMAGE}"), -9, "more than 5 redirects"),
    Case("redirect loop", lambda f, x: f.url(0, "/loop/2"), -9, "redirect loop"),
    # A redirect target's robots.txt is read first (RFC 9309): unreachable = nothing fetched there for now.
    Case("redirect to a closed port", lambda f, x: _via(f, f"http://127.0.0.1:{x['closed']}/a.jpg"), -15, "refused"),
    Case("redirect to a silent host", lambda f, x: _via(f, x["silent"].url("/a.jpg")), -15, "read timeout"),
    Case("redirect to a full backlog", lambda f, x: _via(f, x["backlog"].url("/a.jpg")), -15, "connect timeout"),
    Case("redirect to ftp://", lambda f, x: _via(f, "ftp://127.0.0.1/a.jpg"), -9, "scheme 'ftp'"),
    Case("HTML labelled image/jpeg", lambda f, x: f.url(0, "/html/page.jpg"), -2, "not a supported image"),
    Case("JSON labelled image/jpeg", lambda f, x: f.url(0, "/json/item"), -2, "not a supported image"),
    Case("PNG declaring 30000x30000", lambda f, x: f.url(0, "/bomb.png"), -5, "decompression bomb"),
    Case("50 MB body", lambda f, x: f.url(0, "/big/50"), -4, "Content-Length 50000000"),
    Case("50 MB chunked body", lambda f, x: f.url(0, "/big/50?chunked=1"), -4, "body over"),
    Case("gzip bomb (50 MB of zeros)", lambda f, x: f.url(0, "/gzbomb/50"), -4, "body over"),
    Case("Content-Length too large", lambda f, x: f.url(0, f"/badlength/l.jpg?{IMAGE}"), -1, "short of its Content"),
    Case("two Content-Lengths", lambda f, x: f.url(0, f"/duplength/d.jpg?{IMAGE}"), -12, "Content-Length"),
    Case("gzip label, not gzip", lambda f, x: f.url(0, f"/badgzip/g.jpg?{IMAGE}"), -12, "Content-Encoding"),
    Case("broken chunked framing", lambda f, x: f.url(0, f"/badchunk/k.jpg?{IMAGE}"), -1, "chunked"),
    Case("X-Robots-Tag: noai", lambda f, x: f.url(0, f"/xrobots/noai/x.jpg?{IMAGE}"), -7, "noai"),
    Case("truncated image", lambda f, x: f.url(0, f"/truncated/tr.jpg?{IMAGE}"), -2, "truncated"),
    # robots.txt unreachable = disallow everything for now (RFC 9309): transient rows, tried every round.
    Case("dead host (refused)", lambda f, x: f"http://127.0.0.1:{x['closed']}/img/a.jpg", -15, "refused"),
    Case("blackholed host (silent)", lambda f, x: x["silent"].url("/img/a.jpg"), -15, "timeout"),
]
# Good URLs whose path is special: they must succeed, with the MD5 of the image they lead to.
BENIGN = [
    ("3 redirects", f"/redirect/3/b1.jpg?{IMAGE}", f"/img/b1.jpg?{IMAGE}"),
    ("gzip-encoded image", f"/gzip/b2.png?{IMAGE}", f"/img/b2.png?{IMAGE}"),
    ("X-Robots-Tag: noindex", f"/xrobots/noindex/b3.gif?{IMAGE}", f"/img/b3.gif?{IMAGE}"),
]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_hostile_servers(tmp_path: Path) -> None:
    hosts = [HostSpec("hostile"), HostSpec("good-1"), HostSpec("good-2")]
    with ImageFarm(hosts, seed=3) as farm, SilentHost() as silent, SilentHost(mode="backlog") as backlog:
        extra = {"closed": closed_port(), "silent": silent, "backlog": backlog}
        rows: list[demo.Expected] = []
        good_on_hostile = [f"/img/h0-{i}.jpg?{IMAGE}" for i in range(10)]
        # The first URL of a server is its profiling probe: the hostile host starts with a good one.
        rows.append(
            demo.Expected(
                "h0-good-0", farm.url(0, good_on_hostile[0]), _md5(farm.expected_bytes(good_on_hostile[0])), None
            )
        )
        case_of: dict[str, Case] = {}
        for i, case in enumerate(CASES):
            url = case.url(farm, extra)
            case_of[url] = case
            rows.append(demo.Expected(f"case-{i:02d}", url, None, case.code))
            if i + 1 < len(good_on_hostile):  # good URLs interleaved with the bad ones on the same host
                path = good_on_hostile[i + 1]
                rows.append(demo.Expected(f"h0-good-{i + 1}", farm.url(0, path), _md5(farm.expected_bytes(path)), None))
        for i, (_, path, image) in enumerate(BENIGN):
            rows.append(demo.Expected(f"benign-{i}", farm.url(0, path), _md5(farm.expected_bytes(image)), None))
        target = f"/img/elsewhere.jpg?{IMAGE}"  # a redirect to another good host
        rows.append(
            demo.Expected("to-good-host", _via(farm, farm.url(1, target)), _md5(farm.expected_bytes(target)), None)
        )
        for host in (1, 2):
            for i in range(20):
                path = f"/img/g{host}-{i}.{'jpg' if i % 2 else 'png'}?{IMAGE}"
                rows.append(demo.Expected(f"g{host}-{i}", farm.url(host, path), _md5(farm.expected_bytes(path)), None))

        config = demo.write_config(
            tmp_path,
            demo.write_input(rows, tmp_path / "urls.csv"),
            num_downloads=1,
            max_retries=0,
            batch_size=10,
            default_rate_limit=40,  # a good batch is paced over ~0.5 s: far below the timeouts it is compared with
            timeout={"connect": CONNECT, "read": READ, "total": TOTAL},
            max_image_bytes=MAX_BYTES,
        )
        started = time.monotonic()
        run(snakemake_cmd(config, tmp_path), timeout=180)
        wall = time.monotonic() - started

    output = tmp_path / "output"
    result = check_dataset(output, rows)  # every URL once; successes with the right MD5s; the documented codes
    good = [r for r in rows if r.md5 is not None]
    assert result["successes"] == len(good) and result["errors"] == len(CASES)
    verification = json.loads((output / "reports" / "verification.json").read_text())
    assert verification["ok"] and verification["totals"]["urls"] == len(rows)

    errors = {r["identifier"]: r for r in read_all(output / "downloaded_images", "errors.parquet")}
    table = [(case.name, errors[url]["error_code"], errors[url]["error_msg"]) for url, case in case_of.items()]
    width = max(len(name) for name, _, _ in table)
    print(f"\nhostile case{' ' * (width - 12)} | code | message")
    for name, code, message in table:
        print(f"{name:<{width}} | {code:>4} | {message}")
    unclear = [
        (c.name, errors[url]["error_msg"]) for url, c in case_of.items() if c.says not in errors[url]["error_msg"]
    ]
    assert not unclear, unclear

    # One bad server never stalls the others: the good hosts' batches are quick, and all of them are
    # done before the hostile host's batches with stalls and trickles have timed out.
    batches = json.loads((output / "state" / "round_1_batches.json").read_text())
    hostile_name = farm.base_urls[0].split("//", 1)[1]
    good_names = {base.split("//", 1)[1] for base in farm.base_urls[1:]}
    good_batches = [b for b in batches if b["server_name"] in good_names]
    hostile_batches = [b for b in batches if b["server_name"] == hostile_name]
    assert len(good_batches) == 4 and hostile_batches
    slowest_good = max(b["seconds"] for b in good_batches)
    slowest_hostile = max(b["seconds"] for b in hostile_batches)
    timing = f"good batches {[b['seconds'] for b in good_batches]}, hostile {[b['seconds'] for b in hostile_batches]}"
    assert slowest_good < TOTAL, f"a good host's batch waited like a hostile one: {timing}"
    assert slowest_hostile >= READ, timing  # the stalls were really waited for (and bounded: below)
    if all("started_at" in b for b in batches):
        good_done = max(b["started_at"] + b["seconds"] for b in good_batches)
        hostile_done = max(b["started_at"] + b["seconds"] for b in hostile_batches)
        assert good_done < hostile_done, f"good hosts finished {good_done - hostile_done:.1f}s after the hostile one"
    # Nothing waits past its deadline: the hostile host's work is bounded by a few timeouts, not by the servers.
    assert sum(b["seconds"] for b in hostile_batches) < 30, timing
    assert wall < 80, f"the run took {wall:.0f}s"
    print(
        f"hostile run: {len(rows)} URLs in {wall:.1f}s; slowest good batch {slowest_good:.2f}s, "
        f"slowest hostile batch {slowest_hostile:.2f}s"
    )
