"""``hertz-agents serve``: one engine, many remote conversations, over WebSocket (aiohttp).

Routes:

* ``GET /v1/session`` (WebSocket): the hertz-agents protocol (``protocol.py``);
* ``GET /audio`` and ``/t/<token>/audio`` (WebSocket), ``POST /set_temperature``: the original
  hertz-dev server's protocol (``compat.py``);
* ``GET /healthz`` (the process and its engine thread are alive), ``GET /readyz`` (it takes new
  sessions: not full, not draining), ``GET /metrics`` (Prometheus text), ``GET /v1/info``.

The model never runs here: the engine steps every session in its own process
(``engine_process.py``; or on its own thread with ``--no-engine-process``), the handlers only
move audio and messages. Only ``/healthz`` and ``/readyz`` answer without the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from hertz_agents import __version__
from hertz_agents.backend import Backend, BackendStats
from hertz_agents.remote import protocol as p
from hertz_agents.server.auth import TokenAuth
from hertz_agents.server.compat import CompatEndpoint
from hertz_agents.server.guards import GuardedSite, PeerGuard, PeerLimits
from hertz_agents.server.native import NativeSession
from hertz_agents.server.prometheus import CONTENT_TYPE, ServerMetrics
from hertz_agents.server.prompts import PromptCatalogue
from hertz_agents.server.sessions import Connection, ConnectionHost, SessionEnd
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

__all__ = ["HertzServer", "ServerConfig", "run_server", "start_site"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ServerConfig:
    """How a server behaves; the CLI fills it from its flags."""

    limits: p.Limits = field(default_factory=p.Limits)
    token: str | None = None
    prompts: dict[str, Path] = field(default_factory=dict)  # name -> WAV, known to every client
    default_prompt: str | None = None  # for starts without a prompt, and compatibility sessions
    allow_inline_prompts: bool = True
    max_inline_prompts: int = 16  # distinct inline prompts kept (their prefills stay in the engine)
    max_inline_prompts_per_peer: int = 4  # ... of which one peer address may add this many
    max_pending_connections: int = 64  # sockets that have not started yet
    peer_limits: PeerLimits = field(default_factory=PeerLimits)
    model_name: str = ""


class HertzServer:
    """The state of one server: its backend, its connections, its figures.

    It is the :class:`~hertz_agents.server.sessions.ConnectionHost` of every connection.

    Args:
        engine: The backend every session takes a slot from (a local ``Engine``).
        config: How the server behaves.
    """

    def __init__(self, engine: Backend, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self.auth = TokenAuth(self.config.token)
        self._metrics = ServerMetrics()
        self._prompts = PromptCatalogue(
            self.config.prompts,
            default=self.config.default_prompt,
            allow_inline=self.config.allow_inline_prompts,
            max_inline=self.config.max_inline_prompts,
            max_prompt_bytes=self.config.limits.max_prompt_bytes,
            max_prompt_seconds=self.config.limits.max_prompt_seconds,
            max_inline_per_peer=self.config.max_inline_prompts_per_peer,
        )
        self.compat = CompatEndpoint()
        self.peers = PeerGuard(self.config.peer_limits)
        self.connections: set[Connection] = set()
        self.draining = False
        self._changed = asyncio.Event()

    # -- what connections see (ConnectionHost) ------------------------------------------------
    @property
    def backend(self) -> Backend:
        """The engine every connection takes its slot from."""
        return self.engine

    @property
    def limits(self) -> p.Limits:
        """The limits every session is held to."""
        return self.config.limits

    @property
    def metrics(self) -> ServerMetrics:
        """The server's figures."""
        return self._metrics

    @property
    def prompts(self) -> PromptCatalogue:
        """The prompts this server knows."""
        return self._prompts

    def full_refusal(self) -> p.ProtocolError:
        """The one "every slot is taken" refusal (sessions and ``/readyz`` alike)."""
        return p.ProtocolError(
            p.ErrorCode.SERVER_FULL,
            (
                f"all {self.engine.max_sessions} session slots of this server are in use; "
                "try again "
                "later, or send the call to another server"
            ),
        )

    def admission_refusal(self) -> p.ProtocolError | None:
        """The one admission check: why a new session cannot start now, or None."""
        if self.draining:
            return p.ProtocolError(
                p.ErrorCode.DRAINING, "this server is shutting down; connect to another one"
            )
        if self.engine.active_sessions >= self.engine.max_sessions:
            return self.full_refusal()
        return None

    def attach(self, connection: Connection) -> None:
        """A connection begins."""
        self.connections.add(connection)

    def detach(self, connection: Connection) -> None:
        """A connection has ended (wakes ``drain``)."""
        self.connections.discard(connection)
        self._changed.set()

    def info_summary(self) -> dict[str, Any]:
        """Sessions in use, capacity, draining, and the server's counters."""
        return {
            "active_sessions": self.engine.active_sessions,
            "max_sessions": self.engine.max_sessions,
            "draining": self.draining,
            **self.metrics.summary(),
        }

    # -- the application ------------------------------------------------------------------
    def make_app(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application(client_max_size=64 * 1024)
        compat_base = "/t/{token}"
        app.router.add_get(p.SESSION_PATH, self._authed(self._session))
        app.router.add_get(p.COMPAT_PATH, self._authed(self._compat))
        app.router.add_get(compat_base + p.COMPAT_PATH, self._authed(self._compat))
        temperature = self._authed(self.compat.set_temperature)
        app.router.add_post(p.COMPAT_TEMPERATURE_PATH, temperature)
        app.router.add_post(compat_base + p.COMPAT_TEMPERATURE_PATH, temperature)
        app.router.add_get(p.INFO_PATH, self._authed(self._info))
        app.router.add_get("/metrics", self._authed(self._metrics_page))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    def _authed(self, handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            peer = request.remote or ""
            if self.peers.blocked(peer):  # no token check, no body: the cheapest answer there is
                self.metrics.auth_failures += 1
                self.peers.told_blocked(peer)  # later connections are cut at accept (guards.py)
                return _closing(429, "too many failed authentications from this address; wait")
            token = request.match_info.get("token")
            if not self.auth.check_request(request.headers, request.query, token):
                self.metrics.auth_failures += 1
                self.peers.auth_failed(peer)
                # Closing the connection also discards any requests pipelined behind this one.
                return _closing(
                    401,
                    "missing or wrong token; send 'Authorization: Bearer <token>' (or ?token=)",
                    "unauthorized",
                )
            return await handler(request)

        return checked

    # -- sessions ---------------------------------------------------------------------------
    async def _session(self, request: web.Request) -> web.StreamResponse:
        return await self._websocket(request, NativeSession, self.config.limits.max_message_bytes)

    async def _compat(self, request: web.Request) -> web.StreamResponse:
        limit = (self.config.limits.max_frame_bytes + 2) // 3 * 4 + len(p.COMPAT_PREFIX) + 1024
        return await self._websocket(request, self.compat.session, limit)

    async def _websocket(
        self,
        request: web.Request,
        make: Callable[[ConnectionHost, web.WebSocketResponse], Connection],
        max_msg: int,
    ) -> web.StreamResponse:
        peer = request.remote or ""
        if not self.peers.take_start(peer):
            self.metrics.rejected["rate_limited"] += 1
            return _closing(429, "too many session starts from this address; slow down")
        pending = [c for c in self.connections if not c.started]
        per_peer = self.config.peer_limits.max_pending_per_peer
        if len(pending) >= self.config.max_pending_connections or (
            per_peer > 0 and sum(c.peer == peer for c in pending) >= per_peer
        ):
            self.metrics.rejected["too_many_connections"] += 1
            return _closing(503, "too many connections are opening; retry", "busy")
        limits = self.config.limits
        ws = web.WebSocketResponse(
            max_msg_size=max_msg,
            heartbeat=limits.heartbeat,
            timeout=2.0,
            compress=False,
            writer_limit=SEND_BUFFER_BYTES,  # waits for the client every 16 KiB, not 64 KiB
        )
        await ws.prepare(request)
        _small_send_buffers(request)
        connection = make(self, ws)
        connection.peer = peer
        connection.transport = request.transport
        await connection.run()
        return ws

    def active_by_endpoint(self) -> dict[str, int]:
        """Connections holding a slot now, by endpoint."""
        counts: Counter[str] = Counter({"session": 0, "compat": 0})
        for c in self.connections:
            if c.started and c.slot is not None and not c.slot.closed:
                counts[c.endpoint] += 1
        return dict(counts)

    # -- plain HTTP -------------------------------------------------------------------------
    async def _info(self, request: web.Request) -> web.StreamResponse:
        stats = self.engine if isinstance(self.engine, BackendStats) else None
        return web.json_response(
            {
                "server": "hertz-agents",
                "version": __version__,
                "protocol": p.PROTOCOL_VERSION,
                "model": self.config.model_name,
                "sample_rate": SAMPLE_RATE,
                "samples_per_step": SAMPLES_PER_STEP,
                "prompts": self.prompts.names,
                "default_prompt": self.prompts.default,
                "inline_prompts": self.prompts.allow_inline,
                "limits": self.config.limits.to_dict(),
                "peer_limits": self.config.peer_limits.to_dict(),
                "session_state_bytes": stats.bytes_per_session() if stats is not None else None,
                **self.info_summary(),
            }
        )

    async def _metrics_page(self, request: web.Request) -> web.StreamResponse:
        text = self.metrics.render(
            active=self.active_by_endpoint(),
            max_sessions=self.engine.max_sessions,
            draining=self.draining,
            engine=self.engine,
        )
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    def engine_alive(self) -> bool:
        """The engine's worker runs (a backend that cannot say counts as alive)."""
        return self.engine.alive if isinstance(self.engine, BackendStats) else True

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        alive = self.engine_alive()
        return web.json_response(
            {"status": "ok" if alive else "engine stopped"}, status=200 if alive else 503
        )

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        refusal = self.admission_refusal()
        if not self.engine_alive():
            status = "engine stopped"
        elif refusal is not None:
            status = "draining" if refusal.code == p.ErrorCode.DRAINING else "full"
        else:
            status = "ready"
        return web.json_response(
            {
                "status": status,
                "active_sessions": self.engine.active_sessions,
                "max_sessions": self.engine.max_sessions,
            },
            status=200 if status == "ready" else 503,
        )

    # -- shutdown ---------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        """Take no new sessions; let the open ones finish for up to ``timeout`` s, then end them.

        They end with close code 1001 ("going away"), so clients reconnect to another server.
        """
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(c.started for c in self.connections) and loop.time() < deadline:
            await self._wait_for_change(deadline - loop.time())
        for c in list(self.connections):
            c.end(SessionEnd("shutdown", p.CLOSE_GOING_AWAY, "the server is shutting down"))
        deadline = loop.time() + 3.0
        while self.connections and loop.time() < deadline:
            await self._wait_for_change(deadline - loop.time())

    async def _wait_for_change(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(timeout, 0.001))


def _closing(status: int, message: str, error: str = "refused") -> web.Response:
    """A short JSON refusal that also closes the connection (no keep-alive, no pipelining)."""
    response = web.json_response({"error": error, "message": message}, status=status)
    response.force_close()
    return response


SEND_BUFFER_BYTES = 16 * 1024  # per WebSocket: ~4 output steps in the kernel, ~4 in the transport


def _small_send_buffers(request: web.Request) -> None:
    """Keep little output in buffers, so a client that stops reading blocks its sends at once.

    With the default buffers (megabytes on Linux) a client that never reads would absorb
    minutes of output before the server noticed; the send-stall limit needs sends to block.
    """
    transport = request.transport
    if transport is None:
        return
    transport.set_write_buffer_limits(high=SEND_BUFFER_BYTES)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


async def start_site(server: HertzServer, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``server``'s application on ``host:port`` with every guard; (runner, bound port)."""
    peer = server.config.peer_limits
    runner = web.AppRunner(
        server.make_app(),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=2.0,
        keepalive_timeout=peer.keepalive_timeout,
    )
    await runner.setup()
    site = GuardedSite(
        runner, host, port, header_timeout=peer.header_timeout, refuse=server.peers.cut_at_accept
    )
    await site.start()
    addresses = runner.addresses
    return runner, (addresses[0][1] if addresses else port)


async def run_server(
    server: HertzServer,
    host: str,
    port: int,
    *,
    drain_timeout: float = 30.0,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set), then drain and return."""
    runner, _ = await start_site(server, host, port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    addresses = runner.addresses
    bound = addresses[0] if addresses else (host, port)
    url = (
        f"http://{bound[0]}:{bound[1]}"
        if ":" not in str(bound[0])
        else f"http://[{bound[0]}]:{bound[1]}"
    )
    # Everything loaded so far lives as long as the server: moved out of the collector's sight,
    # a full collection (which a flood of connections triggers) no longer walks it while every
    # caller's next step waits on this loop.
    gc.freeze()
    if on_ready is not None:
        on_ready(url)
    try:
        await stop.wait()
    finally:
        log.info("draining sessions (up to %.0f s)", drain_timeout)
        await server.drain(drain_timeout)
        await runner.cleanup()
