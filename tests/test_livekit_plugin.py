"""The LiveKit plugin on its own: a real tiny model behind ``hertz.DuplexModel``, no LiveKit server.

Frames go in as LiveKit ``rtc.AudioFrame``s of any rate and channel count and come out of
``audio_stream``; what reached the model is read back from the core's call recording.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

# The plugin lives under adapters/livekit (installed as livekit.plugins.hertz); from a checkout
# the tests import it from the source tree.
sys.path.append(str(Path(__file__).resolve().parents[1] / "adapters" / "livekit"))

from early_audio import (  # noqa: E402
    assert_heard_from_the_first_sample,
    caller_audio,
    identity_engine,
    open_late,
)
from livekit import rtc  # noqa: E402
from livekit.agents import APIStatusError, llm  # noqa: E402
from livekit.plugins import hertz  # noqa: E402
from livekit_fixtures import *  # noqa: E402,F403 - the shared engine fixtures

from hertz_agents.audio import RESAMPLE_QUALITY  # noqa: E402
from hertz_agents.engine import Engine  # noqa: E402
from hertz_agents.errors import EngineFull  # noqa: E402
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS  # noqa: E402


def _frames(audio: np.ndarray, rate: int, frame_ms: int) -> list[rtc.AudioFrame]:
    """float audio [n] or [n, channels] -> int16 LiveKit frames of ``frame_ms``."""
    audio = audio if audio.ndim == 2 else audio[:, None]
    n = rate * frame_ms // 1000
    pcm = (audio * 32767).astype(np.int16)
    return [
        rtc.AudioFrame(pcm[i : i + n].tobytes(), rate, audio.shape[1], pcm[i : i + n].shape[0])
        for i in range(0, pcm.shape[0], n)
    ]


async def _push_in_real_time(session: hertz.DuplexSession, frames: list[rtc.AudioFrame]) -> None:
    start = time.monotonic()
    played = 0.0
    for frame in frames:
        session.push_audio(frame)
        played += frame.duration
        await asyncio.sleep(max(0.0, start + played - time.monotonic()))


async def _collect(session: hertz.DuplexSession, seconds: float) -> list[llm.DuplexAudioFrame]:
    out: list[llm.DuplexAudioFrame] = []

    async def read() -> None:
        async for f in session.audio_stream:
            out.append(f)

    task = asyncio.create_task(read())
    await asyncio.sleep(seconds)
    task.cancel()
    return out


async def test_frames_of_any_rate_and_channels_reach_the_model_as_a_one_shot_resample(
    engine, tmp_path
):
    # 44.1 kHz stereo in 10 ms frames (441 samples: never a divisor of a step). The caller channel
    # of the recording holds exactly the 16 kHz steps the model was fed.
    rate, seconds = 44_100, 0.9
    t = np.arange(int(rate * seconds)) / rate
    stereo = np.stack(
        [0.4 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], axis=1
    )
    frames = _frames(stereo, rate, frame_ms=10)
    model = hertz.DuplexModel(model=engine, record_dir=tmp_path, seed=0)
    session = model.session()
    await _push_in_real_time(session, frames)  # the first frames arrive before the slot is open
    await asyncio.sleep(4 * STEP_SECONDS)
    fed = session.metrics["steps"] - session.metrics["silence_steps"]
    await session.aclose()

    caller = sf.read(next(tmp_path.glob("*.wav")), dtype="float32")[0][:, 0]
    int16_stereo = (
        np.concatenate([np.frombuffer(f.data, np.int16).reshape(-1, 2) for f in frames]) / 32767
    )
    expected = soxr.resample(
        int16_stereo.mean(axis=1).astype(np.float32), rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY
    )
    whole_steps = int(seconds * SAMPLE_RATE) // SAMPLES_PER_STEP
    assert whole_steps - 1 <= fed <= whole_steps  # soxr may still hold back the end of the last one
    n = fed * SAMPLES_PER_STEP
    np.testing.assert_allclose(caller[:n], expected[:n], atol=2e-4)  # int16 twice, nothing else


async def test_push_audio_returns_at_once_while_the_model_is_busy(engine):
    session = hertz.DuplexModel(model=engine).session()
    frames = _frames(np.zeros(48_000 // 2, dtype=np.float32), 48_000, frame_ms=20)
    assert await session.wait_open()
    engine.inject_stall(1.0)  # the engine's next tick takes a second longer
    session.push_audio(frames[0])
    worst = 0.0
    for frame in frames[1:]:
        t0 = time.perf_counter()
        session.push_audio(frame)
        worst = max(worst, time.perf_counter() - t0)
    await anext(aiter(session.audio_stream))  # let the stalled tick pass before the next test
    await session.aclose()
    assert worst < 0.05, (
        f"push_audio took {worst * 1000:.0f} ms while the engine was stalled for 1000 ms"
    )


async def test_a_muted_caller_still_gets_every_step_with_the_models_silence_included(engine):
    # No frames at all (a muted or unpublished track): the engine steps the model on silence, and
    # audio_stream yields each step, stamped on the model's timeline, at the plugin's rate.
    session = hertz.DuplexModel(model=engine, sample_rate=24_000).session()
    frames = await _collect(session, 1.5)
    metrics = session.metrics
    await session.aclose()
    assert len(frames) >= 6
    assert metrics["silence_steps"] == metrics["steps"]
    assert [f.start_ms for f in frames] == [
        round(i * STEP_SECONDS * 1000) for i in range(len(frames))
    ]
    assert all(f.frame.sample_rate == 24_000 and f.frame.num_channels == 1 for f in frames)
    # soxr hands out its output in uneven blocks, but never more than a step's worth per step
    step_24k = SAMPLES_PER_STEP * 24_000 // SAMPLE_RATE
    total = sum(f.frame.samples_per_channel for f in frames)
    assert len(frames) * step_24k - step_24k <= total <= len(frames) * step_24k


async def test_the_gate_is_tuned_to_the_models_own_quiet_level(engine, tiny_model_dir):
    quiet = await asyncio.to_thread(hertz.measure_quiet_level, engine)
    assert quiet is not None and quiet > 0
    model = await asyncio.to_thread(hertz.DuplexModel.load, tiny_model_dir)
    assert model.engine is engine  # one engine per process and model: every call batches into it
    assert model._opts.gate.silence_rms == quiet  # measured once per engine, shared by every load

    # what the model produces while it hears nothing never opens the gate; speech well above it does
    listening = hertz.DuplexModel(model=engine).session()
    frames = [f.frame for f in await _collect(listening, 1.5)]
    await listening.aclose()
    gate = model.audio_gate()
    assert isinstance(gate, llm.FixedGate)
    assert not any(gate.update(f) for f in frames)
    assert any(gate.update(_scaled(f, 6.0)) for f in frames)


def _scaled(frame: rtc.AudioFrame, gain: float) -> rtc.AudioFrame:
    pcm = np.clip(
        np.frombuffer(frame.data, np.int16).astype(np.float32) * gain, -32768, 32767
    ).astype(np.int16)
    return rtc.AudioFrame(pcm.tobytes(), frame.sample_rate, 1, pcm.shape[0])


async def test_instructions_chat_items_and_tools_are_accepted_and_generate_reply_says_why_not(
    engine,
):
    @llm.function_tool
    async def lookup(city: str) -> str:
        """Look up the weather."""
        return "sunny"

    adapter = llm.DuplexRealtimeAdapter(hertz.DuplexModel(model=engine))
    caps = adapter.capabilities
    assert (
        caps.supports_overlapping_speech
        and not caps.message_truncation
        and not caps.user_transcription
    )
    rt = adapter.session()
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content="hello")
    await rt._update_session(instructions="be brief", chat_ctx=ctx, tools=[lookup])
    await rt.update_instructions("be briefer")
    assert rt.tools.flatten() == []
    with pytest.raises(llm.RealtimeError, match="decides for itself when to speak"):
        await rt.generate_reply()
    await rt.aclose()


async def test_update_options_changes_the_sampling_of_calls_in_progress(engine):
    model = hertz.DuplexModel(model=engine)
    session = model.session()
    assert await session.wait_open()
    model.update_options(sampling=hertz.SamplingSettings(token_temp=0.3, top_p=0.9))
    assert session.core_session.sampling == hertz.SamplingSettings(token_temp=0.3, top_p=0.9)
    later = model.session()
    assert later._opts.sampling.token_temp == 0.3
    await session.aclose()
    await later.aclose()


async def test_a_full_engine_is_reported_as_an_unrecoverable_error(tiny_model_dir):
    from hertz_agents.checkpoint import load_model

    engine = Engine(load_model(tiny_model_dir), max_sessions=1)
    try:
        model = hertz.DuplexModel(model=engine)
        first = model.session()
        assert await first.wait_open()
        second = model.session()
        errors: list[llm.RealtimeModelError] = []
        second.on("error", errors.append)
        frames = await _collect(second, 0.5)
        assert frames == []
        assert not await second.wait_open()
        assert len(errors) == 1 and not errors[0].recoverable
        # in LiveKit's APIError family (one log line, not a traceback), the core's error as cause
        error = errors[0].error
        assert isinstance(error, APIStatusError) and error.status_code == 503
        assert not error.retryable and isinstance(error.__cause__, EngineFull)
        await first.aclose()
        await second.aclose()
    finally:
        engine.close()


async def test_worker_load_is_calls_in_progress_over_engine_capacity(engine):
    before = hertz.worker_load()
    sessions = [hertz.DuplexModel(model=engine).session() for _ in range(2)]
    assert all(await asyncio.gather(*(s.wait_open() for s in sessions)))
    assert hertz.worker_load() == pytest.approx(before + 2 / engine.max_sessions)
    for s in sessions:
        await s.aclose()
    assert hertz.worker_load() == pytest.approx(before)


async def test_caller_audio_sent_while_the_slot_opens_is_heard_from_its_first_sample(
    tiny_model_dir, monkeypatch
):
    """The core session is created at once and keeps early audio: the model hears every sample.

    Frames are pushed from the start of the call while the engine's open takes a second
    (``open_late``); the echo model says back what it heard. The same check as the Pipecat
    service's (test_pipecat_service), with the same audio.
    """
    engine = identity_engine(tiny_model_dir)
    open_late(engine, monkeypatch)
    session = hertz.DuplexModel(model=engine, sample_rate=SAMPLE_RATE).session()
    sent = caller_audio(2.0)
    frame = SAMPLE_RATE // 50  # 20 ms, as RoomIO delivers them
    frames = [
        rtc.AudioFrame(sent[i : i + frame].tobytes(), SAMPLE_RATE, 1, frame)
        for i in range(0, len(sent), frame)
    ]
    try:
        reading = asyncio.create_task(_collect(session, len(sent) / SAMPLE_RATE + 0.6))
        await _push_in_real_time(session, frames)
        out = await reading
        dropped = session.metrics["dropped_input_steps"]
        await session.aclose()
    finally:
        engine.close()
    assert dropped == 0
    back = np.concatenate([np.frombuffer(f.frame.data, dtype=np.int16) for f in out])
    assert_heard_from_the_first_sample(sent, back, min_s=1.75)
