"""``hertz-agents serve``: one engine, many remote conversations, over WebSocket (aiohttp).

Routes:

* ``GET /v1/session`` (WebSocket): the hertz-agents protocol (``protocol.py``);
* ``GET /audio`` and ``/t/<token>/audio`` (WebSocket), ``POST /set_temperature``: the original
  hertz-dev server's protocol (``compat.py``);
* ``GET /healthz`` (the process and its engine thread are alive), ``GET /readyz`` (it takes new
  sessions: not full, not draining), ``GET /metrics`` (Prometheus text), ``GET /v1/info``.

The model never runs here: the engine steps every session on its own thread, the handlers only
move audio and messages. Only ``/healthz`` and ``/readyz`` answer without the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from hertz_agents import __version__
from hertz_agents.audio import read_audio
from hertz_agents.errors import AudioInputError
from hertz_agents.sampling import SamplingSettings
from hertz_agents.server import protocol as p
from hertz_agents.server.auth import TokenAuth
from hertz_agents.server.compat import CompatSession, parse_temperatures
from hertz_agents.server.prometheus import CONTENT_TYPE, ServerMetrics
from hertz_agents.server.sessions import Connection, NativeSession, SessionEnd
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

log = logging.getLogger(__name__)

PROMPT_MIN_SECONDS = 0.25  # two steps: the engine's shortest prompt


@dataclass
class ServerConfig:
    """How a server behaves; the CLI fills it from its flags."""

    limits: p.Limits = field(default_factory=p.Limits)
    token: str | None = None
    prompts: dict[str, Path] = field(default_factory=dict)  # name -> WAV, known to every client
    default_prompt: str | None = None  # for starts without a prompt, and compatibility sessions
    allow_inline_prompts: bool = True
    max_inline_prompts: int = 16  # distinct inline prompts kept (their prefills stay in the engine)
    max_pending_connections: int = 64  # sockets that have not started yet
    model_name: str = ""


class HertzServer:
    """The state of one server: its engine, its connections, its figures."""

    def __init__(self, engine: Any, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self.auth = TokenAuth(self.config.token)
        self.metrics = ServerMetrics()
        self.connections: set[Connection] = set()
        self.draining = False
        self.compat_sampling = SamplingSettings()
        self._inline_prompts: set[str] = set()
        self._changed = asyncio.Event()
        if self.config.default_prompt is not None and self.config.default_prompt not in self.config.prompts:
            raise ValueError(f"the default prompt {self.config.default_prompt!r} is not one of the registered "
                             f"prompts {sorted(self.config.prompts)}")

    # -- the application ------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get(p.SESSION_PATH, self._authed(self._session))
        app.router.add_get(p.COMPAT_PATH, self._authed(self._compat))
        app.router.add_get("/t/{token}" + p.COMPAT_PATH, self._authed(self._compat))
        app.router.add_post(p.COMPAT_TEMPERATURE_PATH, self._authed(self._set_temperature))
        app.router.add_post("/t/{token}" + p.COMPAT_TEMPERATURE_PATH, self._authed(self._set_temperature))
        app.router.add_get(p.INFO_PATH, self._authed(self._info))
        app.router.add_get("/metrics", self._authed(self._metrics))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    def _authed(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        async def checked(request: web.Request) -> web.StreamResponse:
            if not self.auth.check_request(request.headers, request.query, request.match_info.get("token")):
                self.metrics.auth_failures += 1
                return web.json_response({"error": "unauthorized", "message": "missing or wrong token; send "
                                          "'Authorization: Bearer <token>' (or ?token=)"}, status=401)
            return await handler(request)

        return checked

    # -- sessions ---------------------------------------------------------------------------
    async def _session(self, request: web.Request) -> web.StreamResponse:
        return await self._websocket(request, NativeSession, self.config.limits.max_message_bytes)

    async def _compat(self, request: web.Request) -> web.StreamResponse:
        limit = (self.config.limits.max_frame_bytes + 2) // 3 * 4 + len(p.COMPAT_PREFIX) + 1024
        return await self._websocket(request, CompatSession, limit)

    async def _websocket(self, request: web.Request, kind: type[Connection], max_msg: int) -> web.StreamResponse:
        pending = sum(not c.started for c in self.connections)
        if pending >= self.config.max_pending_connections:
            self.metrics.rejected["too_many_connections"] += 1
            return web.json_response({"error": "busy", "message": "too many connections are opening; retry"},
                                     status=503)
        limits = self.config.limits
        ws = web.WebSocketResponse(max_msg_size=max_msg, heartbeat=limits.heartbeat, timeout=2.0, compress=False)
        await ws.prepare(request)
        await kind(self, ws).run()
        return ws

    def full_message(self) -> str:
        return (f"all {self.engine.max_sessions} session slots of this server are in use; try again later, "
                "or send the call to another server")

    def default_prompt_ref(self) -> p.Prompt | None:
        return p.Prompt(name=self.config.default_prompt) if self.config.default_prompt else None

    async def resolve_prompt(self, prompt: p.Prompt | None) -> Path | np.ndarray | None:
        """A start's prompt -> what the engine takes, or SessionEnd saying why it is refused."""
        prompt = prompt or self.default_prompt_ref()
        if prompt is None:
            return None
        if prompt.name is not None:
            path = self.config.prompts.get(prompt.name)
            if path is None:
                known = ", ".join(sorted(self.config.prompts)) or "none"
                raise self._refuse(p.ErrorCode.UNKNOWN_PROMPT, f"this server has no prompt named {prompt.name!r} "
                                   f"(it knows: {known})")
            return path
        if not self.config.allow_inline_prompts:
            raise self._refuse(p.ErrorCode.BAD_PROMPT, "this server takes only named prompts; ask its operator to "
                               "register yours with --prompt NAME=FILE")
        audio = prompt.audio or b""
        if len(audio) > self.config.limits.max_prompt_bytes:
            raise self._refuse(p.ErrorCode.BAD_PROMPT, f"inline prompts are at most "
                               f"{self.config.limits.max_prompt_bytes} bytes; register longer ones on the server")
        digest = hashlib.sha256(audio).hexdigest()
        if digest not in self._inline_prompts and len(self._inline_prompts) >= self.config.max_inline_prompts:
            raise self._refuse(p.ErrorCode.BAD_PROMPT, f"this server already holds {self.config.max_inline_prompts} "
                               "different inline prompts, its limit; use one of its named prompts or register yours")
        try:
            array = await asyncio.to_thread(read_audio, io.BytesIO(audio), channels=2, min_seconds=PROMPT_MIN_SECONDS)
        except AudioInputError as e:
            raise self._refuse(p.ErrorCode.BAD_PROMPT, f"the inline prompt cannot be read: {e}") from None
        self._inline_prompts.add(digest)
        return array

    def _refuse(self, code: p.ErrorCode, message: str) -> SessionEnd:
        self.metrics.rejected[code.value] += 1
        return SessionEnd.from_error(p.ProtocolError(code, message))

    def active_by_endpoint(self) -> dict[str, int]:
        counts: Counter[str] = Counter({"session": 0, "compat": 0})
        for c in self.connections:
            if c.started and c.bridge is not None and not c.bridge.closed:
                counts[c.endpoint] += 1
        return dict(counts)

    # -- plain HTTP -------------------------------------------------------------------------
    async def _set_temperature(self, request: web.Request) -> web.StreamResponse:
        try:
            changes = parse_temperatures(request.query)
        except ValueError as e:
            return web.json_response({"message": f"not changed: {e}"}, status=400)
        self.compat_sampling = self.compat_sampling.replace(**changes)
        for c in self.connections:
            if isinstance(c, CompatSession) and c.started and c.bridge is not None:
                c.bridge.update_sampling(self.compat_sampling)
        s = self.compat_sampling
        return web.json_response({"message": f"temperatures set: token {s.token_temp}, categorical "
                                  f"{s.categorical_temp}, gaussian {s.gaussian_temp}"})

    def info_summary(self) -> dict[str, Any]:
        return {"active_sessions": self.engine.active_sessions, "max_sessions": self.engine.max_sessions,
                "draining": self.draining, **self.metrics.summary()}

    async def _info(self, request: web.Request) -> web.StreamResponse:
        per_session = getattr(self.engine, "bytes_per_session", None)
        return web.json_response({
            "server": "hertz-agents", "version": __version__, "protocol": p.PROTOCOL_VERSION,
            "model": self.config.model_name, "sample_rate": SAMPLE_RATE, "samples_per_step": SAMPLES_PER_STEP,
            "prompts": sorted(self.config.prompts), "default_prompt": self.config.default_prompt,
            "inline_prompts": self.config.allow_inline_prompts, "limits": self.config.limits.to_dict(),
            "session_state_bytes": per_session() if callable(per_session) else None, **self.info_summary(),
        })

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        text = self.metrics.render(active=self.active_by_endpoint(), max_sessions=self.engine.max_sessions,
                                   draining=self.draining, engine=self.engine)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    def engine_alive(self) -> bool:
        return bool(getattr(self.engine, "alive", True))

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        alive = self.engine_alive()
        return web.json_response({"status": "ok" if alive else "engine stopped"}, status=200 if alive else 503)

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        if not self.engine_alive():
            status = "engine stopped"
        elif self.draining:
            status = "draining"
        elif self.engine.active_sessions >= self.engine.max_sessions:
            status = "full"
        else:
            status = "ready"
        return web.json_response({"status": status, "active_sessions": self.engine.active_sessions,
                                  "max_sessions": self.engine.max_sessions}, status=200 if status == "ready" else 503)

    # -- shutdown ---------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        """Take no new sessions; let the open ones finish for up to ``timeout`` s; then end them
        with close code 1001 ("going away"), so clients reconnect to another server."""
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

    def connection_changed(self) -> None:
        """A connection started or ended (wakes ``drain``)."""
        self._changed.set()

    async def _wait_for_change(self, timeout: float) -> None:
        self._changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(timeout, 0.001))


async def run_server(server: HertzServer, host: str, port: int, *, drain_timeout: float = 30.0,
                     on_ready: Callable[[str], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set), then drain and return."""
    runner = web.AppRunner(server.make_app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    addresses = runner.addresses
    bound = addresses[0] if addresses else (host, port)
    url = f"http://{bound[0]}:{bound[1]}" if ":" not in str(bound[0]) else f"http://[{bound[0]}]:{bound[1]}"
    if on_ready is not None:
        on_ready(url)
    try:
        await stop.wait()
    finally:
        log.info("draining sessions (up to %.0f s)", drain_timeout)
        await server.drain(drain_timeout)
        await runner.cleanup()
