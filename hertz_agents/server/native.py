"""``/v1/session``: the hertz-agents protocol (``hertz_agents.remote.protocol``) on a connection.

A client sends a start message, then int16 PCM audio in binary frames and JSON control messages
(settings, metrics, end); it gets a started message, then one binary output frame per model step.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp import WSMsgType

from hertz_agents.errors import SessionClosed
from hertz_agents.loop_slot import StepResult
from hertz_agents.remote import protocol as p
from hertz_agents.server.sessions import Connection, SessionEnd
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

__all__ = ["NativeSession"]


class NativeSession(Connection):
    """``/v1/session``: the hertz-agents protocol (see ``hertz_agents.remote.protocol``)."""

    _short_sent = False  # an audio message under the minimum came: it must have been the last

    def on_end(self, end: SessionEnd) -> None:
        """Tell the client why the session ended (an Error, or Ended)."""
        if end.reason in ("disconnect",):
            return
        if end.error is not None and not (end.error == p.ErrorCode.SESSION_LIMIT):
            self.send_final(p.encode(p.Error(end.error.value, end.message)))
        else:
            self.send_final(p.encode(p.Ended(end.reason, self.steps_sent)))

    async def begin(self) -> None:
        """Read the start message, take a slot, answer with Started."""
        start = await self._start()
        prompt = await self.resolve_prompt(start.prompt)
        slot = await self.open_slot(sampling=start.sampling, prompt=prompt, seed=start.seed)
        backend = self.host.backend
        self.send(
            p.encode(
                p.Started(
                    session_id=uuid.uuid4().hex,
                    version=p.PROTOCOL_VERSION,
                    sample_rate=SAMPLE_RATE,
                    samples_per_step=SAMPLES_PER_STEP,
                    max_sessions=backend.max_sessions,
                    active_sessions=backend.active_sessions,
                    sampling=p.sampling_to_dict(slot.sampling),
                    limits=self.limits.to_dict(),
                )
            )
        )

    def on_message(self, binary: bool, data: Any) -> bool:
        """Binary frames are audio; text frames are control messages."""
        if binary:
            self._audio(data)
            return True
        self._control(data)
        return False

    async def _start(self) -> p.Start:
        try:
            msg = await self.ws.receive(timeout=self.limits.start_timeout)
        except asyncio.TimeoutError:
            raise SessionEnd.from_error(
                p.ProtocolError(
                    p.ErrorCode.TIMEOUT,
                    f"send the start message within {self.limits.start_timeout:g} s",
                )
            ) from None
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            raise SessionEnd("disconnect")
        if msg.type != WSMsgType.TEXT:
            raise SessionEnd.from_error(
                p.ProtocolError(
                    p.ErrorCode.BAD_REQUEST, "the first message must be a JSON start message"
                )
            )
        try:
            message = p.parse_client_message(msg.data, self.limits)
        except p.ProtocolError as e:
            raise self._reject(e) from None
        if not isinstance(message, p.Start):
            raise self._reject(
                p.ProtocolError(
                    p.ErrorCode.BAD_REQUEST,
                    f"the first message must be a start, got {message.type!r}",
                )
            )
        return message

    def _audio(self, data: bytes) -> None:
        assert self.slot is not None
        try:
            p.check_input_frame(data, self.limits)
            self._check_short(len(data))
        except p.ProtocolError as e:
            raise SessionEnd.from_error(e) from None
        for step in self.pcm_steps(data):
            try:
                self.submit_step(step)
            except SessionClosed:
                raise SessionEnd(
                    p.ErrorCode.INTERNAL.value,
                    1011,
                    "the engine closed this session",
                    p.ErrorCode.INTERNAL,
                ) from None

    def _check_short(self, size: int) -> None:
        """Only a call's last audio message may be under the minimum (tiny ones cost per byte)."""
        minimum = self.limits.min_audio_message_bytes
        if self._short_sent:
            raise p.ProtocolError(
                p.ErrorCode.BAD_AUDIO,
                f"audio messages hold at least {minimum} bytes ({minimum // 32} ms); only the "
                "last one of a call may be shorter",
            )
        self._short_sent = size < minimum

    def _control(self, text: str) -> None:
        assert self.slot is not None
        if len(text) > self.limits.max_control_bytes:
            raise SessionEnd.from_error(
                p.ProtocolError(
                    p.ErrorCode.BAD_REQUEST,
                    f"control messages hold at most {self.limits.max_control_bytes} bytes",
                )
            )
        try:
            message = p.parse_client_message(text, self.limits)
            if isinstance(message, p.Settings):
                settings = p.apply_sampling(self.slot.sampling, message.sampling)
                self.slot.update_sampling(settings)
                self.send(p.encode(p.SettingsApplied(p.sampling_to_dict(settings))))
            elif isinstance(message, p.MetricsRequest):
                session = p.json_safe(self.slot.metrics.snapshot())
                session["rate_dropped_steps"] = self.slot.rate_dropped
                self.send(p.encode(p.MetricsReply(session, self.host.info_summary())))
            elif isinstance(message, p.End):
                raise SessionEnd("client")
            else:
                raise p.ProtocolError(p.ErrorCode.BAD_REQUEST, "the session has already started")
        except p.ProtocolError as e:
            raise SessionEnd.from_error(e) from None

    def deliver(self, result: StepResult) -> None:
        """One binary output frame per step."""
        self.send(
            p.encode_output(
                result.step, result.seq, result.compute_ms, result.queue_ms, result.audio
            )
        )
        self.steps_sent += 1
