"""The client's plumbing: server addresses, one I/O thread for every remote socket, and the errors.

``client.py`` builds remote engines and sessions on top of it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import re
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import aiohttp

from hertz_agents.backend import REMOTE_SCHEME as SCHEME
from hertz_agents.errors import AudioInputError, EngineFull, HertzError, SessionClosed
from hertz_agents.remote import protocol as p

T = TypeVar("T")

TOKEN_ENV = "HERTZ_TOKEN"
"""The environment variable clients and ``hertz-agents serve`` read the token from."""


class ServerUnavailable(HertzError, ConnectionError):
    """No hertz server answers at the address, or it takes no sessions now (shutting down)."""


class AuthenticationFailed(HertzError, PermissionError):
    """The server refused the token."""


class ServerGone(SessionClosed):
    """A session lost its server and every reconnection attempt failed."""


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a session that loses its server tries again: ``attempts`` tries with doubling delays."""

    attempts: int = 5
    initial_delay: float = 0.2
    max_delay: float = 2.0

    def delays(self) -> Iterator[float]:
        """The waits before each reconnection attempt, in seconds."""
        delay = self.initial_delay
        for _ in range(self.attempts):
            yield delay
            delay = min(delay * 2, self.max_delay)


@dataclass(frozen=True)
class ServerAddress:
    """Where a hertz server listens, and the token to show it."""

    host: str
    port: int
    tls: bool = False
    token: str | None = field(default=None, repr=False)  # never in logs or tracebacks

    @classmethod
    def parse(cls, url: str, token: str | None = None) -> tuple[ServerAddress, dict[str, str]]:
        """A ``hertz://`` URL -> the address and its other query parameters."""
        # The query or a user-info part may hold the token: never echo either.
        shown = re.sub(r"//[^/@]*@", "//", url.split("?", 1)[0])
        if not url.startswith(SCHEME):
            raise ValueError(f"a remote engine URL looks like hertz://HOST:PORT, got {shown!r}")
        parts = urlsplit("http://" + url[len(SCHEME) :])
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if not parts.hostname:
            raise ValueError(f"no host in {shown!r}; use hertz://HOST:PORT")
        tls = query.get("tls", "0").lower() in ("1", "true", "yes")
        try:
            port = parts.port or (443 if tls else 8000)
        except ValueError:
            raise ValueError(f"bad port in {shown!r}; use hertz://HOST:PORT") from None
        token = token or query.get("token") or os.environ.get(TOKEN_ENV) or None
        return cls(parts.hostname, port, tls, token), query

    def url(self, path: str, websocket: bool = False) -> str:
        """The http(s) or ws(s) URL of ``path`` on this server."""
        scheme = ("wss" if self.tls else "ws") if websocket else ("https" if self.tls else "http")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header, when there is a token."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def __str__(self) -> str:
        return f"{SCHEME}{self.host}:{self.port}"


class _IOThread:
    """One event loop on a daemon thread for every remote socket of the process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._http: aiohttp.ClientSession | None = None
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="hertz-remote-io", daemon=True
        )
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the I/O loop; its result as a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("blocking remote calls cannot run on the remote I/O thread")
        return self.submit(coro).result(timeout)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed (interpreter exit)
            pass

    def http(self) -> aiohttp.ClientSession:
        """The shared aiohttp session (only on the I/O thread)."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
            )
        return self._http

    def stop(self) -> None:
        async def close() -> None:
            if self._http is not None:
                await self._http.close()

        if self.loop.is_running():
            try:
                self.submit(close()).result(2)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)


_io_thread: _IOThread | None = None
_io_lock = threading.Lock()


def io_thread() -> _IOThread:
    """The process's one I/O thread for remote sockets (started on first use)."""
    global _io_thread
    with _io_lock:
        if _io_thread is None:
            _io_thread = _IOThread()
            atexit.register(_io_thread.stop)
        return _io_thread


def unavailable(address: ServerAddress, e: BaseException) -> ServerUnavailable:
    """The ServerUnavailable error for a failed connection to ``address``."""
    return ServerUnavailable(
        f"no hertz server answers at {address} ({type(e).__name__}: {e}); start one with "
        f"`hertz-agents serve --model MODEL --port {address.port}` or check the host and port"
    )


async def fetch_info(address: ServerAddress, timeout: float) -> dict[str, Any]:
    """The server's ``/v1/info`` (raises ServerUnavailable or AuthenticationFailed)."""
    try:
        async with (
            io_thread()
            .http()
            .get(
                address.url(p.INFO_PATH),
                headers=address.headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r
        ):
            status = r.status
            info = await r.json() if status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        raise unavailable(address, e) from e
    if status == 401:
        raise AuthenticationFailed(
            f"the hertz server at {address} refused the token; pass the server's "
            f"token (hertz://...?token=, token=, or ${TOKEN_ENV})"
        )
    if not isinstance(info, dict):
        raise ServerUnavailable(
            f"the server at {address} answered {status} to {p.INFO_PATH}; "
            "is it a hertz-agents server?"
        )
    return info


def error_from(error: p.Error, address: ServerAddress) -> BaseException:
    """The server's refusal as the exception a local engine would raise for the same cause."""
    message = f"hertz server at {address}: {error.message} ({error.code})"
    if error.code == p.ErrorCode.SERVER_FULL.value:
        return EngineFull(message)
    if error.code == p.ErrorCode.DRAINING.value:
        return ServerUnavailable(message)
    if error.code in (p.ErrorCode.UNKNOWN_PROMPT.value, p.ErrorCode.BAD_PROMPT.value):
        return AudioInputError(message)
    return SessionClosed(message)
