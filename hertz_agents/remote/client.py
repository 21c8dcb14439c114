"""Remote sessions: a hertz server used through the same backend seam as a local ``Engine``.

``DuplexSession.open("hertz://gpu-1:8000")`` (or ``RemoteEngine.connect(url)`` passed as the
engine) gives a session with the same API as a local one. Each session is one WebSocket to
``/v1/session``; all of a process's sockets live on one background thread with its own event
loop, so ``open`` may block (it runs in a worker thread), ``submit`` never does, and output
arrives on that thread exactly as a local engine's arrives on its worker thread.

URL: ``hertz://HOST:PORT[?token=T&tls=1&reconnect=N]``. The token may also come from the
``token=`` argument or ``$HERTZ_TOKEN``; it is sent in the Authorization header, never in the URL.

Reconnection: if the connection drops or the server drains (close code 1001), the session
reconnects with backoff (:class:`ReconnectPolicy`) and continues on a fresh server session with
the same prompt and settings; the model's memory of the call before the drop is lost, steps sent
in the gap are counted as dropped. When every attempt fails the session ends with
:class:`ServerGone`, which ``submit`` raises and ``on_closed`` receives.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from hertz_agents.audio import float_to_pcm16
from hertz_agents.backend import ClosedCallback, OutputCallback, StepInfo
from hertz_agents.errors import AudioInputError, EngineFull, HertzError, SessionClosed
from hertz_agents.metrics import SessionMetrics
from hertz_agents.remote import protocol as p
from hertz_agents.remote.transport import (
    AuthenticationFailed,
    ReconnectPolicy,
    ServerAddress,
    ServerGone,
    ServerUnavailable,
    error_from,
    fetch_info,
    io_thread,
    unavailable,
)
from hertz_agents.sampling import SamplingSettings
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

__all__ = [
    "AuthenticationFailed",
    "ReconnectPolicy",
    "RemoteEngine",
    "RemoteHandle",
    "ServerAddress",
    "ServerGone",
    "ServerUnavailable",
]

log = logging.getLogger(__name__)


class RemoteEngine:
    """A hertz server, used like a local engine. Create it with :meth:`connect`."""

    def __init__(
        self,
        address: ServerAddress,
        info: dict[str, Any],
        *,
        reconnect: ReconnectPolicy,
        timeout: float,
    ) -> None:
        self.address = address
        self.info = info
        self.reconnect = reconnect
        self.timeout = timeout
        self._handles: set[RemoteHandle] = set()

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        reconnect: ReconnectPolicy | None = None,
        timeout: float = 10.0,
    ) -> RemoteEngine:
        """A remote engine for the server at ``url``, checked to answer.

        Raises ServerUnavailable or AuthenticationFailed now, not at the first step; the
        engine's ``open`` starts sessions there.
        """
        address, query = ServerAddress.parse(url, token)
        if reconnect is None:
            reconnect = (
                ReconnectPolicy(attempts=int(query["reconnect"]))
                if "reconnect" in query
                else ReconnectPolicy()
            )
        info = await asyncio.wrap_future(io_thread().submit(fetch_info(address, timeout)))
        if info.get("protocol") != p.PROTOCOL_VERSION:
            raise HertzError(
                f"the server at {address} speaks protocol {info.get('protocol')!r}, this client "
                f"{p.PROTOCOL_VERSION}; install matching hertz-agents versions"
            )
        return cls(address, info, reconnect=reconnect, timeout=timeout)

    @classmethod
    def connect_blocking(
        cls,
        url: str,
        *,
        token: str | None = None,
        reconnect: ReconnectPolicy | None = None,
        timeout: float = 10.0,
    ) -> RemoteEngine:
        """:meth:`connect` for code without an event loop (blocking; never call it on a loop)."""
        return io_thread().run(
            cls.connect(url, token=token, reconnect=reconnect, timeout=timeout), timeout=timeout + 5
        )

    @property
    def max_sessions(self) -> int:
        """The server's capacity, as it last said."""
        return int(self.info.get("max_sessions", 0))

    @property
    def active_sessions(self) -> int:
        """The server's count when last heard (at connect, and at each session start)."""
        return int(self.info.get("active_sessions", 0))

    @property
    def occupancy(self) -> float:
        """Share of the server's slots in use when last heard, 0..1."""
        return self.active_sessions / self.max_sessions if self.max_sessions else 1.0

    def refresh(self) -> dict[str, Any]:
        """Ask the server for its current figures (blocking)."""
        self.info = io_thread().run(fetch_info(self.address, self.timeout))
        return self.info

    def open(
        self,
        on_output: OutputCallback,
        *,
        sampling: SamplingSettings | None = None,
        prompt: str | Path | np.ndarray | None = None,
        seed: int | None = None,
        on_closed: ClosedCallback | None = None,
    ) -> RemoteHandle:
        """Start a session on the server (blocking: a round trip, plus a new prompt's prefill)."""
        handle = RemoteHandle(
            self,
            on_output,
            sampling or SamplingSettings(),
            _prompt_message(prompt),
            seed,
            on_closed,
        )
        io_thread().run(handle._start(), timeout=self.timeout + 60)
        self._handles.add(handle)
        return handle

    def close(self) -> None:
        """End every session opened through this engine."""
        for handle in list(self._handles):
            handle.close()


def _prompt_message(prompt: str | Path | np.ndarray | None) -> p.Prompt | None:
    """A local file or array is sent inline; a string naming no local file is a server prompt."""
    if prompt is None:
        return None
    if isinstance(prompt, np.ndarray):
        import io

        import soundfile as sf

        audio = np.asarray(prompt, dtype=np.float32)
        frames = audio.T if audio.ndim == 2 else audio  # [C, N] -> [N, C]
        buffer = io.BytesIO()
        sf.write(buffer, np.clip(frames, -1, 1), SAMPLE_RATE, format="WAV", subtype="PCM_16")
        return p.Prompt(audio=buffer.getvalue())
    path = Path(prompt)
    if path.is_file():
        return p.Prompt(audio=path.read_bytes())
    if isinstance(prompt, Path):
        raise AudioInputError(
            f"prompt file {str(prompt)!r} does not exist; pass a WAV path, or a prompt name as str"
        )
    return p.Prompt(name=prompt)


class RemoteHandle:
    """One remote session, a :class:`~hertz_agents.backend.Slot`. Thread-safe."""

    def __init__(
        self,
        engine: RemoteEngine,
        on_output: OutputCallback,
        sampling: SamplingSettings,
        prompt: p.Prompt | None,
        seed: int | None,
        on_closed: ClosedCallback | None,
    ) -> None:
        self.engine, self.on_output, self.sampling = engine, on_output, sampling
        self._prompt, self._seed, self._on_closed = prompt, seed, on_closed
        self.metrics = SessionMetrics()
        self.closed = False
        self.error: BaseException | None = None
        self.reconnects = 0
        self.session_id = ""
        self._io = io_thread()
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[tuple[int, bytes | str]] | None = (
            None  # (connection generation, item)
        )
        self._generation = 0  # bumped per connection: steps queued for a lost one are not resent
        self._next_seq = 0  # the server's numbering, per connection
        self._seqs = itertools.count()  # ours, across reconnections (next() is atomic)
        # (server's seq, ours, complete_at), I/O thread only
        self._pending: deque[tuple[int, int, float]] = deque()
        self._steps = 0
        self._opened_at = time.monotonic()
        self._metrics_reply: asyncio.Future[dict[str, Any]] | None = None

    # -- caller threads ---------------------------------------------------------------------
    def submit(self, audio: np.ndarray, complete_at: float | None = None) -> int:
        """Queue one input step (float32 [2000] at 16 kHz); its sequence number. Never blocks."""
        if self.closed:
            raise (
                self.error
                if isinstance(self.error, SessionClosed)
                else SessionClosed("this remote session is closed; open a new one")
            )
        if audio.shape != (SAMPLES_PER_STEP,):
            raise ValueError(
                f"an input step is {SAMPLES_PER_STEP} samples, got shape {audio.shape}"
            )
        data = float_to_pcm16(audio)
        seq = next(self._seqs)
        self._io.call(
            self._send_step, data, seq, time.monotonic() if complete_at is None else complete_at
        )
        return seq

    def update_sampling(self, sampling: SamplingSettings) -> None:
        """Send new sampling settings to the server (used from its next step)."""
        self.sampling = sampling
        self._io.call(self._send_json, p.encode(p.Settings(p.sampling_to_dict(sampling))))

    def server_metrics(self, timeout: float = 5.0) -> dict[str, Any]:
        """The server's view of this session and of itself (blocking; not from the I/O thread)."""
        return self._io.run(self._request_metrics(), timeout)

    def close(self) -> None:
        """End the session (tells the server, frees its slot). Idempotent, never blocks."""
        if self.closed:
            return
        self.closed = True
        self.engine._handles.discard(self)
        self._io.call(lambda: asyncio.ensure_future(self._shutdown()))

    # -- I/O thread -------------------------------------------------------------------------
    async def _start(self) -> None:
        self._ws = await self._connect()
        self._outbox = asyncio.Queue()
        self._sender = asyncio.ensure_future(self._send_loop())
        self._reader = asyncio.ensure_future(self._read_loop())

    async def _connect(self) -> aiohttp.ClientWebSocketResponse[bool]:
        """One WebSocket and a started server session, or the error that says why not."""
        address = self.engine.address
        try:
            ws = await asyncio.wait_for(
                self._io.http().ws_connect(
                    address.url(p.SESSION_PATH, websocket=True),
                    headers=address.headers,
                    heartbeat=p.Limits().heartbeat,
                    max_msg_size=p.Limits().max_message_bytes,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2),
                ),
                self.engine.timeout,
            )
        except aiohttp.WSServerHandshakeError as e:
            if e.status == 401:
                raise AuthenticationFailed(
                    f"the hertz server at {address} refused the token"
                ) from e
            raise ServerUnavailable(
                f"the hertz server at {address} refused the session (HTTP {e.status})"
            ) from e
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise unavailable(address, e) from e
        start = p.Start(sampling=self.sampling, prompt=self._prompt, seed=self._seed)
        try:
            await ws.send_str(p.encode(start))
            msg = await ws.receive(
                timeout=self.engine.timeout + 60
            )  # the server may prefill a new prompt
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            await ws.close()
            raise unavailable(address, e) from e
        reply = p.parse_server_message(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else None
        if isinstance(reply, p.Started):
            self.session_id = reply.session_id
            self.engine.info.update(
                active_sessions=reply.active_sessions, max_sessions=reply.max_sessions
            )
            self._next_seq = 0
            self._generation += 1
            return ws
        await ws.close()
        if isinstance(reply, p.Error):
            raise error_from(reply, address)
        raise ServerUnavailable(
            f"the hertz server at {address} closed the session before starting it "
            f"({msg.type.name} {ws.close_code})"
        )

    def _send_step(self, data: bytes, seq: int, complete_at: float) -> None:
        ws = self._ws
        if self.closed or ws is None or ws.closed or self._outbox is None:
            self.metrics.dropped_input_steps += 1  # reconnecting: this step is lost
            return
        self._pending.append((self._next_seq, seq, complete_at))
        self._next_seq += 1
        self._outbox.put_nowait((self._generation, data))

    def _send_json(self, text: str) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait((self._generation, text))

    async def _send_loop(self) -> None:
        """One writer per session, so messages leave in the order they were queued."""
        assert self._outbox is not None
        while True:
            generation, item = await self._outbox.get()
            ws = self._ws
            if generation != self._generation or ws is None or ws.closed:
                continue  # meant for a connection that is gone
            try:
                if isinstance(item, bytes):
                    await ws.send_bytes(item)
                else:
                    await ws.send_str(item)
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                pass  # the read loop notices the loss and reconnects

    async def _read_loop(self) -> None:
        while not self.closed:
            ws = self._ws
            assert ws is not None
            ended: p.Ended | p.Error | None = None
            try:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        self._on_frame(p.decode_output(msg.data))
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        reply = p.parse_server_message(msg.data)
                        if (
                            isinstance(reply, p.MetricsReply)
                            and self._metrics_reply
                            and not self._metrics_reply.done()
                        ):
                            self._metrics_reply.set_result(
                                {"session": reply.session, "server": reply.server}
                            )
                        elif isinstance(reply, (p.Ended, p.Error)):
                            ended = reply
            except (
                p.ProtocolError
            ) as e:  # a server that breaks the protocol: do not trust it further
                await ws.close()
                self._fail(
                    HertzError(f"the hertz server at {self.engine.address} sent a bad message: {e}")
                )
                return
            except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
                pass  # a lost connection: handled below
            if self.closed:
                return
            cause = self._loss_cause(ws, ended)
            if cause is not None:  # final: the server refused or ended the session for good
                self._fail(cause)
                return
            if not await self._reconnect(ws):
                return

    def _loss_cause(
        self, ws: aiohttp.ClientWebSocketResponse[bool], ended: p.Ended | p.Error | None
    ) -> BaseException | None:
        """None when the loss is worth a reconnect, else the error that ends the session."""
        address = self.engine.address
        if isinstance(ended, p.Error):
            return error_from(ended, address)
        if isinstance(ended, p.Ended) and ended.reason not in ("shutdown",):
            return SessionClosed(
                f"the hertz server at {address} ended the session ({ended.reason})"
            )
        return None

    async def _reconnect(self, lost: aiohttp.ClientWebSocketResponse[bool]) -> bool:
        address = self.engine.address
        dropped = len(self._pending)
        self._pending.clear()
        self.metrics.dropped_input_steps += dropped
        started = time.monotonic()
        last: BaseException = ConnectionError(f"connection closed (code {lost.close_code})")
        for delay in self.engine.reconnect.delays():
            await asyncio.sleep(delay)
            if self.closed:
                return False
            try:
                self._ws = await self._connect()
                self.reconnects += 1
                log.warning("reconnected to %s after %.1f s", address, time.monotonic() - started)
                return True
            except (AuthenticationFailed, AudioInputError) as e:
                self._fail(e)
                return False
            except (ServerUnavailable, EngineFull, SessionClosed) as e:
                last = e
        self._fail(
            ServerGone(
                f"lost the hertz server at {address} and could not reconnect "
                f"({self.engine.reconnect.attempts} attempts in "
                f"{time.monotonic() - started:.1f} s; "
                f"last: {last}); check that `hertz-agents serve` is running there"
            )
        )
        return False

    def _fail(self, error: BaseException) -> None:
        if self.closed and self.error is not None:
            return
        self.error = error
        self.closed = True
        if self._sender is not None:
            self._sender.cancel()
        self.engine._handles.discard(self)
        log.warning("remote session ended: %s", error)
        if self._on_closed is not None:
            try:
                self._on_closed(error)
            except Exception:
                log.exception("on_closed callback failed")

    def _on_frame(self, frame: p.OutputFrame) -> None:
        now = time.monotonic()
        seq: int | None = None
        complete_at = now
        if frame.input_seq is not None:
            while self._pending and self._pending[0][0] < frame.input_seq:
                self._pending.popleft()  # dropped on the server (its engine fell behind)
                self.metrics.dropped_input_steps += 1
            if self._pending and self._pending[0][0] == frame.input_seq:
                _, seq, complete_at = self._pending.popleft()
        info = StepInfo(
            self._steps, frame.silence_input, seq, frame.queue_ms, frame.compute_ms, complete_at
        )
        self._steps += 1
        self.metrics.record_step(
            frame.compute_ms, frame.queue_ms, (now - complete_at) * 1000, frame.silence_input
        )
        if self.metrics.ttfa_ms is None:
            self.metrics.ttfa_ms = (now - self._opened_at) * 1000
        try:
            self.on_output(frame.audio, info)
        except Exception:
            log.exception("a remote session's output callback failed; closing that session")
            self.close()

    async def _request_metrics(self) -> dict[str, Any]:
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._metrics_reply = reply
        self._send_json(p.encode(p.MetricsRequest()))
        return await reply

    async def _shutdown(self) -> None:
        ws = self._ws
        if ws is not None and not ws.closed:
            try:
                await ws.send_str(p.encode(p.End()))
                await ws.close()
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                pass
        for task in (self._reader, self._sender):
            if task is not None:
                task.cancel()
