"""The original hertz-dev server's protocol, so clients written for it work unchanged.

``/audio`` is a WebSocket of text frames ``data:audio/raw;base64,<int16 PCM, 16 kHz>``; each
message the client sends gets exactly one reply of the same length, the model's audio for
those steps. ``POST /set_temperature?token_temp=&categorical_temp=&gaussian_temp=`` sets the
temperatures (for every compatibility session, as the original's one global session did).

Differences, all on the safe side: a message must hold whole 125 ms steps (the original client
sends exactly one); anything else closes that session with a reason instead of crashing the
server. With a token configured, original clients pass it in the base URL's path:
``ws://host:port/t/<token>`` (they append ``/audio`` and ``/set_temperature`` themselves).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import deque

import numpy as np
from aiohttp import WSMsgType, web

from hertz_agents.sampling import SamplingSettings
from hertz_agents.server import protocol as p
from hertz_agents.server.bridge import StepResult
from hertz_agents.server.sessions import Connection, SessionEnd
from hertz_agents.timing import SAMPLES_PER_STEP

TEMPERATURE_FIELDS = ("token_temp", "categorical_temp", "gaussian_temp")


class CompatSession(Connection):
    """One original-protocol conversation: a reply per message, in order."""

    endpoint = "compat"

    def __init__(self, server, ws: web.WebSocketResponse) -> None:
        super().__init__(server, ws)
        # Per message, oldest first: the input steps it holds and the outputs found so far.
        self._replies: deque[tuple[list[int | None], dict[int, np.ndarray]]] = deque()

    async def serve(self) -> None:
        server = self.server
        prompt = await server.resolve_prompt(server.default_prompt_ref())
        await self.open_slot(sampling=server.compat_sampling, prompt=prompt, seed=None)
        idle_deadline = time.monotonic() + self.limits.idle_timeout
        while True:
            msg = await self.receive(idle_deadline)
            if msg.type == WSMsgType.TEXT:
                idle_deadline = time.monotonic() + self.limits.idle_timeout
                self._message(msg.data)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            elif msg.type == WSMsgType.ERROR:
                raise SessionEnd(p.ErrorCode.BAD_REQUEST.value, 1009, f"bad message: {msg.data}",
                                 p.ErrorCode.BAD_REQUEST)
            else:
                raise self._bad(f"send text frames '{p.COMPAT_PREFIX}<base64 int16 PCM>', not binary")

    def _bad(self, message: str) -> SessionEnd:
        return SessionEnd(p.ErrorCode.BAD_AUDIO.value, 1007, message, p.ErrorCode.BAD_AUDIO)

    def _message(self, text: str) -> None:
        assert self.bridge is not None
        if not text.startswith(p.COMPAT_PREFIX):
            raise self._bad(f"messages must start with '{p.COMPAT_PREFIX}'")
        payload = text[len(p.COMPAT_PREFIX):]
        if len(payload) > (self.limits.max_frame_bytes + 2) // 3 * 4:
            raise self._bad(f"a message holds at most {self.limits.max_frame_bytes // p.STEP_BYTES} steps "
                            f"of {SAMPLES_PER_STEP} samples")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise self._bad("the audio is not valid base64") from None
        if not data or len(data) % p.STEP_BYTES:
            raise self._bad(f"each message must hold whole steps of {SAMPLES_PER_STEP} int16 samples at 16 kHz "
                            f"({p.STEP_BYTES} bytes each), got {len(data)} bytes")
        seqs = [self.bridge.submit(step) for step in self.pcm_steps(data)]
        self._replies.append((seqs, {}))
        self._flush()

    def deliver(self, result: StepResult) -> None:
        if result.seq is None:  # silence the engine inserted while the client paused: nobody asked
            return
        for seq in [*result.dropped, result.seq]:
            for seqs, found in self._replies:
                if seq in seqs:
                    found[seq] = result.audio if seq == result.seq else np.zeros(SAMPLES_PER_STEP, np.float32)
                    break
        self._flush()

    def _flush(self) -> None:
        """Send every reply, in order, whose steps are all answered (dropped steps read as silence)."""
        silence = np.zeros(SAMPLES_PER_STEP, np.float32)
        while self._replies:
            seqs, found = self._replies[0]
            if any(s is not None and s not in found for s in seqs):
                return
            self._replies.popleft()
            audio = np.concatenate([found[s] if s is not None else silence for s in seqs])
            self.send(p.COMPAT_PREFIX + base64.b64encode(p.float_to_pcm16(audio)).decode("ascii"))
            self.steps_sent += len(seqs)


def parse_temperatures(query) -> dict[str, float]:
    """The original's query parameters -> sampling changes; ValueError says which one is wrong."""
    changes: dict[str, float] = {}
    for name in TEMPERATURE_FIELDS:
        if name in query:
            try:
                changes[name] = float(query[name])
            except ValueError:
                raise ValueError(f"{name} must be a number, got {query[name]!r}") from None
    SamplingSettings().replace(**changes)  # range checks
    return changes
