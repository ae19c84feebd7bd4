"""robots.txt (RFC 9309) and response opt-outs through the REAL workflow: Snakemake on the local
profile, 2 MPI ranks, against loopback hosts that each test one thing, judged at the server.

- ``groups``: our product token has its own group (unlike ``*``, which disallows everything, and
  unlike a group named by a prefix of our token); in it ``Allow: /`` comes before
  ``Disallow: /priv*/img/`` (longest match wins), a longer ``Allow`` reopens a subfolder, and
  ``Disallow: /*.gif$`` ends at the path's end (a query string escapes it).
- ``flaky``: robots.txt answers 503 through profiling and round 1 (its URLs: transient -15 rows,
  not one image request), then 200: round 2 downloads what the rules allow.
- ``moved``: /robots.txt is a 301 to another path of the same host, whose rules apply.
- ``big``: a robots.txt of 600 KiB; the rules near its top apply (the first 500 KiB are parsed).
- ``optout``: no robots.txt; X-Robots-Tag (noai, noimageai, scoped to our token or to another
  crawler), ``tdm-reservation: 1`` / ``0`` (any header case), and redirects to a path another host's
  robots.txt disallows.

Round 1 runs alone (its target is the round marker), the flaky host's robots.txt is switched back
on, then the same command finishes the run as a user would.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

from distributed_downloader import config as config_mod
from distributed_downloader.demo import scenario as demo
from distributed_downloader.demo.scenario import Expected
from distributed_downloader.demo.testserver import HostSpec, ImageFarm
from distributed_downloader.errors import ErrorCode
from tests.conftest import run, snakemake_cmd
from tests.e2e.helpers import check_dataset, read_all

pytestmark = pytest.mark.e2e

USER_AGENT = "robots-e2e-bot/1.0 (+https://example.org/robots-e2e; end-to-end tests)"
TOKEN = "robots-e2e-bot"  # the first word of the user agent
SMALL = "w=96&h=64"
GROUPS, FLAKY, MOVED, BIG, OPTOUT = range(5)

GROUPS_ROBOTS = f"""\
# Everyone else: nothing at all.
User-agent: *
Disallow: /

# A prefix of our token is another crawler (a substring match would wrongly apply this).
User-agent: robots-e2e
Disallow: /img/

User-agent: otherbot
Allow: /

User-agent: {TOKEN}
Allow: /
Disallow: /priv*/img/
Allow: /priv*/img/public/
Disallow: /*.gif$
"""
FLAKY_ROBOTS = "User-agent: *\nDisallow: /secret/\n"
MOVED_ROBOTS = "User-agent: *\nDisallow: /moved-off/\n"
MOVED_LOCATION = "/site/robots-v2.txt"


def big_robots() -> str:
    """600 KiB: our group's real rules first, ~20k filler rules, and one rule past the 500 KiB cut."""
    head = f"User-agent: {TOKEN}\nDisallow: /early/\nAllow: /\n"
    filler = "".join(f"Disallow: /filler/{i:06d}/archive/\n" for i in range(20_000))
    text = head + filler + "Disallow: /late/\n"
    assert 600 * 1024 <= len(text.encode()) < 700 * 1024
    return text


def hosts() -> list[HostSpec]:
    return [
        HostSpec("groups", robots_txt=GROUPS_ROBOTS),
        HostSpec("flaky", robots_txt=FLAKY_ROBOTS, robots_failures=10**6),  # switched back on after round 1
        HostSpec("moved", robots_txt=MOVED_ROBOTS, robots_location=MOVED_LOCATION),
        HostSpec("big", robots_txt=big_robots()),
        HostSpec("optout"),
    ]


def _md5(farm: ImageFarm, path: str) -> str:
    return hashlib.md5(farm.expected_bytes(path)).hexdigest()


def rows(farm: ImageFarm) -> list[Expected]:
    """Every URL with its expected outcome: an image (md5) or an error code."""
    out: list[Expected] = []

    def ok(host: int, path: str, image: str | None = None) -> None:
        out.append(Expected(f"h{host}-{len(out)}", farm.url(host, path), _md5(farm, image or path), None))

    def fails(host: int, path: str, code: int) -> None:
        out.append(Expected(f"h{host}-{len(out)}", farm.url(host, path), None, int(code)))

    disallowed, x_robots, tdm = ErrorCode.ROBOTS_DISALLOWED, ErrorCode.X_ROBOTS_TAG, ErrorCode.TDM_RESERVED
    for i in range(6):
        ok(GROUPS, f"/img/g{i}.jpg?{SMALL}")  # '*' and 'robots-e2e' would refuse these
    for i in range(3):
        fails(GROUPS, f"/private/img/p{i}.jpg?{SMALL}", disallowed)
    fails(GROUPS, f"/privileged/img/q.jpg?{SMALL}", disallowed)  # the * in /priv*/
    fails(GROUPS, "/private/img/p-plain.jpg", disallowed)
    for i in range(2):
        ok(GROUPS, f"/private/img/public/u{i}.jpg?{SMALL}")  # the longer Allow wins
    ok(GROUPS, f"/private/other/r.jpg?{SMALL}")
    ok(GROUPS, f"/img/gif-jpg{0}.gif.jpg?{SMALL}")
    fails(GROUPS, "/img/anim0.gif", disallowed)  # /*.gif$
    fails(GROUPS, "/img/free/a/b/still.gif", disallowed)
    ok(GROUPS, f"/img/query.gif?{SMALL}")  # '$' is the end of path and query: this one is allowed

    for i in range(8):
        ok(FLAKY, f"/img/f{i}.jpg?{SMALL}")
    for i in range(2):
        fails(FLAKY, f"/secret/s{i}.jpg?{SMALL}", disallowed)

    for i in range(5):
        ok(MOVED, f"/img/m{i}.jpg?{SMALL}")
    for i in range(2):
        fails(MOVED, f"/moved-off/x{i}.jpg?{SMALL}", disallowed)

    for i in range(5):
        ok(BIG, f"/img/b{i}.jpg?{SMALL}")
    for i in range(2):
        fails(BIG, f"/early/e{i}.jpg?{SMALL}", disallowed)
    ok(BIG, f"/late/l0.jpg?{SMALL}")  # its rule is past the first 500 KiB

    for directive, opted_out in [
        ("noai", True),
        ("noimageai", True),
        ("noindex, noai", True),
        (f"{TOKEN}: noai", True),
        (f"{TOKEN.upper()}: noimageai", True),
        ("otherbot: noai", False),
        (f"otherbot: noai, {TOKEN}: noindex", False),
        ("noindex", False),
    ]:
        path = f"/xrobots/{quote(directive, safe='')}/o{len(out)}.jpg?{SMALL}"
        fails(OPTOUT, path, x_robots) if opted_out else ok(OPTOUT, path)
    fails(OPTOUT, f"/tdm/1/t1.jpg?{SMALL}", tdm)
    ok(OPTOUT, f"/tdm/0/t2.jpg?{SMALL}")
    for name in ("TDM-Reservation", "TDM-RESERVATION"):
        fails(OPTOUT, f"/reply/200?h={name}&v=1", tdm)  # refused on its headers (the body is not an image)
    for i in range(3):
        ok(OPTOUT, f"/img/plain{i}.jpg?{SMALL}")
    to_tdm = farm.url(OPTOUT, f"/tdm/1/t3.jpg?{SMALL}")
    fails(OPTOUT, "/redirect-to/" + quote(to_tdm, safe=""), tdm)
    for i in range(2):  # a redirect into another host's disallowed path: never followed
        target = farm.url(GROUPS, f"/private/img/via{i}.jpg?{SMALL}")
        fails(OPTOUT, "/redirect-to/" + quote(target, safe=""), disallowed)
    allowed_target = farm.url(GROUPS, f"/img/via-ok.jpg?{SMALL}")
    ok(OPTOUT, "/redirect-to/" + quote(allowed_target, safe=""), f"/img/via-ok.jpg?{SMALL}")
    return out


def _path(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _host_of(farm: ImageFarm, url: str) -> int:
    return next(i for i, base in enumerate(farm.base_urls) if url.startswith(base + "/"))


def _never_requested(farm: ImageFarm, expected: list[Expected]) -> dict[int, list[str]]:
    """Disallowed paths any host was asked for (by the input URL, or as a redirect target)."""
    forbidden: dict[int, set[str]] = {i: set() for i in range(len(farm.base_urls))}
    for row in expected:
        if row.error_code != ErrorCode.ROBOTS_DISALLOWED:
            continue
        path = _path(row.identifier)
        if path.startswith("/redirect-to/"):
            target = unquote(urlsplit(row.identifier).path[len("/redirect-to/") :])
            forbidden[_host_of(farm, target)].add(_path(target))
        else:
            forbidden[_host_of(farm, row.identifier)].add(path)
    pattern = {
        GROUPS: re.compile(r"^/priv[^?]*/img/(?!public/)|\.gif$"),
        FLAKY: re.compile(r"^/secret/"),
        MOVED: re.compile(r"^/moved-off/"),
        BIG: re.compile(r"^/early/"),
    }
    hits: dict[int, list[str]] = {}
    for i in range(len(farm.base_urls)):
        seen = [entry.path for entry in farm.request_log(i)]
        bad = [p for p in seen if p in forbidden[i] or (i in pattern and pattern[i].search(p))]
        if bad:
            hits[i] = bad
    return hits


def _round_target(config: Path, workdir: Path, round_no: int) -> list[str]:
    """The Snakemake command with the round's marker as its target (before --configfile)."""
    cmd = snakemake_cmd(config, workdir)
    output = config_mod.load(config)["path_to_output"]
    target = str(Path(output) / "state" / f"download_round_{round_no}.done")
    at = cmd.index("--configfile")
    return [*cmd[:at], target, *cmd[at:]]


def test_robots_and_opt_outs_through_the_workflow(tmp_path: Path) -> None:
    with ImageFarm(hosts(), seed=3) as farm:
        expected = rows(farm)
        config = demo.write_config(
            tmp_path,
            demo.write_input(expected, tmp_path / "urls.csv"),
            user_agent=USER_AGENT,
            num_downloads=2,
            batch_size=8,
            max_retries=1,
        )
        output = tmp_path / "output"
        images = output / "downloaded_images"
        flaky_base = farm.base_urls[FLAKY]

        # Round 1 only: the flaky host's robots.txt answers 503 throughout.
        started = time.monotonic()
        run(_round_target(config, tmp_path, 1))
        round1 = time.monotonic() - started
        flaky_log_round1 = farm.request_log(FLAKY)
        errors1 = read_all(images, "errors.parquet")
        successes1 = read_all(images, "successes.parquet")

        farm.set_robots_failures(FLAKY, 0)  # robots.txt is back before round 2
        started = time.monotonic()
        run(snakemake_cmd(config, tmp_path))
        rest = time.monotonic() - started

        # --- round 1: the flaky host's URLs are transient -15 rows, and not one was requested
        flaky_rows = [r for r in errors1 if r["identifier"].startswith(flaky_base + "/")]
        flaky_expected = [r for r in expected if r.identifier.startswith(flaky_base + "/")]
        assert not [r for r in successes1 if r["identifier"].startswith(flaky_base + "/")]
        assert Counter(r["error_code"] for r in flaky_rows) == {int(ErrorCode.ROBOTS_UNAVAILABLE): len(flaky_expected)}
        assert {entry.path for entry in flaky_log_round1} == {"/robots.txt"}
        assert all(entry.status == 503 for entry in flaky_log_round1)

        # --- the whole run: every URL once, images byte-exact, every error with its code
        result = check_dataset(output, expected, image_size=720)
        successes = read_all(images, "successes.parquet", ["identifier"])
        opted_out = {
            r.identifier
            for r in expected
            if r.error_code in (ErrorCode.X_ROBOTS_TAG, ErrorCode.TDM_RESERVED, ErrorCode.ROBOTS_DISALLOWED)
        }
        assert not opted_out & {r["identifier"] for r in successes}

        # --- at the servers: no disallowed path was ever asked for
        assert _never_requested(farm, expected) == {}
        flaky_log = farm.request_log(FLAKY)
        assert any(e.path == "/robots.txt" and e.status == 200 for e in flaky_log)
        moved_paths = [e.path for e in farm.request_log(MOVED)]
        assert MOVED_LOCATION in moved_paths  # the 301 was followed on the same host
        assert all(farm.stats(i).user_agents == {USER_AGENT} for i in range(len(farm.base_urls)))

        verification = json.loads((output / "reports" / "verification.json").read_text())
        assert verification["ok"] and verification["totals"]["urls"] == len(expected)
        codes = Counter(r["error_code"] for r in result["error_rows"])
        robots_requests = [
            sum(e.path == "/robots.txt" for e in farm.request_log(i)) for i in range(len(farm.base_urls))
        ]
        print(
            f"robots e2e: {len(expected)} URLs on {len(farm.base_urls)} hosts; round 1 alone {round1:.1f}s,"
            f" round 2 + verify {rest:.1f}s; {result['successes']} images, errors {dict(codes)};"
            f" robots.txt requests per host {robots_requests}"
        )


def test_tdm_reservation_can_be_switched_off(tmp_path: Path) -> None:
    """`respect_tdm_reservation: false` reaches the lanes: reserved images are stored, X-Robots-Tag still holds."""
    with ImageFarm([HostSpec("optout")], seed=4) as farm:
        expected: list[Expected] = []
        for i, path in enumerate(
            [f"/tdm/1/a{i}.jpg?{SMALL}" for i in range(3)] + [f"/tdm/0/b.jpg?{SMALL}", f"/img/c.jpg?{SMALL}"]
        ):
            expected.append(Expected(f"t{i}", farm.url(0, path), _md5(farm, path), None))
        expected.append(Expected("x", farm.url(0, f"/xrobots/noai/d.jpg?{SMALL}"), None, int(ErrorCode.X_ROBOTS_TAG)))
        config = demo.write_config(
            tmp_path,
            demo.write_input(expected, tmp_path / "urls.csv"),
            user_agent=USER_AGENT,
            num_downloads=1,
            respect_tdm_reservation=False,
        )
        run(snakemake_cmd(config, tmp_path))
        result = check_dataset(tmp_path / "output", expected)
    assert result["successes"] == 5 and result["errors"] == 1
    verification = json.loads((tmp_path / "output" / "reports" / "verification.json").read_text())
    assert verification["ok"]
