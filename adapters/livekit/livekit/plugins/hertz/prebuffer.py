"""A pre-buffer at the start of each burst, for the ``AgentSession`` path.

``AgentSession`` plays the adapter's bursts through RoomIO's ``rtc.AudioSource``, which plays in
real time and fills an empty queue with silence. hertz-dev produces exactly in real time, so a
burst handed on as it is made keeps that queue nearly empty, and a step that comes late is heard
as a gap. :class:`BurstPrebuffer` sits between the model and the adapter: it holds the first
``prebuffer`` seconds of each burst and hands them on at once, so the rest of the burst plays
with that much queued, and late steps eat into the cushion instead of the caller's ears. Each
burst starts ``prebuffer`` later; the audio between bursts (the model's quiet, which the adapter
does not play) is passed on at once.

It finds the bursts with its own copy of the adapter's gate, fed the same frames in the same
order. Gates decide on the frames alone (their level and duration), never on the wall clock, so
the copy opens and closes exactly where the adapter's does.
"""

from __future__ import annotations

from livekit.agents import llm


class BurstPrebuffer:
    """Decides when each of the model's frames is handed to the adapter.

    Args:
        gate: A gate like the adapter's (same kind and options), used only here.
        prebuffer: Seconds held at the start of each burst (0: none).
    """

    def __init__(self, gate: llm.AudioGate, prebuffer: float) -> None:
        self._gate = gate
        self._prebuffer = prebuffer
        self._held: list[llm.DuplexAudioFrame] = []
        self._held_seconds = 0.0
        self._in_burst = False  # the gate is open on the frames seen so far

    def push(self, frame: llm.DuplexAudioFrame) -> list[llm.DuplexAudioFrame]:
        """Take the model's next frame; return the frames to hand on now, oldest first."""
        opening = not self._in_burst
        self._in_burst = self._gate.update(frame.frame)
        if not self._in_burst and not opening:
            self._gate.deactivate()  # as the adapter does when it closes a burst
        if self._held:  # a burst is being held: this frame joins it, whatever it is
            self._held.append(frame)
            self._held_seconds += frame.frame.duration
            if self._held_seconds >= self._prebuffer - 1e-6 or not self._in_burst:
                return self.flush()  # enough in hand, or a burst shorter than the pre-buffer
            return []
        if self._in_burst and opening and self._prebuffer > 0:
            self._held, self._held_seconds = [frame], frame.frame.duration
            return self.flush() if self._held_seconds >= self._prebuffer - 1e-6 else []
        return [frame]

    def flush(self) -> list[llm.DuplexAudioFrame]:
        """Hand on everything held (the end of the stream, or the pre-buffer is full)."""
        held, self._held, self._held_seconds = self._held, [], 0.0
        return held
