"""A local stand-in for the Hugging Face Hub's file endpoints, for tests that must stay offline.

It is a real HTTP server on 127.0.0.1 (a random free port, one thread per connection) that answers
what ``huggingface_hub.hf_hub_download``, ``get_hf_file_metadata`` and ``file_download.http_get``
ask for (checked against huggingface_hub 2.4):

- ``HEAD /{repo_id}/resolve/{revision}/{filename}``: 200 with ``X-Repo-Commit`` (required by the
  client), ``ETag`` and ``X-Linked-Etag`` (sha256 of the content, like an LFS file),
  ``Content-Length`` and ``X-Linked-Size``; a missing file gets 404 with ``X-Error-Code:
  EntryNotFound``.
- ``GET`` of the same path: the bytes, honouring ``Range: bytes=N-`` (206 with ``Content-Range``),
  which the client sends when it resumes an interrupted transfer. The ETag is the sha256 of the
  content, so replacing a file's bytes in :attr:`FakeHub.files` changes its ETag, as on the Hub.
- ``GET /api/models/{repo_id}`` and ``.../revision/{revision}``: a minimal model-info JSON.

``revision`` may be ``main`` or the fake commit hash. Every request is logged in
:attr:`FakeHub.requests`, and :attr:`FakeHub.interrupt_after` cuts the next GET (or GETs) of a file
short to simulate a dropped connection.

Example:
    >>> with FakeHub({"a.pt": b"..."}) as hub:
    ...     hf_hub_download("si-pbc/hertz-dev", "a.pt", endpoint=hub.endpoint, local_dir=tmp)
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import unquote, urlsplit

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class LoggedRequest:
    """One request the fake hub received."""

    method: str
    path: str
    range: str | None


class FakeHub:
    """Serve ``files`` (name -> content) as the repository ``repo_id`` at :attr:`endpoint`.

    Args:
        files: File name -> bytes. Mutable while serving (e.g. to corrupt a file).
        repo_id: The repository path served.

    Attributes:
        files: The served content.
        requests: Every request received, in order.
        interrupt_after: File name -> byte count: the next GET of that file sends full headers,
            then only that many body bytes, and drops the connection (one shot). A list of byte
            counts cuts that many GETs in a row, one count each: ``[100] + [0] * 9`` lets 100 bytes
            through, then hangs up on the next nine attempts before any body byte (enough to exhaust
            the client's retries, so the call fails).
    """

    def __init__(self, files: dict[str, bytes], repo_id: str = "si-pbc/hertz-dev") -> None:
        self.files = dict(files)
        self.repo_id = repo_id
        self.requests: list[LoggedRequest] = []
        self.interrupt_after: dict[str, int | list[int]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-hf-hub", daemon=True
        )

    @property
    def endpoint(self) -> str:
        """The base URL to pass as ``endpoint=`` (or ``HF_ENDPOINT``)."""
        return f"http://127.0.0.1:{self._server.server_port}"

    def gets(self, filename: str | None = None) -> list[LoggedRequest]:
        """The GET requests for file contents received so far, optionally for one file only."""
        suffix = f"/{filename}" if filename else ""
        return [
            r
            for r in self.requests
            if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(suffix)
        ]

    def start(self) -> FakeHub:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _log(self, request: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_interrupt(self, filename: str) -> int | None:
        with self._lock:
            cuts = self.interrupt_after.get(filename)
            if not isinstance(cuts, list):
                return self.interrupt_after.pop(filename, None)
            cut = cuts.pop(0) if cuts else None
            if not cuts:
                del self.interrupt_after[filename]
            return cut


def unreachable_endpoint() -> str:
    """An endpoint on 127.0.0.1 where nothing listens (a port bound, then released).

    Connecting to it is refused.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = (
            "HTTP/1.1"  # keep-alive, as the real Hub; every response sets Content-Length
        )

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
            pass  # keep test output clean

        def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
            self._handle(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._handle(body=True)

        def _handle(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub._log(LoggedRequest(self.command, path, self.headers.get("Range")))
            api = f"/api/models/{hub.repo_id}"
            if path == api or path.startswith(api + "/revision/"):
                self._send_json(body)
                return
            prefix = f"/{hub.repo_id}/resolve/"
            if not path.startswith(prefix):
                self._send_error(404, "RepoNotFound", body)
                return
            revision, _, filename = path[len(prefix) :].partition("/")
            if revision not in ("main", FAKE_COMMIT):
                self._send_error(404, "RevisionNotFound", body)
                return
            content = hub.files.get(filename)
            if content is None:
                self._send_error(404, "EntryNotFound", body)
                return
            self._send_file(filename, content, body)

        def _send_file(self, filename: str, content: bytes, body: bool) -> None:
            size = len(content)
            start, status = 0, 200
            match = _RANGE.match(self.headers.get("Range", "")) if body else None
            if match:
                start = int(match.group(1))
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            sha = hashlib.sha256(content).hexdigest()
            self.send_response(status)
            self.send_header("X-Repo-Commit", FAKE_COMMIT)
            self.send_header("ETag", f'"{sha}"')
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(size))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if not body:
                return
            cut = hub._take_interrupt(filename)
            if cut is not None:
                # Promise the whole body, deliver part of it, hang up: the client sees a truncated
                # transfer.
                self.wfile.write(content[start : start + cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(content[start:])

        def _send_json(self, body: bool) -> None:
            info = {
                "id": hub.repo_id,
                "modelId": hub.repo_id,
                "sha": FAKE_COMMIT,
                "private": False,
                "siblings": [
                    {"rfilename": name, "size": len(data)}
                    for name, data in sorted(hub.files.items())
                ],
            }
            payload = json.dumps(info).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Repo-Commit", FAKE_COMMIT)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def _send_error(self, status: int, code: str, body: bool) -> None:
            payload = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Repo-Commit", FAKE_COMMIT)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler
