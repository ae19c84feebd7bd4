"""Loopback hosts that serve fixed bytes at fixed paths (the ImageFarm renders its images instead).

``StaticHosts([{"/a.png": b"..."}, {...}])`` starts one HTTP/1.1 server per mapping on 127.0.0.x
(keep-alive, Content-Length, no robots.txt: 404); any other path is a 404.
"""

from __future__ import annotations

import contextlib
import ipaddress
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], routes: dict[str, bytes]) -> None:
        self.routes = routes
        self.requests = 0
        self.lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up mid-body is routine here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30.0
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base-class signature
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        with self.server.lock:
            self.server.requests += 1
        body = self.server.routes.get(unquote(urlsplit(self.path).path))
        status, content_type = 200, None
        if body is None:
            status, body, content_type = 404, b"not found\n", "text/plain"
        else:
            content_type = mimetypes.guess_type(self.path)[0] or "application/octet-stream"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class StaticHosts:
    """One loopback HTTP server per routes mapping; ``url(host, path)`` is the URL of ``path`` there."""

    def __init__(self, routes: list[dict[str, bytes]], first_address: int = 40) -> None:
        first = int(ipaddress.IPv4Address("127.0.0.0")) + first_address
        if first_address < 1 or first_address + len(routes) > 255:
            raise ValueError("host addresses must stay inside 127.0.0.1-127.0.0.254")
        self.addresses = [str(ipaddress.IPv4Address(first + i)) for i in range(len(routes))]
        self._routes = routes
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self.base_urls: list[str] = []

    def start(self) -> StaticHosts:
        try:
            for address, routes in zip(self.addresses, self._routes, strict=True):
                self._servers.append(_Server((address, 0), routes))
        except OSError:
            self.stop()
            raise
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.base_urls = [f"http://{s.server_address[0]}:{s.server_address[1]}" for s in self._servers]
        return self

    def stop(self) -> None:
        servers, threads = self._servers, self._threads
        self._threads = []  # the servers stay, for their request counts
        for server in servers[: len(threads)]:
            server.shutdown()
        for server in servers:
            with contextlib.suppress(OSError):
                server.server_close()
        for thread in threads:
            thread.join(2.0)

    def requests(self, host: int) -> int:
        """Requests ``host`` has answered so far (readable after ``stop``)."""
        return self._servers[host].requests

    def __enter__(self) -> StaticHosts:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, host: int, path: str) -> str:
        """The URL of ``path`` (unquoted, as in the routes) on ``host``."""
        return self.base_urls[host] + quote(path, safe="/")
