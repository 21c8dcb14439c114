"""Budgets that keep one client (or one peer address) from starving the others.

Per connection (:class:`~hertz_agents.remote.protocol.Limits`, sent to clients in ``started``):
audio and control message rates, a minimum audio message size, a step token bucket. Per peer
address (:class:`PeerLimits`, here): connections that have not started, session starts a second,
and a throttle after failed authentications that rejects without checking anything. And one
server-wide guard: a connection that has not sent a whole request head within
``header_timeout`` seconds is closed (slowloris, idle sockets that never authenticate).

Every check is O(1) and allocation-free on the hot path: a budget that costs more than the
work it protects would itself be the attack.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

__all__ = ["GuardedSite", "HeaderTimeoutFactory", "PeerGuard", "PeerLimits", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` kept: credit does not build up while idle.

    Args:
        rate: Tokens added per second.
        burst: The most tokens held at once (the bucket starts full).
        clock: The time source (``time.monotonic``).
    """

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate")

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens if there are that many; False (nothing taken) if not."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False


@dataclass(frozen=True)
class PeerLimits:
    """What one peer address (an IP) may do, server-wide. 0 turns a limit off."""

    max_pending_per_peer: int = 4  # its WebSockets that have not started a session yet
    starts_per_second: float = 2.0  # session starts (WebSocket upgrades) a second, per peer
    start_burst: int = 8  # ... of which this many at once
    auth_failures: int = 5  # failed authentications within auth_window_seconds, then ...
    auth_window_seconds: float = 10.0
    auth_block_seconds: float = 30.0  # ... its requests are cut without any check for this long
    header_timeout: float = 5.0  # to send a whole request head after connecting (any peer)
    keepalive_timeout: float = 5.0  # an idle HTTP keep-alive connection is closed after this

    def to_dict(self) -> dict[str, Any]:
        """The limits as ``/v1/info`` shows them."""
        return asdict(self)


class PeerGuard:
    """Per-peer state for :class:`PeerLimits`: start buckets and auth-failure records.

    Entries are dropped once they carry no information, so many peers cannot grow it for long:
    ``sweep`` runs at most once a second and forgets full buckets and expired failure records.
    """

    def __init__(self, limits: PeerLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._starts: dict[str, TokenBucket] = {}
        self._failures: dict[str, list[float]] = {}  # peer -> times of recent failures
        self._blocked_until: dict[str, float] = {}
        self._told: set[str] = set()  # blocked peers that have had the 429 with its reason
        self._swept = clock()

    def blocked(self, peer: str) -> bool:
        """The peer failed authentication too often lately: cut it without any work."""
        until = self._blocked_until.get(peer)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._blocked_until[peer]
        self._told.discard(peer)
        return False

    def told_blocked(self, peer: str) -> None:
        """The blocked ``peer`` has been answered with the reason; cut it at accept from now."""
        if self.blocked(peer):
            self._told.add(peer)

    def cut_at_accept(self, peer: str) -> bool:
        """Whether to cut a new connection from ``peer`` before reading a byte of it.

        Only once the peer has had one answer that says why (HTTP 429): every later attempt
        within the block would cost a request parse and a response for nothing.
        """
        return peer in self._told and self.blocked(peer)

    def auth_failed(self, peer: str) -> None:
        """Record a failed authentication; block the peer when it has failed too often."""
        lim = self.limits
        if lim.auth_failures <= 0:
            return
        now = self._clock()
        recent = [t for t in self._failures.get(peer, ()) if now - t < lim.auth_window_seconds]
        recent.append(now)
        if len(recent) >= lim.auth_failures:
            self._blocked_until[peer] = now + lim.auth_block_seconds
            self._failures.pop(peer, None)
        else:
            self._failures[peer] = recent
        self._sweep(now)

    def take_start(self, peer: str) -> bool:
        """Count a session start for ``peer``; False when it is over its start rate."""
        lim = self.limits
        if lim.starts_per_second <= 0:
            return True
        bucket = self._starts.get(peer)
        if bucket is None:
            bucket = self._starts[peer] = TokenBucket(
                lim.starts_per_second, lim.start_burst, self._clock
            )
        self._sweep(self._clock())
        return bucket.take()

    def _sweep(self, now: float) -> None:
        if now - self._swept < 1.0:
            return
        self._swept = now
        window = self.limits.auth_window_seconds
        self._failures = {k: v for k, v in self._failures.items() if now - v[-1] < window}
        self._blocked_until = {k: v for k, v in self._blocked_until.items() if v > now}
        self._told &= self._blocked_until.keys()
        full = now - self.limits.start_burst / max(self.limits.starts_per_second, 1e-9)
        self._starts = {k: b for k, b in self._starts.items() if b._last > full}


class HeaderTimeoutFactory:
    """Wraps aiohttp's protocol factory: the guards that act before any HTTP is parsed.

    A connection from an address that is blocked, and has already been told why
    (``refuse(address)``, :meth:`PeerGuard.cut_at_accept`), is cut as soon as it is accepted,
    before aiohttp builds anything for it: a wrong-token flood opens hundreds of connections a
    second, and an aiohttp handler, its task and a parse per attempt turned that into most of the
    front end's CPU (and the garbage collector's pauses into late steps for every caller). And
    since aiohttp has no request-head timeout, a connection without a whole request head in time is
    closed, or a client that sends a header byte now and then (slowloris) would hold its socket and
    parser forever.

    Args:
        factory: aiohttp's ``web.Server`` (called once per admitted connection).
        timeout: Seconds a connection has to deliver its first request head.
        refuse: Whether connections from this address are cut at once (None: none are).
    """

    def __init__(
        self,
        factory: Callable[[], Any],
        timeout: float,
        refuse: Callable[[str], bool] | None = None,
    ) -> None:
        self._factory, self._timeout, self._refuse = factory, timeout, refuse
        self.closed_for_timeout = 0
        self.refused_blocked = 0

    def __call__(self) -> asyncio.Protocol:
        """A new connection's first protocol, which admits it or cuts it once its peer is known."""
        return _Admission(self)

    def admit(self, transport: asyncio.Transport) -> None:
        """Cut ``transport`` if its peer is refused; else hand it to an aiohttp handler."""
        peer = transport.get_extra_info("peername")
        if self._refuse is not None and peer and self._refuse(str(peer[0])):
            self.refused_blocked += 1
            transport.abort()  # nothing built, parsed or answered
            return
        handler = self._factory()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._timeout > 0:
            asyncio.get_running_loop().call_later(self._timeout, self._check, handler)

    def _check(self, handler: Any) -> None:
        # _request_count: heads aiohttp has parsed on this connection (a private field, read only;
        # getattr keeps a future aiohttp without it from failing: the guard then does nothing).
        transport = getattr(handler, "transport", None)
        if transport is not None and getattr(handler, "_request_count", 1) == 0:
            self.closed_for_timeout += 1
            transport.abort()


class _Admission(asyncio.Protocol):
    """A connection's protocol until its peer is checked (the transport then switches protocol).

    The transport calls ``connection_made`` before it reads a byte, so no data reaches this object.
    """

    def __init__(self, guards: HeaderTimeoutFactory) -> None:
        self._guards = guards

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._guards.admit(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # cut before anything was built: nothing to free


class GuardedSite(web.TCPSite):
    """A ``TCPSite`` with :class:`HeaderTimeoutFactory`'s guards on every accepted connection."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        header_timeout: float,
        refuse: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__(runner, host, port)
        self.header_timeout = header_timeout
        self.refuse = refuse
        self.factory: HeaderTimeoutFactory | None = None

    async def start(self) -> None:
        """Listen, with the request-head deadline on every accepted connection."""
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self.factory = HeaderTimeoutFactory(server, self.header_timeout, self.refuse)
        self._server = await asyncio.get_running_loop().create_server(
            self.factory, self._host, self._port, reuse_address=True
        )
