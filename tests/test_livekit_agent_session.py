"""``AgentSession`` driving the real plugin and a real tiny model, with no LiveKit server.

The caller is a synthetic ``io.AudioInput`` (a tone, paced in real time) and the speaker an
``io.AudioOutput`` that keeps every frame it is given. The tiny model's weights are the reference
test weights: its output is noise around 0.1 RMS, not speech. The tests declare its quiet level
well below that, so the gate takes every step for speech and every sample should be played.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

sys.path.append(str(Path(__file__).resolve().parents[1] / "adapters" / "livekit"))

from livekit import rtc  # noqa: E402
from livekit.agents import Agent, AgentSession, get_job_context, io, llm  # noqa: E402
from livekit.agents.testing import fake_job_context  # noqa: E402
from livekit.plugins import hertz  # noqa: E402
from livekit_fixtures import *  # noqa: E402,F403 - the shared engine fixtures

from hertz_agents.audio import RESAMPLE_QUALITY  # noqa: E402
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP  # noqa: E402

OUT_RATE = 24_000
QUIET = hertz.GateOptions(
    silence_rms=0.01
)  # the tiny model's noise (~0.1) is 10x this: always "speech"


class ToneInput(io.AudioInput):
    """A caller who talks (a 220 Hz tone) for ``seconds``, in 20 ms frames paced in real time."""

    def __init__(self, seconds: float, *, rate: int = 48_000, start: float | None = None) -> None:
        super().__init__(label="synthetic caller")
        self._rate, self._n = rate, rate // 50
        self._frames = int(seconds * 50)
        self._i = 0
        self._start = start

    async def __anext__(self) -> rtc.AudioFrame:
        if self._i >= self._frames:
            raise StopAsyncIteration  # the caller goes quiet: the engine keeps stepping on silence
        if self._start is None:
            self._start = time.monotonic()
        await asyncio.sleep(max(0.0, self._start + self._i / 50 - time.monotonic()))
        t = (np.arange(self._n) + self._i * self._n) / self._rate
        self._i += 1
        pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
        return rtc.AudioFrame(pcm.tobytes(), self._rate, 1, self._n)


class CaptureOutput(io.AudioOutput):
    """A speaker that plays instantly and keeps every frame; counts the framework's interrupts."""

    def __init__(self) -> None:
        super().__init__(
            label="capture",
            capabilities=io.AudioOutputCapabilities(pause=False),
            sample_rate=OUT_RATE,
        )
        self.frames: list[rtc.AudioFrame] = []
        self.cleared = 0
        self._segment = 0.0

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if not self._segment:
            self.on_playback_started(created_at=time.time())
        self.frames.append(frame)
        self._segment += frame.duration

    def flush(self) -> None:
        super().flush()
        if self._segment:
            self.on_playback_finished(playback_position=self._segment, interrupted=False)
            self._segment = 0.0

    def clear_buffer(self) -> None:
        self.cleared += 1
        if self._segment:
            self.on_playback_finished(playback_position=self._segment, interrupted=True)
            self._segment = 0.0

    def audio(self) -> np.ndarray:
        return (
            np.concatenate([np.frombuffer(f.data, np.int16) for f in self.frames]).astype(
                np.float32
            )
            / 32767
        )


def full_duplex_session(model: hertz.DuplexModel) -> AgentSession:
    """The settings docs/livekit.md explains: no VAD, no AEC warm-up, the model owns turn-taking."""
    return AgentSession(
        llm=model,
        vad=None,
        aec_warmup_duration=None,
        turn_handling={"turn_detection": "realtime_llm"},
    )


async def run_call(
    model: hertz.DuplexModel, seconds: float, *, start: float | None = None, caller_barges_in=False
):
    session = full_duplex_session(model)
    session.input.audio = ToneInput(seconds, start=start)
    out = session.output.audio = CaptureOutput()
    states: list[str] = []
    session.on("agent_state_changed", lambda ev: states.append(ev.new_state))
    agent = Agent(instructions="hertz-dev reads no instructions")
    await session.start(agent)
    await asyncio.sleep(seconds / 2)
    duplex = agent.duplex_session  # the framework hands back the plugin's own session
    assert isinstance(duplex, hertz.DuplexSession)
    if caller_barges_in:
        # hertz-dev detects no turns, so it never sends this; a provider with a server-side VAD
        # would, and the framework must still not cut a model that speaks over the caller
        duplex.emit("input_speech_started", llm.InputSpeechStartedEvent())
    await asyncio.sleep(seconds / 2)
    metrics = duplex.metrics
    cleared = out.cleared  # before closing, which clears whatever is still playing
    await session.aclose()
    return out, states, metrics, cleared


@pytest.mark.parametrize("in_job", [False, True], ids=["plain", "fake_job_context"])
async def test_every_model_sample_reaches_the_speaker_and_the_caller_never_cuts_it(
    engine, tmp_path, in_job
):
    model = hertz.DuplexModel(model=engine, sample_rate=OUT_RATE, gate=QUIET, record_dir=tmp_path)
    if in_job:
        with fake_job_context() as ctx:
            assert get_job_context() is ctx
            out, states, metrics, cleared = await run_call(model, 3.0, caller_barges_in=True)
    else:
        out, states, metrics, cleared = await run_call(model, 3.0, caller_barges_in=True)

    assert "speaking" in states
    assert cleared == 0, "the framework interrupted the model while the caller talked"
    assert metrics["steps"] >= 16 and metrics["steps"] - metrics["silence_steps"] >= 12

    # the speaker got the model's own 16 kHz output, resampled once, sample for sample
    recording, _ = sf.read(next(tmp_path.glob("*.wav")), dtype="float32")
    model_16k = recording[SAMPLES_PER_STEP:, 1]  # the recording plays the model one step late
    played = out.audio()
    expected = soxr.resample(model_16k, SAMPLE_RATE, OUT_RATE, quality=RESAMPLE_QUALITY)
    n = (
        min(played.shape[0], expected.shape[0]) - OUT_RATE // 10
    )  # the stream's tail is still held back
    assert n > 2 * OUT_RATE
    np.testing.assert_allclose(played[:n], expected[:n], atol=3e-3)


def test_three_concurrent_calls_in_three_job_threads_are_batched_into_one_engine(engine):
    # LiveKit's thread job executor runs each call on its own thread and event loop; the model
    # object is shared, so every call lands on the one engine, which steps them together.
    model = hertz.DuplexModel(model=engine, sample_rate=OUT_RATE, gate=QUIET)
    ticks_before = engine.ticks
    start = time.monotonic() + 0.5  # one clock for the three callers, as if they spoke in sync
    results: list = [None] * 3

    def job(i: int) -> None:
        results[i] = asyncio.run(run_call(model, 3.0, start=start))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ticks = list(engine.tick_sizes)[-(engine.ticks - ticks_before) :]

    for out, states, metrics, cleared in results:
        assert "speaking" in states and cleared == 0
        assert metrics["steps"] >= 16
        assert sum(f.duration for f in out.frames) > 1.5
    # (a tick can hold more rows than ours if another test left a session open on the engine)
    assert sum(size >= 3 for size in ticks) >= len(ticks) // 2, f"tick sizes: {ticks}"


async def test_a_talking_caller_is_speaking_not_away_and_away_only_after_silence(engine):
    """hertz-dev detects no turns; the plugin tells AgentSession when the caller talks.

    The model is kept quiet for the framework (its gate never opens), so the agent stays
    "listening" and the away timer (1 s here; LiveKit's default is 15 s) runs whenever the user
    counts as listening too. Before the fix the caller showed as "away" 1 s into talking.
    """
    model = hertz.DuplexModel(
        model=engine, sample_rate=OUT_RATE, gate=hertz.GateOptions(silence_rms=1.0)
    )
    session = AgentSession(
        llm=model,
        vad=None,
        aec_warmup_duration=None,
        user_away_timeout=1.0,
        turn_handling={"turn_detection": "realtime_llm"},
    )
    talk_seconds = 3.0
    session.input.audio = ToneInput(talk_seconds)
    session.output.audio = CaptureOutput()
    states: list[tuple[float, str]] = []
    start = time.monotonic()
    session.on(
        "user_state_changed", lambda ev: states.append((time.monotonic() - start, ev.new_state))
    )
    await session.start(Agent(instructions="hertz-dev reads no instructions"))
    await asyncio.sleep(talk_seconds + 3.0)
    await session.aclose()

    speaking = [t for t, state in states if state == "speaking"]
    assert speaking and speaking[0] < 0.5, states
    first_speaking = speaking[0]
    assert not [t for t, state in states if state == "away" and t < talk_seconds], states
    # Quiet after the tone: listening once the hangover passes, then away after the timeout.
    listening = [t for t, state in states if state == "listening" and t > first_speaking]
    away = [t for t, state in states if state == "away"]
    assert listening and away and away[0] - listening[0] >= 0.9, states


class RealTimeSpeaker(CaptureOutput):
    """Plays like RoomIO's ``rtc.AudioSource``: in real time from a queue of at most 200 ms.

    When a frame comes after the queued audio has run out inside a burst, the caller hears
    silence for that long: each such gap is kept.
    """

    QUEUE_SECONDS = 0.2  # RoomIO's AudioSource(queue_size_ms=200)

    def __init__(self) -> None:
        super().__init__()
        self.gaps: list[float] = []
        self._queue_end: float | None = None  # when the audio queued so far will have played

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        now = time.monotonic()
        if self._queue_end is not None and now > self._queue_end:
            self.gaps.append(now - self._queue_end)
        start = now if self._queue_end is None else max(now, self._queue_end)
        self._queue_end = start + frame.duration
        await super().capture_frame(frame)
        queued = self._queue_end - time.monotonic()
        if queued > self.QUEUE_SECONDS:  # a full source makes capture_frame wait for room
            await asyncio.sleep(queued - self.QUEUE_SECONDS)

    def flush(self) -> None:
        super().flush()
        self._queue_end = None  # the burst ended: silence until the next one is not a gap


@pytest.mark.parametrize("prebuffer", [0.3, 0.0])
async def test_late_steps_leave_no_gap_in_a_burst_with_the_prebuffer(engine, prebuffer):
    # Steps that come late (a busy GPU, a slow network hop to a hertz:// server) are heard as
    # silence inside the model's speech unless audio is queued ahead of them. Without a cushion
    # a late step is still absorbed by whatever slack the speaker's queue happens to hold (the
    # start of the call can leave 50-80 ms, and each stall leaves its own length), so the 200 ms
    # stall among the 80 ms ones is what the control is sure to hear; the 0.3 s pre-buffer
    # covers it too.
    model = hertz.DuplexModel(model=engine, sample_rate=OUT_RATE, gate=QUIET, prebuffer=prebuffer)
    session = full_duplex_session(model)
    session.input.audio = ToneInput(4.0)
    out = session.output.audio = RealTimeSpeaker()
    await session.start(Agent(instructions="hertz-dev reads no instructions"))
    await asyncio.sleep(1.0)
    for stall in (0.08, 0.08, 0.2, 0.08, 0.08):
        engine.inject_stall(stall)
        await asyncio.sleep(0.5)
    await session.aclose()
    played = sum(f.duration for f in out.frames)
    longest = max(out.gaps, default=0.0)
    print(f"\nprebuffer {prebuffer}: {played:.1f} s played, longest gap {longest * 1000:.0f} ms")
    assert played > 2.0
    if prebuffer:
        assert longest <= 0.02, f"gaps inside the burst: {[round(g, 3) for g in out.gaps]}"
    else:  # the control: without a cushion the same stalls are heard (at least the long one)
        assert longest >= 0.04, f"no gap without the pre-buffer: {out.gaps}"
