"""Playing the model's continuous output into a room without gaps (the plain-``rtc`` path).

An ``rtc.AudioSource`` plays out in real time from its queue and fills an empty queue with
silence. hertz-dev produces exactly in real time, one step every 125 ms, so a queue that starts
empty stays nearly empty and any step that comes a little late is heard as a gap. Holding the
first ``prebuffer`` seconds and handing them over at once keeps that much audio queued for the
rest of the call: late steps eat into the cushion instead of the caller's ears.
"""

from __future__ import annotations

from collections.abc import AsyncIterable

from livekit import rtc
from livekit.agents import llm

from hertz_agents.timing import STEP_SECONDS

from .models import DEFAULT_PREBUFFER, DEFAULT_SAMPLE_RATE


def output_source(
    sample_rate: int = DEFAULT_SAMPLE_RATE, *, prebuffer: float = DEFAULT_PREBUFFER
) -> rtc.AudioSource:
    """A mono source whose queue holds the pre-buffer plus two steps of headroom."""
    return rtc.AudioSource(
        sample_rate, 1, queue_size_ms=round((prebuffer + 2 * STEP_SECONDS) * 1000)
    )


async def play_stream(
    frames: AsyncIterable[llm.DuplexAudioFrame | rtc.AudioFrame],
    source: rtc.AudioSource,
    *,
    prebuffer: float = DEFAULT_PREBUFFER,
) -> None:
    """Capture every frame into ``source``, starting once ``prebuffer`` seconds are held.

    Args:
        frames: ``DuplexSession.audio_stream`` (or plain frames).
        source: Made with :func:`output_source` (or with a queue longer than ``prebuffer``).
        prebuffer: Seconds held before playing starts; each one adds to the caller's latency.
    """
    held: list[rtc.AudioFrame] | None = []
    held_seconds = 0.0
    async for item in frames:
        frame = item.frame if isinstance(item, llm.DuplexAudioFrame) else item
        if held is not None:
            held.append(frame)
            held_seconds += frame.duration
            if held_seconds < prebuffer - 1e-6:
                continue
            for f in held:
                await source.capture_frame(f)
            held = None
            continue
        await source.capture_frame(frame)
    for f in held or ():  # a call shorter than the pre-buffer still plays what it had
        await source.capture_frame(f)
