"""Server-side conversations: one WebSocket, one engine slot, ended for one reason.

:class:`Connection` holds what the native and the compatibility endpoints share: the send
queue, the end of a session (a reason, a close code, a final message) and the clean-up that
frees the slot whatever happens. :class:`NativeSession` speaks ``protocol.py``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from hertz_agents.audio import to_float32
from hertz_agents.errors import AudioInputError, EngineFull, SessionClosed
from hertz_agents.resample import Rechunker
from hertz_agents.server import protocol as p
from hertz_agents.server.bridge import SlotBridge, StepResult
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

if TYPE_CHECKING:
    from hertz_agents.server.app import HertzServer

log = logging.getLogger(__name__)

FLUSH_TIMEOUT = 1.0  # for the last messages before a close


@dataclass
class SessionEnd(Exception):
    """Why a session ends: a reason for metrics and clients, the close code, an optional Error."""

    reason: str
    close_code: int = p.CLOSE_NORMAL
    message: str = ""
    error: p.ErrorCode | None = None

    @classmethod
    def from_error(cls, e: p.ProtocolError) -> SessionEnd:
        return cls(e.code.value, e.code.close_code, str(e), e.code)


class Connection(abc.ABC):
    """One WebSocket that holds (or is about to hold) an engine slot."""

    endpoint = "session"

    def __init__(self, server: HertzServer, ws: web.WebSocketResponse) -> None:
        self.server, self.ws = server, ws
        self.limits = server.config.limits
        self.bridge: SlotBridge | None = None
        self._outbox: asyncio.Queue[bytes | str | None] = asyncio.Queue()
        self._sender: asyncio.Task | None = None
        self._end: SessionEnd | None = None
        self._closer: asyncio.Task | None = None
        self._chunker = Rechunker(SAMPLES_PER_STEP)
        self.steps_sent = 0

    @property
    def started(self) -> bool:
        return self.bridge is not None and self.bridge.handle is not None

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        self.server.connections.add(self)
        self._sender = asyncio.create_task(self._send_loop())
        try:
            await self.serve()
            self._request_end(SessionEnd("disconnect"))
        except SessionEnd as end:
            self._request_end(end)
        except Exception as e:
            log.exception("session failed")
            self._request_end(SessionEnd(p.ErrorCode.INTERNAL.value, 1011, f"internal server error: {e}",
                                         p.ErrorCode.INTERNAL))
        finally:
            if self._closer is not None:
                with contextlib.suppress(Exception):
                    await self._closer
            self._release()
            if self._sender is not None:
                self._sender.cancel()
            self.server.connections.discard(self)
            self.server.connection_changed()

    @abc.abstractmethod
    async def serve(self) -> None:
        """Read the client's messages until the session ends (each protocol its own)."""

    def end(self, end: SessionEnd) -> None:
        """Ask the session to end (from the loop: drain, a slow client, a failed step)."""
        self._request_end(end)

    def _request_end(self, end: SessionEnd) -> None:
        if self._end is not None:
            return
        self._end = end
        self._release()
        self.on_end(end)
        self._closer = asyncio.create_task(self._close(end))

    def on_end(self, end: SessionEnd) -> None:  # noqa: B027 - an optional hook, empty by default
        """Queue the endpoint's last message, if it has one."""

    def _release(self) -> None:
        """Free the slot and count the ending, exactly once."""
        if self.bridge is not None and not self.bridge.closed:
            self.bridge.close()
            if self.bridge.handle is not None:
                self.server.metrics.ended[self._end.reason if self._end else "disconnect"] += 1
                self.server.metrics.dropped["rate"] += self.bridge.rate_dropped

    async def _close(self, end: SessionEnd) -> None:
        self._outbox.put_nowait(None)
        if self._sender is not None and not self.ws.closed:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._sender), FLUSH_TIMEOUT)
        with contextlib.suppress(Exception):
            await self.ws.close(code=end.close_code, message=end.reason.encode()[:120])

    # -- sending ----------------------------------------------------------------------------
    def send(self, item: bytes | str) -> None:
        if self._end is None:
            self._outbox.put_nowait(item)

    def send_final(self, item: bytes | str) -> None:
        """A message that goes out even though the session is ending (before the close)."""
        self._outbox.put_nowait(item)

    @property
    def backlog(self) -> int:
        return self._outbox.qsize()

    async def _send_loop(self) -> None:
        while True:
            item = await self._outbox.get()
            if item is None or self.ws.closed:
                return
            try:
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_str(item)
            except (ConnectionError, RuntimeError):
                return

    # -- audio in ---------------------------------------------------------------------------
    def pcm_steps(self, data: bytes) -> list:
        """Validated int16 PCM -> the complete 16 kHz steps it finishes."""
        try:
            return self._chunker.push(to_float32(data, 1)[:, 0])
        except AudioInputError as e:
            raise SessionEnd.from_error(p.ProtocolError(p.ErrorCode.BAD_AUDIO, str(e))) from None

    async def receive(self, deadline_idle: float) -> Any:
        """The next message, or a SessionEnd on the idle or session-length limit."""
        assert self.bridge is not None
        session_deadline = self.bridge.opened_at + self.limits.max_session_seconds
        timeout = min(deadline_idle, session_deadline) - time.monotonic()
        try:
            return await self.ws.receive(timeout=max(timeout, 0.001))
        except asyncio.TimeoutError:
            if time.monotonic() >= session_deadline:
                raise SessionEnd(p.ErrorCode.SESSION_LIMIT.value, p.CLOSE_NORMAL,
                                 f"sessions last at most {self.limits.max_session_seconds:g} s on this server; "
                                 "open a new one", p.ErrorCode.SESSION_LIMIT) from None
            raise SessionEnd(p.ErrorCode.TIMEOUT.value, 1008,
                             f"no audio for {self.limits.idle_timeout:g} s; send audio (silence included) "
                             "continuously", p.ErrorCode.TIMEOUT) from None

    async def open_slot(self, *, sampling, prompt, seed) -> None:
        """Take a slot, or raise SessionEnd saying why not."""
        server = self.server
        if server.draining:
            raise self._reject(p.ErrorCode.DRAINING, "this server is shutting down; connect to another one")
        if server.engine.active_sessions >= server.engine.max_sessions:
            raise self._reject(p.ErrorCode.SERVER_FULL, server.full_message())
        self.bridge = SlotBridge(server.engine, self._on_step, max_ahead_steps=self.limits.max_input_ahead_steps)
        try:
            await self.bridge.open(sampling=sampling, prompt=prompt, seed=seed)
        except EngineFull:
            self.bridge = None
            raise self._reject(p.ErrorCode.SERVER_FULL, server.full_message()) from None
        except SessionClosed:
            self.bridge = None
            raise self._reject(p.ErrorCode.DRAINING, "the engine is closed; this server is shutting down") from None
        except AudioInputError as e:
            self.bridge = None
            raise self._reject(p.ErrorCode.BAD_PROMPT, f"the prompt cannot be used: {e}") from None
        server.metrics.started[self.endpoint] += 1

    def _reject(self, code: p.ErrorCode, message: str) -> SessionEnd:
        self.server.metrics.rejected[code.value] += 1
        return SessionEnd.from_error(p.ProtocolError(code, message))

    def _on_step(self, result: StepResult) -> None:
        metrics = self.server.metrics
        metrics.observe_step(result.compute_ms, result.latency_ms, result.seq is None)
        if result.dropped:
            metrics.dropped["backlog"] += len(result.dropped)
        if self._end is not None:
            return
        self.deliver(result)
        if self.backlog > self.limits.max_output_backlog_steps:
            self._request_end(SessionEnd(
                p.ErrorCode.CLIENT_TOO_SLOW.value, 1008,
                f"the client fell {self.limits.max_output_backlog_steps} steps behind reading its audio",
                p.ErrorCode.CLIENT_TOO_SLOW))

    @abc.abstractmethod
    def deliver(self, result: StepResult) -> None:
        """Send one step's answer in this protocol's framing."""


class NativeSession(Connection):
    """``/v1/session``: the hertz-agents protocol (see protocol.py)."""

    def on_end(self, end: SessionEnd) -> None:
        if end.reason in ("disconnect",):
            return
        if end.error is not None and not (end.error == p.ErrorCode.SESSION_LIMIT):
            self.send_final(p.encode(p.Error(end.error.value, end.message)))
        else:
            self.send_final(p.encode(p.Ended(end.reason, self.steps_sent)))

    async def serve(self) -> None:
        start = await self._start()
        server = self.server
        prompt = await server.resolve_prompt(start.prompt)
        await self.open_slot(sampling=start.sampling, prompt=prompt, seed=start.seed)
        assert self.bridge is not None
        self.send(p.encode(p.Started(
            session_id=uuid.uuid4().hex, version=p.PROTOCOL_VERSION, sample_rate=SAMPLE_RATE,
            samples_per_step=SAMPLES_PER_STEP, max_sessions=server.engine.max_sessions,
            active_sessions=server.engine.active_sessions, sampling=p.sampling_to_dict(self.bridge.sampling),
            limits=self.limits.to_dict())))
        idle_deadline = time.monotonic() + self.limits.idle_timeout
        while True:
            msg = await self.receive(idle_deadline)
            if msg.type == WSMsgType.BINARY:
                idle_deadline = time.monotonic() + self.limits.idle_timeout
                self._audio(msg.data)
            elif msg.type == WSMsgType.TEXT:
                self._control(msg.data)
            elif msg.type == WSMsgType.ERROR:
                raise SessionEnd(p.ErrorCode.BAD_REQUEST.value, 1009, f"bad message: {msg.data}",
                                 p.ErrorCode.BAD_REQUEST)
            else:  # CLOSE, CLOSING, CLOSED: the client went away
                return

    async def _start(self) -> p.Start:
        try:
            msg = await self.ws.receive(timeout=self.limits.start_timeout)
        except asyncio.TimeoutError:
            raise SessionEnd.from_error(p.ProtocolError(
                p.ErrorCode.TIMEOUT, f"send the start message within {self.limits.start_timeout:g} s")) from None
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            raise SessionEnd("disconnect")
        if msg.type != WSMsgType.TEXT:
            raise SessionEnd.from_error(p.ProtocolError(p.ErrorCode.BAD_REQUEST,
                                                        "the first message must be a JSON start message"))
        try:
            message = p.parse_client_message(msg.data, self.limits)
        except p.ProtocolError as e:
            self.server.metrics.rejected[e.code.value] += 1
            raise SessionEnd.from_error(e) from None
        if not isinstance(message, p.Start):
            raise self._reject(p.ErrorCode.BAD_REQUEST, f"the first message must be a start, got {message.type!r}")
        return message

    def _audio(self, data: bytes) -> None:
        assert self.bridge is not None
        try:
            p.check_input_frame(data, self.limits)
        except p.ProtocolError as e:
            raise SessionEnd.from_error(e) from None
        for step in self.pcm_steps(data):
            try:
                self.bridge.submit(step)
            except SessionClosed:
                raise SessionEnd(p.ErrorCode.INTERNAL.value, 1011, "the engine closed this session",
                                 p.ErrorCode.INTERNAL) from None

    def _control(self, text: str) -> None:
        assert self.bridge is not None
        if len(text) > self.limits.max_control_bytes:
            raise SessionEnd.from_error(p.ProtocolError(
                p.ErrorCode.BAD_REQUEST, f"control messages hold at most {self.limits.max_control_bytes} bytes"))
        try:
            message = p.parse_client_message(text, self.limits)
            if isinstance(message, p.Settings):
                settings = p.apply_sampling(self.bridge.sampling, message.sampling)
                self.bridge.update_sampling(settings)
                self.send(p.encode(p.SettingsApplied(p.sampling_to_dict(settings))))
            elif isinstance(message, p.MetricsRequest):
                session = p.json_safe(self.bridge.metrics.snapshot())
                session["rate_dropped_steps"] = self.bridge.rate_dropped
                self.send(p.encode(p.MetricsReply(session, self.server.info_summary())))
            elif isinstance(message, p.End):
                raise SessionEnd("client")
            else:
                raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, "the session has already started")
        except p.ProtocolError as e:
            raise SessionEnd.from_error(e) from None

    def deliver(self, result: StepResult) -> None:
        self.send(p.encode_output(result.step, result.seq, result.compute_ms, result.queue_ms, result.audio))
        self.steps_sent += 1
