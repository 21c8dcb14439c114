"""HertzDuplexService in Pipecat pipelines (pipecat.tests.utils.run_test), with the tiny real model.

The identity engine (a fake model, see test_pipecat_support) appears only where a test needs the
model's output to follow its input.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip(
    "pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`"
)

from early_audio import assert_heard_from_the_first_sample, caller_audio, open_late  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    MetricsFrame,
    ServiceUpdateSettingsFrame,
    SpeechOutputAudioRawFrame,
    TextFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import ProcessingMetricsData, TTFBMetricsData  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402
from pipecat_hertz import HertzDuplexService, HertzDuplexSettings  # noqa: E402
from test_pipecat_support import (  # noqa: E402
    Probe,
    feed_realtime,
    identity_engine,
    run_pipeline,
    speech_like,
    to_pcm16,
)

from hertz_agents.engine import load_engine  # noqa: E402
from hertz_agents.timing import SAMPLE_RATE, STEP_SECONDS  # noqa: E402

FRAME_S = 0.02


def caller_frames(seconds: float, rate: int = SAMPLE_RATE, seed: int = 0) -> list:
    """Speech-like caller audio as 20 ms InputAudioRawFrames, paced with SleepFrames."""
    audio = speech_like(seconds, rate, seed=seed)
    step = int(rate * FRAME_S)
    frames: list = []
    for i in range(0, len(audio) - step + 1, step):
        frames += [InputAudioRawFrame(to_pcm16(audio[i : i + step]), rate, 1), SleepFrame(FRAME_S)]
    return frames


def audio_of(frames) -> list[SpeechOutputAudioRawFrame]:
    return [f for f in frames if isinstance(f, SpeechOutputAudioRawFrame)]


class SessionSpy(Probe):
    """Remembers every session the service had while audio flowed (they end with the pipeline)."""

    def __init__(self, service: HertzDuplexService) -> None:
        super().__init__(SpeechOutputAudioRawFrame)
        self.service, self.sessions = service, []

    async def process_frame(self, frame, direction):
        session = self.service.session
        if session is not None and (not self.sessions or self.sessions[-1] is not session):
            self.sessions.append(session)
        await super().process_frame(frame, direction)


async def test_caller_audio_in_model_speech_out_at_pipeline_rate_other_frames_pass(tiny_model_dir):
    service = HertzDuplexService(model=tiny_model_dir)
    frames = caller_frames(1.5) + [SleepFrame(0.5)]  # the last steps come out before the end
    frames.insert(10, TextFrame("passes through"))
    down, up = await run_test(
        service,
        frames_to_send=frames,
        start_timeout=30,
        pipeline_params=PipelineParams(audio_out_sample_rate=24000),
    )
    speech = audio_of(down)
    sent = sum(isinstance(f, InputAudioRawFrame) for f in frames)
    assert sum(isinstance(f, InputAudioRawFrame) for f in down) == sent, (
        "caller audio passes on by default"
    )
    assert [f.text for f in down if isinstance(f, TextFrame)] == ["passes through"]
    assert speech, "the model produced no audio"
    assert {f.sample_rate for f in speech} == {24000} and {f.num_channels for f in speech} == {1}
    assert max(f.num_frames for f in speech) == int(24000 * 0.02), "frames are at most 20 ms"
    assert not any(f.interruptible for f in speech), (
        "full duplex: transports must not drop model audio"
    )
    # One step of audio per input step (the output resampler may still hold a few ms).
    heard_steps = int(1.5 / STEP_SECONDS)
    played = sum(f.num_frames for f in speech) / 24000
    assert (heard_steps - 2) * STEP_SECONDS <= played <= (heard_steps + 3) * STEP_SECONDS
    assert not [f for f in up if isinstance(f, ErrorFrame)]


async def test_audio_passthrough_off_consumes_caller_audio(tiny_model_dir):
    service = HertzDuplexService(model=tiny_model_dir, audio_passthrough=False)
    down, _ = await run_test(service, frames_to_send=caller_frames(0.5), start_timeout=30)
    assert not any(isinstance(f, InputAudioRawFrame) for f in down)
    assert audio_of(down), "the model still talks"


async def test_interruption_passes_through_and_the_model_keeps_talking(tiny_model_dir):
    service = HertzDuplexService(model=tiny_model_dir)
    frames = caller_frames(1.0) + [InterruptionFrame()] + caller_frames(1.0, seed=1)
    down, _ = await run_test(service, frames_to_send=frames, start_timeout=30)
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    after = sum(f.num_frames for f in audio_of(down[cut:])) / SAMPLE_RATE
    assert after >= 5 * STEP_SECONDS, f"only {after:.2f} s of model audio after the interruption"


async def test_settings_update_changes_sampling_while_running(tiny_model_dir):
    service = HertzDuplexService(model=tiny_model_dir)
    spy = SessionSpy(service)
    update = ServiceUpdateSettingsFrame(
        delta=HertzDuplexSettings(token_temp=0.3, top_p=0.9, gate_threshold_db=-50)
    )
    frames = caller_frames(0.5) + [update] + caller_frames(0.5)
    await run_test(Pipeline([service, spy]), frames_to_send=frames, start_timeout=30)
    sampling = spy.sessions[-1].sampling
    assert (sampling.token_temp, sampling.top_p, sampling.categorical_temp) == (0.3, 0.9, 0.5)
    assert service.settings.token_temp == 0.3 and service.settings.gate_threshold_db == -50


async def test_legacy_mapping_update_targeted_at_the_service(tiny_model_dir):
    service = HertzDuplexService(model=tiny_model_dir)
    spy = SessionSpy(service)
    update = ServiceUpdateSettingsFrame(settings={"temperature": 0.5}, service=service)
    await run_test(
        Pipeline([service, spy]),
        frames_to_send=caller_frames(0.3) + [update] + caller_frames(0.5),
        start_timeout=30,
    )
    assert spy.sessions[-1].sampling.token_temp == 0.5


async def test_invalid_settings_are_reported_and_not_applied(tiny_model_dir):
    service = HertzDuplexService(model=tiny_model_dir)
    bad = ServiceUpdateSettingsFrame(delta=HertzDuplexSettings(top_p=2.0))
    frames = caller_frames(0.5) + [bad] + caller_frames(1.0)
    down, up = await run_test(service, frames_to_send=frames, start_timeout=30)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "top_p" in errors[0].error
    assert service.settings.top_p is None
    cut = next(i for i, f in enumerate(down) if isinstance(f, SpeechOutputAudioRawFrame))
    assert len(audio_of(down[cut:])) > 10, "the service keeps running after a bad update"


def test_invalid_initial_settings_fail_at_construction(tiny_model_dir):
    with pytest.raises(ValueError, match="token_temp"):
        HertzDuplexService(model=tiny_model_dir, settings=HertzDuplexSettings(token_temp=-1.0))


async def test_prompt_change_restarts_the_conversation(tiny_model_dir, tmp_path):
    import soundfile as sf

    prompt = tmp_path / "prompt.wav"
    sf.write(prompt, speech_like(1.0, SAMPLE_RATE, seed=3), SAMPLE_RATE)
    service = HertzDuplexService(model=tiny_model_dir)
    spy = SessionSpy(service)
    update = ServiceUpdateSettingsFrame(delta=HertzDuplexSettings(prompt=str(prompt)))
    down, up = await run_test(
        Pipeline([service, spy]),
        start_timeout=30,
        frames_to_send=caller_frames(0.5) + [update] + caller_frames(2.0),
    )
    assert len(spy.sessions) == 2 and spy.sessions[0].closed
    assert not [f for f in up if isinstance(f, ErrorFrame)]


async def test_metrics_report_ttfb_and_processing_time_once_a_second(tiny_model_dir):
    """Processing time is aggregated: one mean a second, not one MetricsFrame per model step."""
    service = HertzDuplexService(model=tiny_model_dir)
    down, _ = await run_test(
        service,
        frames_to_send=caller_frames(2.5) + [SleepFrame(0.4)],
        start_timeout=30,
        pipeline_params=PipelineParams(enable_metrics=True, send_initial_empty_metrics=False),
    )
    data = [d for f in down if isinstance(f, MetricsFrame) for d in f.data]
    ttfb = [d.value for d in data if isinstance(d, TTFBMetricsData) and d.processor == service.name]
    processing = [
        d.value
        for d in data
        if isinstance(d, ProcessingMetricsData) and d.processor == service.name
    ]
    # at least one step of input
    assert len(ttfb) == 1 and STEP_SECONDS - 0.03 <= ttfb[0] < 2.0, ttfb
    # 2.5 s of input is 20 steps: one report per 8 steps that answered caller audio (each their
    # mean), not 20 reports.
    timed = service.stats.processing_s
    assert len(timed) >= 8 and len(processing) == len(timed) // 8, (len(timed), processing)
    assert processing[0] == pytest.approx(np.mean(timed[:8]))
    assert all(0 <= p < 2.0 for p in processing)


async def test_ttfb_after_the_user_stops_speaking_ends_when_the_model_speaks(tiny_model_dir):
    # the model echoes: it "answers" when the caller speaks
    engine = identity_engine(tiny_model_dir)
    try:
        service = HertzDuplexService(model=engine)
        quiet = [InputAudioRawFrame(bytes(640), SAMPLE_RATE, 1), SleepFrame(FRAME_S)] * 25
        frames = quiet + [UserStoppedSpeakingFrame()] + quiet + caller_frames(1.0)
        down, _ = await run_test(
            service,
            frames_to_send=frames,
            start_timeout=30,
            pipeline_params=PipelineParams(enable_metrics=True, send_initial_empty_metrics=False),
        )
        ttfb = [
            d.value
            for f in down
            if isinstance(f, MetricsFrame)
            for d in f.data
            if isinstance(d, TTFBMetricsData) and d.processor == service.name
        ]
        # First audio (silence, from the first input step), then the reply: after the 0.5 s pause
        # and the onset of the caller's speech.
        assert len(ttfb) == 2 and ttfb[1] >= 0.5, ttfb
    finally:
        engine.close()


async def test_missing_model_is_reported_and_the_pipeline_still_runs(tmp_path):
    service = HertzDuplexService(model=tmp_path / "no-such-model")
    down, up = await run_test(
        service, frames_to_send=caller_frames(0.2) + [TextFrame("still here")], start_timeout=30
    )
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "no-such-model" in errors[0].error
    assert [f.text for f in down if isinstance(f, TextFrame)] == ["still here"]
    assert not service.is_usable


async def test_bad_caller_audio_is_reported_not_fatal(tiny_model_dir):
    service = HertzDuplexService(model=tiny_model_dir)
    odd = InputAudioRawFrame(b"\x00\x01\x02", SAMPLE_RATE, 1)  # half a sample
    down, up = await run_test(
        service, frames_to_send=caller_frames(0.3) + [odd] + caller_frames(1.0), start_timeout=30
    )
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "even length" in errors[0].error
    assert len(audio_of(down)) > 20


async def test_preload_then_pipelines_share_one_engine_and_batch_their_steps(tiny_model_dir):
    engine = await HertzDuplexService.preload(tiny_model_dir)
    assert engine is load_engine(tiny_model_dir)
    services = [HertzDuplexService(model=tiny_model_dir) for _ in range(2)]
    ticks_before = len(engine.tick_sizes)
    started = time.monotonic()

    # Both callers' audio starts at the same moment, as two calls' packets arriving together; the
    # engine batches sessions whose steps are due within its batch window.
    both_ready = asyncio.Barrier(2)

    async def call(service, seed):
        async def feed(worker):
            await both_ready.wait()
            await feed_realtime(worker, speech_like(1.5, SAMPLE_RATE, seed=seed), SAMPLE_RATE)
            await asyncio.sleep(0.3)

        await run_pipeline([service, Probe()], feed)

    await asyncio.gather(call(services[0], 0), call(services[1], 1))
    assert time.monotonic() - started < 10
    assert all(s._backend is engine for s in services)
    sizes = list(engine.tick_sizes)[ticks_before:]
    assert sizes.count(2) >= len(sizes) // 4, f"steps of the two calls were not batched: {sizes}"


async def test_interleaved_frame_sizes_and_rates_are_accepted(tiny_model_dir):
    service = HertzDuplexService(model=tiny_model_dir, sample_rate=16000)
    audio = speech_like(1.0, 48000)
    frames = []
    i = 0
    for size in [480, 960, 123, 2000, 441] * 12:
        frames += [
            InputAudioRawFrame(to_pcm16(audio[i : i + size]), 48000, 1),
            SleepFrame(size / 48000),
        ]
        i += size
    frames.append(SleepFrame(0.5))  # the last steps come out before the pipeline ends
    down, up = await run_test(service, frames_to_send=frames, start_timeout=30)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert {f.sample_rate for f in audio_of(down)} == {16000}
    assert np.isclose(
        sum(f.num_frames for f in audio_of(down)) / 16000, i / 48000, atol=3 * STEP_SECONDS
    )


@pytest.mark.parametrize("ending", ["end", "cancel"])
async def test_ending_the_pipeline_frees_the_engine_slot(tiny_model_dir, ending):
    engine = identity_engine(tiny_model_dir)
    service = HertzDuplexService(model=engine)
    opened = []

    async def feed(worker):
        await feed_realtime(worker, speech_like(0.5, SAMPLE_RATE), SAMPLE_RATE)
        opened.append(engine.active_sessions)
        if ending == "cancel":
            await worker.cancel()

    try:
        await asyncio.wait_for(run_pipeline([service, Probe()], feed), timeout=20)
        assert opened == [1] and service.session is None
        deadline = time.monotonic() + 2
        while engine.active_sessions and time.monotonic() < deadline:  # noqa: ASYNC110 - the engine has no event
            await asyncio.sleep(0.02)
        assert engine.active_sessions == 0
    finally:
        engine.close()


async def test_caller_audio_sent_while_the_slot_opens_is_heard_from_its_first_sample(
    tiny_model_dir, monkeypatch
):
    """The session is created at once and keeps early audio: the model hears every sample.

    The feed starts at once, as a transport's input does, while the engine's open takes a second
    (``open_late``); the echo model says back what it heard. The same check as the LiveKit
    plugin's (test_livekit_plugin), with the same audio.
    """
    engine = identity_engine(tiny_model_dir)
    open_late(engine, monkeypatch)
    service = HertzDuplexService(
        model=engine,
        settings=HertzDuplexSettings(gate_threshold_db=None),
        sample_rate=SAMPLE_RATE,
        max_output_lead_ms=None,  # play every step: the check is what the model heard
    )
    out = Probe(SpeechOutputAudioRawFrame)
    sent = caller_audio(2.0)
    frame = int(SAMPLE_RATE * FRAME_S)
    sessions = []

    async def feed(worker):
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(sent), frame)):
            await asyncio.sleep(max(0.0, t0 + k * FRAME_S - time.monotonic()))
            pcm = sent[i : i + frame].tobytes()
            await worker.queue_frame(InputAudioRawFrame(pcm, SAMPLE_RATE, 1))
        await asyncio.sleep(0.6)  # the last steps come out
        sessions.append(service.session)

    try:
        await run_pipeline([service, out], feed, feed_at_once=True)
    finally:
        engine.close()
    assert sessions[0] is not None and sessions[0].metrics.dropped_input_steps == 0
    back = np.concatenate([np.frombuffer(f.audio, dtype="<i2") for _, f in out.seen])
    assert_heard_from_the_first_sample(sent, back, min_s=1.75)
