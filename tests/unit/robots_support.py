"""Support for the robots.txt tests: a conformance table and a tiny scriptable loopback server.

The table: RFC 9309's examples and the kinds of case Google's conformance suite checks (written
here from the RFC and from what those cases test, not copied).

Each case: (id, robots.txt, product token, path, expected allowed, source). Where Google's
implementation departs from the RFC (it does not decode %-escaped unreserved characters, nor
encode a raw non-ASCII URL), the expectation follows the RFC. The "google" cases cover behaviour
the RFC leaves open that Google's reference parser defines (a missing colon, `Googlebot/2.1`,
`index.html` as its directory).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple


class Case(NamedTuple):
    id: str
    robots: str
    token: str
    path: str
    allowed: bool
    source: str  # rfc | google | ours


RFC_EXAMPLE = """\
User-Agent: *
Disallow: *.gif$
Disallow: /example/
Allow: /publications/

User-Agent: foobot
Disallow:/
Allow:/example/page.html
Allow:/example/allowed.gif

User-Agent: barbot
User-Agent: bazbot
Disallow: /example/page.html

User-Agent: quxbot

EOF
"""

GROUPS = """\
allow: /foo/bar/

user-agent: FooBot
disallow: /
allow: /x/
user-agent: BarBot
disallow: /
allow: /y/


allow: /w/
user-agent: BazBot

user-agent: FooBot
allow: /z/
disallow: /
"""

SPECIAL = "User-agent: FooBot\nDisallow: /foo/bar/quz\nAllow: /foo/*/qux\n"
DOLLAR = "User-agent: FooBot\nDisallow: /foo/bar$\nAllow: /foo/bar/qux\n"
FISH = "User-agent: *\nDisallow: /fish*\n"
FISH_PHP = "User-agent: *\nDisallow: /fish*.php\n"
PHP_END = "User-agent: *\nDisallow: /*.php$\n"
FISH_DIR = "User-agent: *\nDisallow: /fish/\n"
LONG_FILE = (
    "User-agent: *\n" + "".join(f"Disallow: /filler/{i:06d}/\n" for i in range(15_000)) + "Disallow: /last-rule/\n"
)
LONG_LINE = "User-agent: *\nDisallow: /" + "a" * 100_000 + "\n"

CASES: list[Case] = [
    # RFC 9309 §5.1, the full example
    Case("rfc-example-star-gif", RFC_EXAMPLE, "otherbot", "/images/a.gif", False, "rfc"),
    Case("rfc-example-star-gif-query", RFC_EXAMPLE, "otherbot", "/images/a.gif?x=1", True, "rfc"),
    Case("rfc-example-star-dir", RFC_EXAMPLE, "otherbot", "/example/x", False, "rfc"),
    Case("rfc-example-star-allow-longer", RFC_EXAMPLE, "otherbot", "/publications/a.gif", True, "rfc"),
    Case("rfc-example-star-other", RFC_EXAMPLE, "otherbot", "/other", True, "rfc"),
    Case("rfc-example-foobot-root", RFC_EXAMPLE, "foobot", "/", False, "rfc"),
    Case("rfc-example-foobot-page", RFC_EXAMPLE, "foobot", "/example/page.html", True, "rfc"),
    Case("rfc-example-foobot-gif", RFC_EXAMPLE, "foobot", "/example/allowed.gif", True, "rfc"),
    Case("rfc-example-foobot-not-star", RFC_EXAMPLE, "foobot", "/publications/", False, "rfc"),
    Case("rfc-example-barbot-page", RFC_EXAMPLE, "barbot", "/example/page.html", False, "rfc"),
    Case("rfc-example-barbot-no-star-rules", RFC_EXAMPLE, "barbot", "/example/other", True, "rfc"),
    Case("rfc-example-bazbot-shares-group", RFC_EXAMPLE, "bazbot", "/example/page.html", False, "rfc"),
    Case("rfc-example-quxbot-empty-group", RFC_EXAMPLE, "quxbot", "/example/page.html", True, "rfc"),
    Case("rfc-example-quxbot-no-star-fallback", RFC_EXAMPLE, "quxbot", "/a.gif", True, "rfc"),
    Case("rfc-token-case-insensitive", RFC_EXAMPLE, "FOOBOT", "/", False, "rfc"),
    # RFC 9309 §5.2, longest match
    Case(
        "rfc-longest-disallow",
        "User-Agent: foobot\nAllow: /example/page/\nDisallow: /example/page/disallowed.gif\n",
        "foobot",
        "/example/page/disallowed.gif",
        False,
        "rfc",
    ),
    Case(
        "rfc-longest-allow",
        "User-Agent: foobot\nAllow: /example/page/\nDisallow: /example/page/disallowed.gif\n",
        "foobot",
        "/example/page/x.gif",
        True,
        "rfc",
    ),
    # RFC 9309 §2.2.1: groups for the same product token are merged
    *(
        Case(
            f"rfc-merge-groups-{path.strip('/')}",
            "user-agent: ExampleBot\ndisallow: /foo\ndisallow: /bar\n\nuser-agent: ExampleBot\ndisallow: /baz\n",
            "examplebot",
            path,
            path == "/qux",
            "rfc",
        )
        for path in ("/foo", "/bar", "/baz", "/qux")
    ),
    Case("rfc-no-group-no-star", "User-agent: FooBot\nDisallow: /\n", "barbot", "/x", True, "rfc"),
    Case("rfc-empty-file", "", "foobot", "/x", True, "rfc"),
    Case("rfc-empty-disallow", "User-agent: *\nDisallow:\n", "foobot", "/x", True, "rfc"),
    Case("rfc-robots-txt-always-allowed", "User-agent: *\nDisallow: /\n", "foobot", "/robots.txt", True, "rfc"),
    Case("rfc-disallow-all", "User-agent: *\nDisallow: /\n", "foobot", "/robots", False, "rfc"),
    # RFC 9309 §2.2.2: equivalent allow and disallow -> allow
    Case(
        "rfc-tie-allow-wins",
        "User-agent: *\nDisallow: /x/page.html\nAllow: /x/page.html\n",
        "foobot",
        "/x/page.html",
        True,
        "rfc",
    ),
    Case("rfc-tie-allow-wins-wildcards", "User-agent: *\nDisallow: /*b\nAllow: /a*\n", "foobot", "/ab", True, "rfc"),
    # RFC 9309 §2.2.2 percent-encoding table
    Case(
        "rfc-encoding-query", "User-agent: *\nDisallow: /foo/bar?baz=quz\n", "foobot", "/foo/bar?baz=quz", False, "rfc"
    ),
    Case(
        "rfc-encoding-utf8-pattern",
        "User-agent: *\nDisallow: /foo/bar/ツ\n",
        "foobot",
        "/foo/bar/%E3%83%84",
        False,
        "rfc",
    ),
    Case(
        "rfc-encoding-utf8-url", "User-agent: *\nDisallow: /foo/bar/%E3%83%84\n", "foobot", "/foo/bar/ツ", False, "rfc"
    ),
    Case(
        "rfc-encoding-encoded-both",
        "User-agent: *\nDisallow: /foo/bar/%E3%83%84\n",
        "foobot",
        "/foo/bar/%E3%83%84",
        False,
        "rfc",
    ),
    Case(
        "rfc-encoding-unreserved",
        "User-agent: *\nDisallow: /foo/bar/%62%61%7A\n",
        "foobot",
        "/foo/bar/baz",
        False,
        "rfc",
    ),
    Case(
        "rfc-encoding-unreserved-url",
        "User-agent: *\nDisallow: /foo/bar/baz\n",
        "foobot",
        "/foo/bar/%62%61%7A",
        False,
        "rfc",
    ),
    Case("rfc-encoding-hex-case", "User-agent: *\nDisallow: /a%3c\n", "foobot", "/a%3C", False, "rfc"),
    Case("rfc-encoding-slash-stays-encoded", "User-agent: *\nDisallow: /a%2Fb\n", "foobot", "/a/b", True, "rfc"),
    Case("rfc-encoding-slash-encoded-match", "User-agent: *\nDisallow: /a%2Fb\n", "foobot", "/a%2fb", False, "rfc"),
    # RFC 9309 §2.2.3: special characters matched literally through %-encoding
    Case(
        "rfc-literal-star",
        "User-agent: *\nDisallow: /path/file-with-a-%2A.html\n",
        "foobot",
        "/path/file-with-a-*.html",
        False,
        "rfc",
    ),
    Case("rfc-literal-dollar", "User-agent: *\nDisallow: /path/foo-%24\n", "foobot", "/path/foo-$", False, "rfc"),
    Case(
        "rfc-comment-in-value",
        "User-agent: FooBot\nDisallow: /foo/quz#qux\nAllow: /\n",
        "foobot",
        "/foo/quz",
        False,
        "rfc",
    ),
    Case(
        "rfc-comment-line",
        "User-agent: FooBot\n# Disallow: /\nDisallow: /foo/quz#qux\n",
        "foobot",
        "/foo/bar",
        True,
        "rfc",
    ),
    # Wildcards and $ (Google's documentation examples)
    Case("wild-fish-exact", FISH, "foobot", "/fish", False, "google"),
    Case("wild-fish-html", FISH, "foobot", "/fish.html", False, "google"),
    Case("wild-fish-subdir", FISH, "foobot", "/fishheads/yummy.html", False, "google"),
    Case("wild-fish-case", FISH, "foobot", "/Fish.asp", True, "google"),
    Case("wild-fish-not-prefix", FISH, "foobot", "/catfish", True, "google"),
    Case("wild-fish-php", FISH_PHP, "foobot", "/fishheads/catfish.php?parameters", False, "google"),
    Case("wild-fish-php-case", FISH_PHP, "foobot", "/Fish.PHP", True, "google"),
    Case("dollar-php", PHP_END, "foobot", "/folder/filename.php", False, "google"),
    Case("dollar-php-query", PHP_END, "foobot", "/filename.php?parameters", True, "google"),
    Case("dollar-php-slash", PHP_END, "foobot", "/filename.php/", True, "google"),
    Case("dollar-php5", PHP_END, "foobot", "/filename.php5", True, "google"),
    Case("dir-fish-query", FISH_DIR, "foobot", "/fish/?id=anything", False, "google"),
    Case("dir-fish-not-file", FISH_DIR, "foobot", "/fish.html", True, "google"),
    Case("special-disallowed", SPECIAL, "foobot", "/foo/bar/quz", False, "google"),
    Case("special-other", SPECIAL, "foobot", "/foo/quz", True, "google"),
    Case("special-double-slash", SPECIAL, "foobot", "/foo//quz", True, "google"),
    Case("special-bax", SPECIAL, "foobot", "/foo/bax/quz", True, "google"),
    Case("dollar-exact", DOLLAR, "foobot", "/foo/bar", False, "google"),
    Case("dollar-longer-allowed", DOLLAR, "foobot", "/foo/bar/qux", True, "google"),
    Case("dollar-slash", DOLLAR, "foobot", "/foo/bar/", True, "google"),
    Case("dollar-baz", DOLLAR, "foobot", "/foo/bar/baz", True, "google"),
    Case("dollar-in-middle-literal", "User-agent: *\nDisallow: /a$b\n", "foobot", "/a$b", False, "ours"),
    Case("query-wildcard", "User-agent: *\nDisallow: /*?\n", "foobot", "/page?x=1", False, "google"),
    Case("query-wildcard-no-query", "User-agent: *\nDisallow: /*?\n", "foobot", "/page", True, "google"),
    Case("star-pattern-without-slash", "User-agent: *\nDisallow: *.jpg\n", "foobot", "/a/b.jpg", False, "rfc"),
    # Longest match
    Case(
        "longest-star-html",
        "User-agent: FooBot\nAllow: /page\nDisallow: /*.html\n",
        "foobot",
        "/page.html",
        False,
        "google",
    ),
    Case(
        "longest-star-page", "User-agent: FooBot\nAllow: /page\nDisallow: /*.html\n", "foobot", "/page", True, "google"
    ),
    Case(
        "longest-allow-dot",
        "User-agent: FooBot\nAllow: /x/page.\nDisallow: /*.html\n",
        "foobot",
        "/x/page.html",
        True,
        "google",
    ),
    Case(
        "longest-allow-dot-other",
        "User-agent: FooBot\nAllow: /x/page.\nDisallow: /*.html\n",
        "foobot",
        "/x/y.html",
        False,
        "google",
    ),
    Case(
        "longest-order-free",
        "User-agent: FooBot\nDisallow: /x/\nAllow: /x/page.html\n",
        "foobot",
        "/x/page.html",
        True,
        "google",
    ),
    Case("longest-root-dollar", "User-agent: FooBot\nAllow: /$\nDisallow: /\n", "foobot", "/", True, "google"),
    Case(
        "longest-root-dollar-page",
        "User-agent: FooBot\nAllow: /$\nDisallow: /\n",
        "foobot",
        "/page.html",
        False,
        "google",
    ),
    Case("longest-empty-rules", "User-agent: FooBot\nallow: \ndisallow: \n", "foobot", "/x", True, "google"),
    # Groups
    Case("groups-foobot-x", GROUPS, "FooBot", "/x/b", True, "google"),
    Case("groups-foobot-z", GROUPS, "FooBot", "/z/d", True, "google"),
    Case("groups-foobot-y", GROUPS, "FooBot", "/y/c", False, "google"),
    Case("groups-barbot-y", GROUPS, "BarBot", "/y/c", True, "google"),
    Case("groups-barbot-after-blank-lines", GROUPS, "BarBot", "/w/a", True, "google"),
    Case("groups-barbot-z", GROUPS, "BarBot", "/z/d", False, "google"),
    Case("groups-bazbot-blank-line-in-agents", GROUPS, "BazBot", "/z/d", True, "google"),
    Case("groups-rule-before-agent-ignored", GROUPS, "FooBot", "/foo/bar/", False, "google"),
    Case(
        "groups-sitemap-does-not-split",
        "User-agent: BarBot\nSitemap: https://foo.bar/sitemap\nUser-agent: *\nDisallow: /\n",
        "barbot",
        "/",
        False,
        "rfc",
    ),
    Case(
        "groups-unknown-line-does-not-split",
        "User-agent: BarBot\nInvalid-Unknown-Line: unknown\nUser-agent: *\nDisallow: /\n",
        "barbot",
        "/",
        False,
        "rfc",
    ),
    Case(
        "groups-global-other-bot",
        "user-agent: *\nallow: /\nuser-agent: FooBot\ndisallow: /\n",
        "barbot",
        "/x",
        True,
        "google",
    ),
    Case(
        "groups-global-named-bot",
        "user-agent: *\nallow: /\nuser-agent: FooBot\ndisallow: /\n",
        "foobot",
        "/x",
        False,
        "google",
    ),
    Case(
        "groups-multiple-agent-lines", "User-agent: a\nUser-agent: FooBot\nDisallow: /p\n", "foobot", "/p", False, "rfc"
    ),
    Case("token-no-prefix-match", "User-agent: foo\nDisallow: /\n", "foobot", "/x", True, "rfc"),
    Case("token-no-suffix-match", "User-agent: bot\nDisallow: /\n", "foobot", "/x", True, "rfc"),
    Case(
        "token-hyphen-no-prefix-match",
        "User-agent: distributed\nDisallow: /\n",
        "distributed-downloader",
        "/x",
        True,
        "rfc",
    ),
    Case(
        "token-hyphen-exact",
        "User-agent: Distributed-Downloader\nDisallow: /\n",
        "distributed-downloader",
        "/x",
        False,
        "rfc",
    ),
    Case("token-version-suffix", "User-agent: FooBot/1.0\nDisallow: /\n", "foobot", "/x", False, "google"),
    Case(
        "token-up-to-space",
        "User-Agent: *\nDisallow: /\nUser-Agent: Foo Bar\nAllow: /x/\nDisallow: /\n",
        "foo",
        "/x/y",
        True,
        "google",
    ),
    Case("token-value-case", "User-Agent: FOOBOT\nDisallow: /\n", "foobot", "/x", False, "rfc"),
    Case("star-group-falls-back", "User-agent: *\nDisallow: /private/\n", "foobot", "/private/x", False, "rfc"),
    # Syntax
    Case("case-directives", "USER-AGENT: FooBot\nALLOW: /x/\nDISALLOW: /\n", "foobot", "/x/y", True, "google"),
    Case("case-directives-mixed", "uSeR-aGeNt: FooBot\nAlLoW: /x/\nDiSaLlOw: /\n", "foobot", "/a", False, "google"),
    Case("case-path-sensitive", "User-agent: *\nDisallow: /x/\n", "foobot", "/X/", True, "rfc"),
    Case("missing-colon", "user-agent FooBot\ndisallow /\n", "foobot", "/x", False, "google"),
    Case("bom", "\ufeffUser-agent: FooBot\nDisallow: /\n", "foobot", "/x", False, "google"),
    Case("crlf", "User-agent: FooBot\r\nDisallow: /a\r\nAllow: /a/b\r\n", "foobot", "/a/c", False, "google"),
    Case("crlf-allow", "User-agent: FooBot\r\nDisallow: /a\r\nAllow: /a/b\r\n", "foobot", "/a/b", True, "google"),
    Case("cr-only", "User-agent: FooBot\rDisallow: /a\rAllow: /a/b\r", "foobot", "/a/c", False, "google"),
    Case(
        "mixed-line-endings",
        "User-agent: FooBot\nDisallow: /a\r\nAllow: /a/b\rDisallow: /c\n",
        "foobot",
        "/c",
        False,
        "google",
    ),
    Case("whitespace-around", "  User-agent :  FooBot  \n\t Disallow :  /a  \n", "foobot", "/a", False, "rfc"),
    Case("comment-after-agent", "User-agent: FooBot # our bot\nDisallow: /\n", "foobot", "/x", False, "rfc"),
    Case(
        "index-html-is-directory",
        "User-Agent: *\nAllow: /allowed-slash/index.html\nDisallow: /\n",
        "foobot",
        "/allowed-slash/",
        True,
        "google",
    ),
    Case(
        "index-html-not-htm",
        "User-Agent: *\nAllow: /allowed-slash/index.html\nDisallow: /\n",
        "foobot",
        "/allowed-slash/index.htm",
        False,
        "google",
    ),
    Case("long-file-last-rule", LONG_FILE, "foobot", "/last-rule/x", False, "ours"),
    Case("long-file-other", LONG_FILE, "foobot", "/other", True, "ours"),
    Case("long-line", LONG_LINE, "foobot", "/" + "a" * 100_000, False, "ours"),
    Case("long-line-shorter-url", LONG_LINE, "foobot", "/" + "a" * 99_999, True, "ours"),
    Case("url-with-brackets", "User-agent: *\nDisallow: /a[b]\n", "foobot", "/a[b]", False, "ours"),
    Case("url-with-fnmatch-chars", "User-agent: *\nDisallow: /a[0-9]\n", "foobot", "/a5", True, "ours"),
]


# ---------------------------------------------------------------- a scriptable loopback server


class Reply(NamedTuple):
    status: int
    body: bytes = b""
    headers: dict[str, str] = {}
    chunked: bool = False  # no Content-Length: the body ends when the connection closes


Route = Reply | Callable[[], Reply]


class RobotsServer:
    """A loopback HTTP server answering scripted replies per path (404 otherwise), recording each path.

    ``routes`` may be changed while it runs; a route may be a callable (a new Reply per request).
    """

    def __init__(self, routes: dict[str, Route] | None = None, address: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.paths: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base-class signature
                pass

            def do_GET(self) -> None:
                with server.lock:
                    server.paths.append(self.path)
                    route = server.routes.get(self.path.split("?", 1)[0], Reply(404, b"not found"))
                reply = route() if callable(route) else route
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.chunked:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

        self.httpd = ThreadingHTTPServer((address, 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> RobotsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for p in self.paths if p.split("?", 1)[0] == path)
