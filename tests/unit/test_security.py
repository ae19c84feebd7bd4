"""Security properties: server names are safe folder names, nothing reaches a shell unquoted, a full
disk never leaves half-written batches. Loopback traffic only; URLs in the tables are parsed, never fetched."""

from __future__ import annotations

import ast
import contextlib
import csv
import errno
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import urllib3
import yaml

from distributed_downloader import config as config_mod
from distributed_downloader import inputs, stages
from distributed_downloader.demo.testserver import ImageFarm
from distributed_downloader.engine.lane import Lane, LaneSpec
from distributed_downloader.errors import DownloadError
from distributed_downloader.net.fetch import FetchSettings, ServerFetcher
from distributed_downloader.store.files import MARKER_FILE, SUCCESS_SCHEMA, StreamingParquet
from tests.conftest import REPO, run, skip_or_fail, snakemake_cmd
from tests.e2e.helpers import read_all, write_batch_urls

# ---------------------------------------------------------------- server_name: a safe, faithful folder name

# Hostile and odd URLs; each is either rejected by the initializer or gets a server_name.
URLS = [
    "http://example.org/a.jpg",
    "http://EXAMPLE.org/a.jpg",
    "HTTP://Example.ORG/a.jpg",
    "http://example.org./a.jpg",
    "http://example.org:80/a.jpg",
    "http://example.org:0080/a.jpg",
    "http://example.org:8080/a.jpg",
    "https://example.org:443/a.jpg",
    "https://example.org:8443/a.jpg",
    "http://user:pw@example.org/a.jpg",
    "http://user@evil.example@example.org/a.jpg",
    "http://example.org:80@evil.example/a.jpg",
    "http://example.org\\@evil.example/a.jpg",
    "http://ex%40mple.org/a.jpg",
    "http://[::1]/a.jpg",
    "http://[::1]:8080/a.jpg",
    "http://[2001:db8::1]/a.jpg",
    "http://[2001:DB8::1]:8443/a.jpg",
    "http://[::ffff:127.0.0.1]/a.jpg",
    "http://[fe80::1%25eth0]/a.jpg",
    "http://[::1/a.jpg",
    "http://[::1]x/a.jpg",
    "http://[::1]:80:80/a.jpg",
    "http://../a.jpg",
    "http://.../a.jpg",
    "http://./a.jpg",
    "http://a..b/a.jpg",
    "http://..%2F../a.jpg",
    "http://a%2F..%2Fb/a.jpg",
    "http://%2e%2e/a.jpg",
    "http://%2e%2e%2f%2e%2e/a.jpg",
    "http://a%00b/a.jpg",
    "http://a%5cb/a.jpg",
    "http://example.org/../../etc/passwd",
    "http://bücher.de/a.jpg",
    "http://BÜCHER.de/a.jpg",
    "http://xn--bcher-kva.de/a.jpg",
    "http://straße.de/a.jpg",
    "http://strasse.de/a.jpg",
    "http://例え.テスト/a.jpg",
    "http://a\u2025b/a.jpg",  # TWO DOT LEADER: NFKC makes it ".."
    "http://\u2025/a.jpg",
    "http://a\uff0fb/a.jpg",  # FULLWIDTH SOLIDUS: NFKC makes it "/"
    "http://a\uff0e\uff0e/a.jpg",
    "http://\u2024/a.jpg",
    "http://host:99999/a.jpg",
    "http://host:-1/a.jpg",
    "http://host:0x50/a.jpg",
    "http://host:/a.jpg",
    "http://:80/a.jpg",
    "http://a b/a.jpg",
    "http://a\\b/a.jpg",
    "http://a;b/a.jpg",
    "http://a'b/a.jpg",
    'http://a"b/a.jpg',
    "http://a$(id)/a.jpg",
    "http://a`id`/a.jpg",
    "ftp://example.org/a.jpg",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "http:/example.org/a.jpg",
    "http://",
    "//example.org/a.jpg",
]


def _write_urls(path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uuid", "identifier", "source_id"])
        for i, url in enumerate(URLS):
            writer.writerow([f"u{i}", url, f"s{i}"])
    return path


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """url -> (server_name, reject reason), through the real initializer reader."""
    path = _write_urls(tmp_path_factory.mktemp("names") / "urls.csv")
    out: dict[str, tuple[str, str]] = {}
    for batch in inputs.rows(path):
        for row in batch.to_pylist():
            out[row["identifier"]] = (row["server_name"], row["_reject"])
    assert set(out) == set(URLS), set(URLS) - set(out)
    return out


@pytest.fixture(scope="module")
def initialized(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], dict[str, str]]:
    """The real initialize stage over URLS: (url -> reason in the rejected table, url -> server of its batch)."""
    folder = tmp_path_factory.mktemp("initialized")
    raw = {"path_to_input": str(_write_urls(folder / "urls.csv")), "path_to_output": str(folder / "output")}
    config = config_mod.validate(raw)
    paths = config_mod.paths(config)
    stages.initialize(config, paths.urls_manifest)
    rejected = {row["identifier"]: row["reason"] for row in pq.read_table(paths.rejected_table).to_pylist()}
    batched: dict[str, str] = {}
    for file in paths.urls.glob("server_name=*/partition_id=*/urls.parquet"):
        server = file.parent.parent.name.split("=", 1)[1]
        for url in pq.read_table(file, columns=["identifier"]).column("identifier").to_pylist():
            assert url not in batched, url
            batched[url] = server
    assert set(rejected) | set(batched) == set(URLS) and not set(rejected) & set(batched)
    return rejected, batched


def test_every_server_name_stays_a_single_folder_inside_the_output(
    named: dict[str, tuple[str, str]], tmp_path: Path
) -> None:
    out = (tmp_path / "out").resolve()
    out.mkdir()
    names = {name for name, reason in named.values() if not reason}
    assert len(names) >= 12  # the table really exercises accepted names, not just rejections
    for name in names:
        assert name and name not in (".", "..") and not set(name) & {"/", "\\", "\0"}, repr(name)
        folder = Path(out, f"server_name={name}")
        assert folder.resolve().parent == out, name
        folder.mkdir()  # for real: one new entry directly in out
    assert len(os.listdir(out)) == len(names)


def test_rejections_name_a_reason(named: dict[str, tuple[str, str]]) -> None:
    rejected = {url: reason for url, (name, reason) in named.items() if reason}
    for url in ("http://../a.jpg", "http://a%2F..%2Fb/a.jpg", "http://%2e%2e/a.jpg", "http://[fe80::1%25eth0]/a.jpg"):
        assert rejected.get(url), url
    assert all(not named[url][0] for url in rejected)


# URLs of one server share one name; different servers never do.
SAME_SERVER = [
    [
        "http://example.org/a.jpg",
        "http://EXAMPLE.org/a.jpg",
        "HTTP://Example.ORG/a.jpg",
        "http://example.org./a.jpg",
        "http://example.org:80/a.jpg",
        "http://example.org:0080/a.jpg",
        "https://example.org:443/a.jpg",
        "http://user:pw@example.org/a.jpg",
        "http://user@evil.example@example.org/a.jpg",
    ],
    ["http://example.org:8080/a.jpg"],
    ["https://example.org:8443/a.jpg"],
    ["http://example.org:80@evil.example/a.jpg"],
    ["http://[::1]/a.jpg"],
    ["http://[::1]:8080/a.jpg"],
    ["http://[2001:db8::1]/a.jpg"],
    ["http://[2001:DB8::1]:8443/a.jpg"],
    ["http://[::ffff:127.0.0.1]/a.jpg"],
    ["http://bücher.de/a.jpg", "http://BÜCHER.de/a.jpg", "http://xn--bcher-kva.de/a.jpg"],
    ["http://例え.テスト/a.jpg"],
    ["http://a..b/a.jpg"],
]


def test_one_name_per_server_and_distinct_servers_distinct_names(named: dict[str, tuple[str, str]]) -> None:
    group_names = []
    for group in SAME_SERVER:
        names = {named[url][0] for url in group}
        assert len(names) == 1 and "" not in names, (group, names)
        group_names.append(names.pop())
    assert len(set(group_names)) == len(group_names), group_names


def test_idna_2008_hosts_do_not_collide(named: dict[str, tuple[str, str]]) -> None:
    assert named["http://straße.de/a.jpg"][0] != named["http://strasse.de/a.jpg"][0]


def _client_server(url: str) -> str | None:
    """host[:port] the HTTP client (requests/urllib3) would contact, or None if it refuses the URL."""
    try:
        parsed = urllib3.util.parse_url(requests.Request("GET", url).prepare().url)
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ValueError):
        return None
    host = (parsed.host or "").lower().rstrip(".")
    default = 443 if parsed.scheme == "https" else 80
    return host if parsed.port in (None, default) else f"{host}:{parsed.port}"


@pytest.fixture(scope="module")
def fetcher() -> Iterator[ServerFetcher]:
    params = config_mod.validate({"path_to_input": "x", "path_to_output": "y"})["downloader_parameters"]
    with contextlib.closing(ServerFetcher(FetchSettings.from_config(params))) as made:
        yield made


@pytest.mark.parametrize("url", URLS)
def test_each_url_is_rejected_refused_or_named_after_the_server_the_client_contacts(
    named: dict[str, tuple[str, str]],
    initialized: tuple[dict[str, str], dict[str, str]],
    fetcher: ServerFetcher,
    url: str,
) -> None:
    """Per-server politeness only holds if the requests of a server_name really go to that server. So a URL
    is rejected at initialization (in the rejected table with its reason, in no batch), or it sits in the
    batch of its server_name and either the fetcher refuses it before any request or the HTTP client
    contacts exactly that server."""
    name, reason = named[url]
    rejected, batched = initialized
    client = _client_server(url)
    if reason:
        assert name == "" and rejected.get(url) == reason and url not in batched
    elif client is None:
        assert batched.get(url) == name
        with pytest.raises(DownloadError, match="invalid URL"):  # raised before any lookup or connection
            fetcher.get(url)
    else:
        assert batched.get(url) == name == client


# ---------------------------------------------------------------- no config value or URL reaches a shell unquoted

# Placeholders allowed unquoted, with why: they come from the profile / integers, and `mpi` is a
# command prefix ("srun --mpi=pmi2 ...") that must be split into words (params.mpi: resources.mpi with
# a bare mpiexec resolved beside the interpreter, re-joined with shlex.join).
UNQUOTED_OK = {"resources.mpi", "params.mpi", "resources.tasks", "threads"}


def _workflow_files() -> list[Path]:
    return [REPO / "Snakefile", *sorted((REPO / "rules").rglob("*.smk"))]


def _shell_commands(path: Path) -> list[str]:
    """The command text of every `shell:` directive in a Snakemake file."""
    lines = path.read_text().splitlines()
    commands = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)shell:\s*(.*)$", line)
        if not match:
            continue
        indent, rest = len(match.group(1)), match.group(2)
        parts = [rest] if rest else []
        for follow in lines[i + 1 :]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            parts.append(follow.strip())
        commands.append(ast.literal_eval("(" + "\n".join(p for p in parts if p) + ")"))
    return commands


def test_every_shell_placeholder_is_quoted() -> None:
    found = 0
    for path in _workflow_files():
        text = path.read_text()
        commands = _shell_commands(path)
        assert len(commands) == len(re.findall(r"^\s*shell:", text, re.M)), path
        assert not re.search(r"\bshell\(|os\.system|subprocess", text), f"{path}: a shell call outside shell:"
        for command in commands:
            found += 1
            for placeholder in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", command):
                if placeholder not in UNQUOTED_OK:
                    assert placeholder.endswith(":q"), f"{path.name}: {{{placeholder}}} is not quoted in {command!r}"
    assert found >= 2  # download and tool_run


def test_package_code_never_uses_a_shell() -> None:
    for path in sorted((REPO / "workflow_scripts").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = ast.unparse(node.func)
            assert called not in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"), (
                f"{path}:{node.lineno}: {called}"
            )
            for keyword in node.keywords:
                if keyword.arg == "shell":
                    assert isinstance(keyword.value, ast.Constant) and keyword.value.value is False, (
                        f"{path}:{node.lineno}: shell=True"
                    )


@pytest.mark.e2e
def test_download_job_with_spaces_and_dollar_in_paths(tmp_path: Path) -> None:
    """A real run whose input, output and working folders contain spaces, `$HOME` and `;`."""
    odd = "dir $HOME;x"
    work, output = tmp_path / f"work {odd}", tmp_path / f"out {odd}"
    work.mkdir()
    with ImageFarm(1, seed=5) as farm:
        paths = [f"/img/odd{i}.jpg?w=96&h=64" for i in range(4)]
        urls = [farm.url(0, p) for p in paths] + [farm.url(0, "/status/404")]
        source = tmp_path / f"in {odd}.csv"
        with open(source, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["uuid", "identifier", "source_id"])
            writer.writerows([f"odd-{i}", url, f"s{i}"] for i, url in enumerate(urls))
        config = work / "config $USER.yaml"
        params = {
            "num_downloads": 1,
            "workers_per_node": 2,
            "allow_private_addresses": True,
            "timeout": {"connect": 5, "read": 5, "total": 10},
        }
        raw = {"path_to_input": str(source), "path_to_output": str(output), "downloader_parameters": params}
        config.write_text(yaml.safe_dump(raw))
        run(snakemake_cmd(config, work), timeout=300)
    successes = read_all(output / "downloaded_images", "successes.parquet")
    expected = {hashlib.md5(farm.expected_bytes(p)).hexdigest() for p in paths}
    assert {row["hashsum_original"] for row in successes} == expected
    assert [row["error_code"] for row in read_all(output / "downloaded_images", "errors.parquet")] == [404]
    assert json.loads((output / "reports" / "verification.json").read_text())["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([work.name, output.name, source.name])
    assert list(output.glob("logs/download/round_1/rank_*.log"))  # the mpiexec line found its paths


def test_report_plots_survive_a_quote_in_the_output_path(tmp_path: Path) -> None:
    from distributed_downloader.report import plots

    images = tmp_path / "out 'q'" / "downloaded_images"
    batch = images / "server_name=a.example" / "partition_id=0"
    batch.mkdir(parents=True)
    row = {
        "uuid": "u",
        "identifier": "http://a.example/x",
        "retry_count": 0,
        "error_code": 404,
        "error_msg": "HTTP 404",
    }
    pq.write_table(pa.Table.from_pylist([row]), batch / "errors.parquet")
    verification = {"servers": {"a.example": {"urls": 1, "errors": 1, "success_rate": 0.0}}}
    plots.errors_by_server(images, verification, tmp_path / "errors.svg")
    assert (tmp_path / "errors.svg").stat().st_size > 0


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root)."""
    if os.geteuid() != 0:
        skip_or_fail("a 1 MiB tmpfs needs root (mount -t tmpfs)")
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def _success_row(i: int) -> dict:
    return {
        "uuid": f"u{i}",
        "source_id": "s",
        "identifier": f"http://127.0.0.2/{i}.jpg",
        "is_license_full": False,
        "license": "l",
        "source": "s",
        "title": "t",
        "hashsum_original": "0" * 32,
        "hashsum_resized": "0" * 32,
        "original_size": [10, 10],
        "resized_size": [10, 10],
        "image": os.urandom(100_000),  # incompressible
    }


@pytest.mark.parametrize("row_group_rows", [2, 256], ids=["mid-write", "at-commit"])
def test_streaming_parquet_on_a_full_disk_leaves_nothing(tiny_disk: Path, row_group_rows: int) -> None:
    target = tiny_disk / "successes.parquet"
    writer = StreamingParquet(target, SUCCESS_SCHEMA, row_group_rows=row_group_rows)
    with pytest.raises(OSError) as info:
        try:
            for i in range(30):  # 3 MB into 1 MiB
                writer.append(_success_row(i))
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    assert info.value.errno == errno.ENOSPC and "No space left on device" in str(info.value)
    assert not target.exists()
    assert os.listdir(tiny_disk) == []  # the temp file is gone too


def test_a_batch_whose_commit_hits_a_full_disk_fails_clearly_without_a_marker(tiny_disk: Path) -> None:
    """The batch is reported failed with the reason (the next round downloads it again); the lane lives."""
    output = tiny_disk / "out"
    config = config_mod.validate(
        {
            "path_to_input": str(tiny_disk / "unused.csv"),
            "path_to_output": str(output),
            "downloader_parameters": {
                "allow_private_addresses": True,
                "respect_robots_txt": False,
                "image_format": "raw_bgr",  # big rows (raw pixels): a few images fill the disk
                "timeout": 5,
            },
        }
    )
    paths = config_mod.paths(config)
    with ImageFarm(1, seed=9) as farm:
        server = farm.base_urls[0].split("//", 1)[1]
        urls = [farm.url(0, f"/img/full{i}.png?w=700&h=700") for i in range(8)]
        write_batch_urls(paths.batch_urls(server, 0), urls)
        spec = LaneSpec(server, 0, 1, start_rate=50, max_rate=100, max_connections=4, decrease=0.5)
        lane = Lane(spec, config, paths, round_no=1)
        try:
            stats = lane.run_batch(0, "f" * 32, "full")
        finally:
            lane.close()
    assert "No space left on device" in stats.failed and f"[Errno {errno.ENOSPC}]" in stats.failed
    assert "next round" in stats.failed
    final = paths.batch_images(server, 0)
    assert not (final / MARKER_FILE).exists()
    assert not final.exists() or not list(final.glob("*.parquet"))
    assert not [p for p in paths.staging.rglob("*") if p.is_file()]  # no half files left behind
