"""The original hertz-dev server's protocol, so clients written for it work unchanged.

``/audio`` is a WebSocket of text frames ``data:audio/raw;base64,<int16 PCM, 16 kHz>``; each
message the client sends gets exactly one reply of the same length, the model's audio for
those steps. ``POST /set_temperature?token_temp=&categorical_temp=&gaussian_temp=`` sets the
temperatures (for every compatibility session, as the original's one global session did).

Differences, all on the safe side: a message must hold whole 125 ms steps (the original client
sends exactly one); anything else closes that session with a reason instead of crashing the
server. With a token configured, original clients pass it in the base URL's path:
``ws://host:port/t/<token>`` (they append ``/audio`` and ``/set_temperature`` themselves).

The endpoint owns its state (the shared temperatures and its sessions) in :class:`CompatEndpoint`.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
from aiohttp import web

from hertz_agents.audio import float_to_pcm16
from hertz_agents.loop_slot import StepResult
from hertz_agents.remote import protocol as p
from hertz_agents.sampling import TEMPERATURE_FIELDS, SamplingSettings
from hertz_agents.server.sessions import Connection, ConnectionHost, SessionEnd
from hertz_agents.timing import SAMPLES_PER_STEP

__all__ = ["TEMPERATURE_FIELDS", "CompatEndpoint", "CompatSession", "parse_temperatures"]


class CompatEndpoint:
    """The compatibility endpoint's state: one set of temperatures for all of its sessions."""

    def __init__(self) -> None:
        self.sampling = SamplingSettings()
        self.sessions: set[CompatSession] = set()

    def session(self, host: ConnectionHost, ws: web.WebSocketResponse) -> CompatSession:
        """A new compatibility session on ``ws``."""
        return CompatSession(host, ws, self)

    async def set_temperature(self, request: web.Request) -> web.StreamResponse:
        """``POST /set_temperature``: change the temperatures of every compatibility session."""
        try:
            changes = parse_temperatures(request.query)
        except ValueError as e:
            return web.json_response({"message": f"not changed: {e}"}, status=400)
        self.sampling = self.sampling.replace(**changes)
        for session in self.sessions:
            if session.started and session.slot is not None:
                session.slot.update_sampling(self.sampling)
        s = self.sampling
        return web.json_response(
            {
                "message": f"temperatures set: token {s.token_temp}, "
                f"categorical {s.categorical_temp}, gaussian {s.gaussian_temp}"
            }
        )


class CompatSession(Connection):
    """One original-protocol conversation: a reply per message, in order."""

    endpoint = "compat"

    def __init__(
        self, host: ConnectionHost, ws: web.WebSocketResponse, owner: CompatEndpoint
    ) -> None:
        super().__init__(host, ws)
        self._owner = owner
        # Per message, oldest first: the input steps it holds and the outputs found so far.
        self._replies: deque[tuple[list[int | None], dict[int, np.ndarray]]] = deque()

    async def begin(self) -> None:
        """No handshake: take a slot with the default prompt and the shared temperatures."""
        self._owner.sessions.add(self)
        prompt = await self.resolve_prompt(None)
        await self.open_slot(sampling=self._owner.sampling, prompt=prompt, seed=None)

    async def run(self) -> None:
        """Serve, and leave the endpoint's sessions when done."""
        try:
            await super().run()
        finally:
            self._owner.sessions.discard(self)

    def is_audio(self, binary: bool) -> bool:
        """Every message of this protocol is audio (held to the audio message budget)."""
        return True

    def on_message(self, binary: bool, data: Any) -> bool:
        """Text frames carry audio; binary ones are refused."""
        if binary:
            raise self._bad(f"send text frames '{p.COMPAT_PREFIX}<base64 int16 PCM>', not binary")
        self._message(data)
        return True

    def _bad(self, message: str) -> SessionEnd:
        return SessionEnd(p.ErrorCode.BAD_AUDIO.value, 1007, message, p.ErrorCode.BAD_AUDIO)

    def _message(self, text: str) -> None:
        assert self.slot is not None
        if not text.startswith(p.COMPAT_PREFIX):
            raise self._bad(f"messages must start with '{p.COMPAT_PREFIX}'")
        payload = text[len(p.COMPAT_PREFIX) :]
        if len(payload) > (self.limits.max_frame_bytes + 2) // 3 * 4:
            raise self._bad(
                f"a message holds at most {self.limits.max_frame_bytes // p.STEP_BYTES}"
                f" steps of {SAMPLES_PER_STEP} samples"
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise self._bad("the audio is not valid base64") from None
        if not data or len(data) % p.STEP_BYTES:
            raise self._bad(
                f"each message must hold whole steps of {SAMPLES_PER_STEP} int16 "
                f"samples at 16 kHz ({p.STEP_BYTES} bytes each), got {len(data)} bytes"
            )
        seqs = [self.submit_step(step) for step in self.pcm_steps(data)]
        self._replies.append((seqs, {}))
        self._flush()

    def deliver(self, result: StepResult) -> None:
        """Collect the step into its message's reply; send the replies that are complete."""
        if result.seq is None:  # silence the engine inserted while the client paused: nobody asked
            return
        for seq in [*result.dropped, result.seq]:
            for seqs, found in self._replies:
                if seq in seqs:
                    found[seq] = (
                        result.audio
                        if seq == result.seq
                        else np.zeros(SAMPLES_PER_STEP, np.float32)
                    )
                    break
        self._flush()

    def _flush(self) -> None:
        """Send every reply, in order, whose steps are all answered (dropped ones: silence)."""
        silence = np.zeros(SAMPLES_PER_STEP, np.float32)
        while self._replies:
            seqs, found = self._replies[0]
            if any(s is not None and s not in found for s in seqs):
                return
            self._replies.popleft()
            audio = np.concatenate([found[s] if s is not None else silence for s in seqs])
            self.send(p.COMPAT_PREFIX + base64.b64encode(float_to_pcm16(audio)).decode("ascii"))
            self.steps_sent += len(seqs)


def parse_temperatures(query: Mapping[str, str]) -> dict[str, float]:
    """The original's query parameters -> sampling changes; ValueError says which one is wrong."""
    changes: dict[str, float] = {}
    for name in TEMPERATURE_FIELDS:
        if name in query:
            try:
                changes[name] = float(query[name])
            except ValueError:
                raise ValueError(f"{name} must be a number, got {query[name]!r}") from None
            if not math.isfinite(changes[name]):
                raise ValueError(f"{name} must be a finite number, got {query[name]!r}")
    SamplingSettings().replace(**changes)  # range checks
    return changes
