"""Server-side conversations: one WebSocket, one backend slot, ended for one reason.

:class:`Connection` holds what the native and the compatibility endpoints share: the admission
check, the slot (a :class:`~hertz_agents.loop_slot.LoopSlot`), the one receive loop with its
idle and session-length limits, the send queue, the end of a session (a reason, a close code, a
final message) and the clean-up that frees the slot whatever happens. The endpoints subclass it:
``native.py`` speaks ``hertz_agents.remote.protocol``, ``compat.py`` the original's protocol.

A connection sees the server only through :class:`ConnectionHost`, a narrow interface, so this
module does not import the application that serves it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from aiohttp import WSMsgType, web

from hertz_agents.audio import to_float32
from hertz_agents.backend import Backend
from hertz_agents.errors import AudioInputError, EngineFull, SessionClosed
from hertz_agents.loop_slot import LoopSlot, StepResult
from hertz_agents.remote import protocol as p
from hertz_agents.resample import Rechunker
from hertz_agents.sampling import SamplingSettings
from hertz_agents.server.guards import TokenBucket
from hertz_agents.server.prometheus import ServerMetrics
from hertz_agents.server.prompts import PromptCatalogue
from hertz_agents.timing import SAMPLES_PER_STEP, STEP_SECONDS

__all__ = ["Connection", "ConnectionHost", "SessionEnd"]

log = logging.getLogger(__name__)

FLUSH_TIMEOUT = 1.0  # for the last messages before a close


class ConnectionHost(Protocol):
    """What a connection may use of the server that accepted it."""

    @property
    def backend(self) -> Backend:
        """The engine every connection takes its slot from."""
        ...

    @property
    def limits(self) -> p.Limits:
        """The limits every session is held to."""
        ...

    @property
    def metrics(self) -> ServerMetrics:
        """The server's figures."""
        ...

    @property
    def prompts(self) -> PromptCatalogue:
        """The prompts the server knows."""
        ...

    def admission_refusal(self) -> p.ProtocolError | None:
        """Why a new session cannot start now (draining, full), or None when it can."""
        ...

    def full_refusal(self) -> p.ProtocolError:
        """The one "every slot is taken" refusal."""
        ...

    def info_summary(self) -> dict[str, Any]:
        """The server's figures for a metrics reply."""
        ...

    def attach(self, connection: Connection) -> None:
        """A connection begins (counted until :meth:`detach`)."""
        ...

    def detach(self, connection: Connection) -> None:
        """A connection has ended and freed its slot."""
        ...


@dataclass
class SessionEnd(Exception):
    """Why a session ends: a reason for metrics and clients, the close code, an optional Error."""

    reason: str
    close_code: int = p.CLOSE_NORMAL
    message: str = ""
    error: p.ErrorCode | None = None

    @classmethod
    def from_error(cls, e: p.ProtocolError) -> SessionEnd:
        """The end a protocol error causes."""
        return cls(e.code.value, e.code.close_code, str(e), e.code)


class Connection(abc.ABC):
    """One WebSocket that holds (or is about to hold) a backend slot."""

    endpoint = "session"

    def __init__(self, host: ConnectionHost, ws: web.WebSocketResponse) -> None:
        self.host, self.ws = host, ws
        self.limits = host.limits
        self.slot: LoopSlot | None = None
        self._released = False
        self._outbox: asyncio.Queue[bytes | str | None] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._end: SessionEnd | None = None
        self._closer: asyncio.Task[None] | None = None
        self._chunker = Rechunker(SAMPLES_PER_STEP)
        self.steps_sent = 0
        self.peer = ""  # the client's address, for per-peer budgets
        self.transport: asyncio.Transport | None = None  # to cut a flooding client off
        lim = self.limits
        self._audio_budget = _bucket(lim.audio_messages_per_second, lim.audio_messages_per_second)
        self._control_budget = _bucket(lim.control_messages_per_second, lim.control_burst)
        self._step_budget = _bucket(1 / STEP_SECONDS, lim.step_burst)
        self._sending_since: float | None = None  # a send waits for the client to read
        # Steps the engine answered before begin() sent its first message (the slot opens on a
        # thread and may step before this task resumes): held, so no audio precedes "started".
        self._early_steps: list[StepResult] | None = []

    @property
    def started(self) -> bool:
        """The connection holds (or held) a slot."""
        return self.slot is not None and self.slot.handle is not None

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until it ends, then free everything it holds."""
        self.host.attach(self)
        self._sender = asyncio.create_task(self._send_loop())
        try:
            await self.begin()
            early, self._early_steps = self._early_steps or [], None
            for result in early:
                self._on_step(result)
            await self._receive_loop()
            self._request_end(SessionEnd("disconnect"))
        except SessionEnd as end:
            self._request_end(end)
        except Exception:
            log.exception("session failed")
            # The exception's text stays in the server's log: it may describe the server's insides.
            self._request_end(
                SessionEnd(
                    p.ErrorCode.INTERNAL.value,
                    1011,
                    "internal server error; the server's log has the details",
                    p.ErrorCode.INTERNAL,
                )
            )
        finally:
            if self._closer is not None:
                with contextlib.suppress(Exception):
                    await self._closer
            self._release()
            if self._sender is not None:
                self._sender.cancel()
            self.host.detach(self)

    @abc.abstractmethod
    async def begin(self) -> None:
        """Start the session in this protocol's way, ending with :meth:`open_slot`."""

    @abc.abstractmethod
    def on_message(self, binary: bool, data: Any) -> bool:
        """Handle one client message; True when it was audio (it resets the idle timer)."""

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
        if self.slot is not None and not self._released:
            self._released = True
            self.slot.close()
            if self.slot.handle is not None:
                reason = self._end.reason if self._end else "disconnect"
                self.host.metrics.ended[reason] += 1
                self.host.metrics.dropped["rate"] += self.slot.rate_dropped

    async def _close(self, end: SessionEnd) -> None:
        self._outbox.put_nowait(None)
        if self._sender is not None and not self.ws.closed:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._sender), FLUSH_TIMEOUT)
        if self.transport is not None and end.error in _CUT_OFF:
            # A graceful close would read (and parse) a flood until the client's close frame; a
            # client that stopped reading never takes the close frame (the send would wait forever).
            self.transport.abort()
            return
        with contextlib.suppress(Exception):
            await self.ws.close(code=end.close_code, message=end.reason.encode()[:120])

    # -- sending ----------------------------------------------------------------------------
    def send(self, item: bytes | str) -> None:
        """Queue a message, unless the session is ending."""
        if self._end is None:
            self._outbox.put_nowait(item)

    def send_final(self, item: bytes | str) -> None:
        """A message that goes out even though the session is ending (before the close)."""
        self._outbox.put_nowait(item)

    @property
    def backlog(self) -> int:
        """Messages queued and not yet sent."""
        return self._outbox.qsize()

    async def _send_loop(self) -> None:
        while True:
            item = await self._outbox.get()
            if item is None or self.ws.closed:
                return
            self._sending_since = time.monotonic()
            try:
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_str(item)
            except (ConnectionError, RuntimeError):
                return
            finally:
                self._sending_since = None

    # -- receiving --------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        """The one loop every endpoint reads its client with, once the slot is open."""
        idle_deadline = time.monotonic() + self.limits.idle_timeout
        while True:
            msg = await self._receive(idle_deadline)
            if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                binary = msg.type == WSMsgType.BINARY
                self._check_message_rate(self.is_audio(binary))
                if self.on_message(binary, msg.data):
                    idle_deadline = time.monotonic() + self.limits.idle_timeout
            elif msg.type == WSMsgType.ERROR and isinstance(msg.data, asyncio.TimeoutError):
                # aiohttp's heartbeat got no pong: the peer is gone, it sent nothing wrong.
                raise SessionEnd("heartbeat_timeout", p.CLOSE_GOING_AWAY, "no answer to pings")
            elif msg.type == WSMsgType.ERROR:
                raise SessionEnd(
                    p.ErrorCode.BAD_REQUEST.value,
                    1009,
                    f"bad message: {msg.data}",
                    p.ErrorCode.BAD_REQUEST,
                )
            else:  # CLOSE, CLOSING, CLOSED: the client went away
                return

    def is_audio(self, binary: bool) -> bool:
        """Whether a message counts against the audio budget (else the control budget)."""
        return binary

    def _check_message_rate(self, audio: bool) -> None:
        budget = self._audio_budget if audio else self._control_budget
        if budget is None or budget.take():
            return
        lim = self.limits
        rate = (
            f"{lim.audio_messages_per_second:g} audio messages"
            if audio
            else f"{lim.control_messages_per_second:g} control messages"
        )
        raise self._reject(
            p.ProtocolError(
                p.ErrorCode.RATE_LIMITED,
                f"this server takes at most {rate} a second per session; send audio in "
                "messages of 20 ms or more and control messages only when something changes",
            )
        )

    def submit_step(self, step: np.ndarray) -> int | None:
        """Hand one input step to the slot, unless it runs beyond the step budget (dropped)."""
        assert self.slot is not None
        if self._step_budget is not None and not self._step_budget.take():
            self.slot.rate_dropped += 1  # counted with the slot's own rate drops
            return None
        return self.slot.submit(step)

    async def _receive(self, deadline_idle: float) -> Any:
        """The next message, or a SessionEnd on the idle or session-length limit."""
        assert self.slot is not None
        session_deadline = self.slot.opened_at + self.limits.max_session_seconds
        timeout = min(deadline_idle, session_deadline) - time.monotonic()
        try:
            return await self.ws.receive(timeout=max(timeout, 0.001))
        except asyncio.TimeoutError:
            if time.monotonic() >= session_deadline:
                raise SessionEnd(
                    p.ErrorCode.SESSION_LIMIT.value,
                    p.CLOSE_NORMAL,
                    f"sessions last at most {self.limits.max_session_seconds:g} s on this server; "
                    "open a new one",
                    p.ErrorCode.SESSION_LIMIT,
                ) from None
            raise SessionEnd(
                p.ErrorCode.TIMEOUT.value,
                1008,
                f"no audio for {self.limits.idle_timeout:g} s; send audio (silence included) "
                "continuously",
                p.ErrorCode.TIMEOUT,
            ) from None

    def pcm_steps(self, data: bytes) -> list[np.ndarray]:
        """Validated int16 PCM -> the complete 16 kHz steps it finishes."""
        try:
            return self._chunker.push(to_float32(data, 1)[:, 0])
        except AudioInputError as e:
            raise SessionEnd.from_error(p.ProtocolError(p.ErrorCode.BAD_AUDIO, str(e))) from None

    # -- the slot ---------------------------------------------------------------------------
    async def resolve_prompt(self, prompt: p.Prompt | None) -> Path | np.ndarray | None:
        """A start's prompt -> what the engine takes, or SessionEnd saying why it is refused."""
        if prompt is not None and prompt.audio is not None:
            # Decoding is the expensive part: refuse first when no slot could take the session.
            refusal = self.host.admission_refusal()
            if refusal is not None:
                raise self._reject(refusal)
        try:
            return await self.host.prompts.resolve(prompt, self.peer)
        except p.ProtocolError as e:
            raise self._reject(e) from None

    async def open_slot(
        self, *, sampling: SamplingSettings, prompt: Path | np.ndarray | None, seed: int | None
    ) -> LoopSlot:
        """Take a slot, or raise SessionEnd saying why not."""
        refusal = self.host.admission_refusal()
        if refusal is not None:
            raise self._reject(refusal)
        slot = LoopSlot(
            self._on_step,
            on_closed=self._on_backend_closed,
            max_ahead_steps=self.limits.max_input_ahead_steps,
        )
        self.slot = slot
        slot.start(self.host.backend, sampling=sampling, prompt=prompt, seed=seed)
        try:
            await slot.wait_open()
        except EngineFull:
            self.slot = None
            raise self._reject(self.host.full_refusal()) from None
        except SessionClosed as e:
            self.slot = None
            raise self._reject(
                p.ProtocolError(
                    p.ErrorCode.DRAINING, f"the engine is closed ({e}); connect to another server"
                )
            ) from None
        except AudioInputError as e:
            self.slot = None
            raise self._reject(
                p.ProtocolError(p.ErrorCode.BAD_PROMPT, f"the prompt cannot be used: {e}")
            ) from None
        self.host.metrics.started[self.endpoint] += 1
        return slot

    def _on_backend_closed(self, error: BaseException) -> None:
        """The backend ended an open slot (its engine stopped): end the session at once."""
        if self.slot is None or self.slot.handle is None:
            return  # the slot never opened: open_slot reports that failure itself
        self._request_end(
            SessionEnd(
                "engine_stopped",
                1011,
                f"the engine stopped ({error}); reconnect to another server",
                p.ErrorCode.INTERNAL,
            )
        )

    def _reject(self, error: p.ProtocolError) -> SessionEnd:
        self.host.metrics.rejected[error.code.value] += 1
        return SessionEnd.from_error(error)

    def _on_step(self, result: StepResult) -> None:
        metrics = self.host.metrics
        metrics.observe_step(result.compute_ms, result.latency_ms, result.seq is None)
        if result.dropped:
            metrics.dropped["backlog"] += len(result.dropped)
        if self._end is not None:
            return
        if self._early_steps is not None:
            self._early_steps.append(result)
            return
        self.deliver(result)
        stalled = self._sending_since is not None and (
            time.monotonic() - self._sending_since > self.limits.max_send_stall_seconds > 0
        )
        if stalled or self.backlog > self.limits.max_output_backlog_steps:
            self._request_end(
                SessionEnd(
                    p.ErrorCode.CLIENT_TOO_SLOW.value,
                    1008,
                    "the client stopped reading its audio (a send waited "
                    f"{self.limits.max_send_stall_seconds:g} s, or "
                    f"{self.limits.max_output_backlog_steps} steps are queued)",
                    p.ErrorCode.CLIENT_TOO_SLOW,
                )
            )

    @abc.abstractmethod
    def deliver(self, result: StepResult) -> None:
        """Send one step's answer in this protocol's framing."""


_CUT_OFF = (p.ErrorCode.RATE_LIMITED, p.ErrorCode.CLIENT_TOO_SLOW)
"""Ends whose connection is aborted rather than closed with a close frame."""


def _bucket(rate: float, burst: float) -> TokenBucket | None:
    """A budget of ``rate`` a second with ``burst``; None when the limit is off (rate 0)."""
    return TokenBucket(rate, max(burst, 1)) if rate > 0 else None
