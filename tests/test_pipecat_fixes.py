"""HertzDuplexService in real-time pipelines: failures end the call or recover, both sides reach a
recorder, settings go in under Pipecat's names, the idle timeout and interruptions behave.

Each test here failed before the fix it covers. The model is the tiny real one; the identity
engine (a fake model that echoes, see test_pipecat_support) appears where the model must talk
exactly when the caller does.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip(
    "pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`"
)

from early_audio import caller_audio, open_late  # noqa: E402
from loguru import logger  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InputAudioRawFrame,
    InterruptionFrame,
    ServiceUpdateSettingsFrame,
    SpeechOutputAudioRawFrame,
    UserSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker, ProcessorUnusablePolicy  # noqa: E402
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor  # noqa: E402
from pipecat.services.settings import LLMSettings  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402
from pipecat_hertz import HertzDuplexService, HertzDuplexSettings  # noqa: E402
from test_pipecat_support import (  # noqa: E402
    FakeSpeaker,
    Probe,
    feed_realtime,
    identity_engine,
    run_pipeline,
    speech_like,
)

from hertz_agents.engine import load_engine  # noqa: E402
from hertz_agents.timing import SAMPLE_RATE, STEP_SECONDS  # noqa: E402

PARAMS = PipelineParams(audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE)


class ErrorLog(list):
    """The ErrorFrames a service reported (through its on_error event)."""

    def __init__(self, service: HertzDuplexService) -> None:
        super().__init__()

        @service.event_handler("on_error")
        async def _on_error(_service, error: ErrorFrame) -> None:
            self.append(error)


class LogCapture(list):
    """(level, message) of every loguru record while active."""

    def __enter__(self) -> LogCapture:
        self._id = logger.add(
            lambda m: self.append((m.record["level"].name, m.record["message"])), level="DEBUG"
        )
        return self

    def __exit__(self, *exc) -> None:
        logger.remove(self._id)


def talk(seconds: float, seed: int = 0, tail_s: float = 0.4):
    """A feed: ``seconds`` of speech-like caller audio in real time, then a short wait."""

    async def feed(worker):
        await feed_realtime(worker, speech_like(seconds, SAMPLE_RATE, seed=seed), SAMPLE_RATE)
        await asyncio.sleep(tail_s)

    return feed


def fail_gate(service: HertzDuplexService, *, calls: set[int] | None) -> list[int]:
    """Make the service's delivery of a model step raise, on the given calls (None: always)."""
    real, count = service._gate.process, []

    def process(*args, **kwargs):
        count.append(1)
        if calls is None or len(count) in calls:
            raise RuntimeError("delivery failed (injected)")
        return real(*args, **kwargs)

    service._gate.process = process  # type: ignore[method-assign]
    return count


# -- failures: recover or end the call, never silence ------------------------------------------
async def test_a_delivery_failure_reopens_the_session_and_the_model_keeps_talking(tiny_model_dir):
    engine = identity_engine(tiny_model_dir)  # steps on time whatever the machine's load
    service = HertzDuplexService(model=engine, settings=HertzDuplexSettings(gate_threshold_db=None))
    errors, out = ErrorLog(service), Probe(SpeechOutputAudioRawFrame)
    fail_gate(service, calls={4})
    sessions = []

    async def feed(worker):
        await feed_realtime(worker, speech_like(0.4, SAMPLE_RATE), SAMPLE_RATE)
        sessions.append(service.session)
        await feed_realtime(worker, speech_like(2.0, SAMPLE_RATE, seed=1), SAMPLE_RATE)
        sessions.append(service.session)
        await asyncio.sleep(0.3)

    try:
        await run_pipeline([service, out], feed, params=PARAMS)
    finally:
        engine.close()
    assert len(errors) == 1 and "reopening" in errors[0].error and service.is_usable
    assert sessions[0] is not sessions[1] and sessions[0].closed, "a new session was opened"
    failed_at = next(t for t, f in out.seen) + 0.5
    after = sum(f.num_frames for t, f in out.seen if t > failed_at) / SAMPLE_RATE
    assert after >= 1.2, f"only {after:.2f} s of model audio after the failure"


async def test_caller_audio_sent_while_the_session_reopens_reaches_the_new_session(
    tiny_model_dir, monkeypatch
):
    """The new session is live at once: audio sent while its slot opens is kept, not lost.

    The reopen after a delivery failure takes a second (``open_late``); before, the caller's
    audio went on into the failed session until the new one was open.
    """
    engine = identity_engine(tiny_model_dir)
    service = HertzDuplexService(
        model=engine,
        settings=HertzDuplexSettings(gate_threshold_db=None),
        max_output_lead_ms=None,
    )
    real, delivered, failed_at = service._gate.process, [], []

    def process(*args, **kwargs):
        delivered.append(1)
        if len(delivered) == 4:  # the fourth step's delivery fails; the reopen is slow
            failed_at.append(time.monotonic())
            open_late(engine, monkeypatch)
            raise RuntimeError("delivery failed (injected)")
        return real(*args, **kwargs)

    service._gate.process = process  # type: ignore[method-assign]
    sent_at: list[float] = []
    sessions = []

    async def feed(worker):
        audio = caller_audio(2.5).astype(np.float32) / 32768
        await feed_realtime(worker, audio, SAMPLE_RATE, on_frame=lambda _, t: sent_at.append(t))
        await asyncio.sleep(0.6)  # the new session catches up with what it kept
        sessions.append(service.session)

    try:
        await run_pipeline([service, Probe()], feed, params=PARAMS)
    finally:
        engine.close()
    new = sessions[0]
    assert failed_at and new is not None and new.metrics.dropped_input_steps == 0
    after_s = sum(t > failed_at[0] for t in sent_at) * 0.02
    heard_s = (new.metrics.steps - new.metrics.silence_steps) * STEP_SECONDS
    assert heard_s >= after_s - 2 * STEP_SECONDS, (
        f"the new session heard {heard_s:.2f} s of the {after_s:.2f} s sent after the failure"
    )


async def test_repeated_delivery_failures_end_the_call_with_a_permanent_error(tiny_model_dir):
    engine = identity_engine(tiny_model_dir)
    service = HertzDuplexService(model=engine, settings=HertzDuplexSettings(gate_threshold_db=None))
    errors = ErrorLog(service)
    fail_gate(service, calls=None)
    worker = PipelineWorker(
        Pipeline([service, Probe()]),
        params=PARAMS,
        processor_unusable_policy=ProcessorUnusablePolicy.CANCEL,
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    caller = asyncio.create_task(talk(20.0)(worker))
    try:
        await asyncio.wait_for(runner.run(), timeout=15)  # the pipeline ends by itself
    finally:
        caller.cancel()
        engine.close()
    assert not caller.done() or caller.cancelled(), "the pipeline outlived the call"
    assert "ending the call" in errors[-1].error and not service.is_usable
    assert service.session is None


# -- both sides recorded ------------------------------------------------------------------------
async def test_audio_buffer_processor_records_both_sides(tiny_model_dir):
    service = HertzDuplexService(
        model=tiny_model_dir, settings=HertzDuplexSettings(gate_threshold_db=None)
    )
    recorder = AudioBufferProcessor(sample_rate=SAMPLE_RATE, num_channels=2)
    tracks = {}

    @recorder.event_handler("on_track_audio_data")
    async def on_tracks(_recorder, user, bot, rate, channels):
        tracks["user"] = np.frombuffer(user, dtype="<i2").astype(np.float32) / 32768
        tracks["bot"] = np.frombuffer(bot, dtype="<i2").astype(np.float32) / 32768

    async def feed(worker):
        await recorder.start_recording()
        await talk(2.0)(worker)

    await run_pipeline([service, recorder, FakeSpeaker()], feed, params=PARAMS)
    level = {name: float(np.sqrt(np.mean(track**2))) for name, track in tracks.items()}
    assert len(tracks["user"]) >= 1.5 * SAMPLE_RATE and len(tracks["bot"]) >= 1.0 * SAMPLE_RATE
    assert level["user"] > 0.02, f"the caller's track is silent ({level})"
    assert level["bot"] > 0.005, f"the model's track is silent ({level})"


# -- metrics and warnings -----------------------------------------------------------------------
async def test_a_stall_is_a_warning_once_and_the_call_gets_a_summary(tiny_model_dir):
    engine = identity_engine(tiny_model_dir)
    service = HertzDuplexService(model=engine)

    async def feed(worker):
        loop = asyncio.get_running_loop()
        loop.call_later(1.0, engine.inject_stall, 0.6)
        await talk(3.0)(worker)

    try:
        with LogCapture() as logs:
            await run_pipeline([service, FakeSpeaker()], feed, params=PARAMS)
    finally:
        engine.close()
    warnings = [m for level, m in logs if level == "WARNING" and "stall" in m]
    assert 1 <= len(warnings) <= 2, warnings  # the gap, and the dropped backlog: once each
    assert service.dropped_steps >= 1 and service.stats.stalls == 1
    summary = [m for level, m in logs if level == "INFO" and "call ended" in m]
    assert len(summary) == 1 and "1 stalls" in summary[0] and "processing median" in summary[0]
    assert not [m for level, m in logs if "processing time" in m], "no per-step metrics lines"


# -- settings -----------------------------------------------------------------------------------
async def test_settings_model_selects_the_model(tiny_model_dir):
    service = HertzDuplexService(settings=HertzDuplexSettings(model=str(tiny_model_dir)))
    out = Probe(SpeechOutputAudioRawFrame)
    await run_pipeline([service, out], talk(0.6), params=PARAMS)
    assert service.settings.model == str(tiny_model_dir) and out.seen
    assert service._backend is load_engine(tiny_model_dir), "the named model is the one that talked"


def test_settings_model_and_model_argument_must_agree(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="disagree"):
        HertzDuplexService(model=tiny_model_dir, settings=HertzDuplexSettings(model=str(tmp_path)))


async def test_pipecat_names_temperature_top_p_seed_reach_the_session(tiny_model_dir):
    settings = HertzDuplexSettings(temperature=0.5, top_p=0.9, seed=1234)
    service = HertzDuplexService(model=tiny_model_dir, settings=settings)
    seen = []

    async def feed(worker):
        await talk(0.3, tail_s=0.0)(worker)
        seen.append(service.session)

    await run_pipeline([service, Probe()], feed, params=PARAMS)
    (session,) = seen
    assert (session.sampling.token_temp, session.sampling.top_p) == (0.5, 0.9)
    # The engine slot's sampling generator.
    assert session._slot.handle.generator.initial_seed() == 1234
    with pytest.raises(ValueError, match="same setting"):
        HertzDuplexSettings(temperature=0.5, token_temp=0.7)


async def test_runtime_model_change_is_refused_and_changes_nothing(tiny_model_dir, tmp_path):
    service = HertzDuplexService(model=tiny_model_dir)
    errors = ErrorLog(service)
    sessions = []

    async def feed(worker):
        await talk(0.3, tail_s=0.0)(worker)
        sessions.append(service.session)
        await worker.queue_frame(
            ServiceUpdateSettingsFrame(delta=HertzDuplexSettings(model=str(tmp_path)))
        )
        await talk(0.5)(worker)
        sessions.append(service.session)

    await run_pipeline([service, Probe()], feed, params=PARAMS)
    assert len(errors) == 1 and "cannot change" in errors[0].error and service.is_usable
    assert service.settings.model == str(tiny_model_dir) and sessions[0] is sessions[1]


async def test_untargeted_updates_are_applied_or_warned_about(tiny_model_dir):
    service = HertzDuplexService(model=tiny_model_dir)
    sessions = []

    async def feed(worker):
        await talk(0.3, tail_s=0.0)(worker)
        await worker.queue_frame(
            ServiceUpdateSettingsFrame(settings={"temperature": 0.4, "voice": "x"})
        )
        await worker.queue_frame(ServiceUpdateSettingsFrame(delta=LLMSettings(temperature=0.1)))
        await talk(0.4)(worker)
        sessions.append(service.session)

    with LogCapture() as logs:
        await run_pipeline([service, Probe()], feed, params=PARAMS)
    assert sessions[0].sampling.token_temp == 0.4, "an untargeted settings dict is applied"
    warnings = [m for level, m in logs if level == "WARNING"]
    assert any("['voice']" in m for m in warnings), warnings
    assert any("LLMSettings" in m for m in warnings), warnings


async def test_a_bad_runtime_prompt_changes_nothing_and_says_so(tiny_model_dir, tmp_path):
    service = HertzDuplexService(model=tiny_model_dir)
    errors, out = ErrorLog(service), Probe(SpeechOutputAudioRawFrame)
    sessions = []
    missing = str(tmp_path / "missing.wav")

    async def feed(worker):
        await talk(0.4, tail_s=0.0)(worker)
        sessions.append(service.session)
        await worker.queue_frame(
            ServiceUpdateSettingsFrame(delta=HertzDuplexSettings(prompt=missing))
        )
        await talk(1.0)(worker)
        sessions.append(service.session)

    await run_pipeline([service, out], feed, params=PARAMS)
    assert (
        len(errors) == 1
        and "prompt not changed" in errors[0].error
        and "missing.wav" in errors[0].error
    )
    assert service.is_usable and service.settings.prompt is None
    assert sessions[0] is sessions[1] and not sessions[0].closed or service.session is None
    assert sum(f.num_frames for _, f in out.seen) / SAMPLE_RATE >= 0.8, "the call went on"


async def test_a_new_prompt_is_used_by_the_new_session(tiny_model_dir, tmp_path, monkeypatch):
    import soundfile as sf

    prompt = tmp_path / "prompt.wav"
    sf.write(prompt, speech_like(1.0, SAMPLE_RATE, seed=3), SAMPLE_RATE)
    engine = load_engine(tiny_model_dir)  # the shared engine the service will use
    opened = []  # (prompt, handle) of every slot the engine gave out: a spy on the real open
    real_open = engine.open

    def spy_open(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        opened.append((kwargs.get("prompt"), handle))
        return handle

    monkeypatch.setattr(engine, "open", spy_open)
    service = HertzDuplexService(model=tiny_model_dir)
    sessions = []

    async def feed(worker):
        await talk(0.4, tail_s=0.0)(worker)
        first = service.session
        await worker.queue_frame(
            ServiceUpdateSettingsFrame(delta=HertzDuplexSettings(prompt=str(prompt)))
        )
        deadline = time.monotonic() + 10  # the prompt's prefill is computed first, on a thread
        while service.session is first and time.monotonic() < deadline:  # noqa: ASYNC110 - no event to wait on
            await feed_realtime(worker, speech_like(0.1, SAMPLE_RATE), SAMPLE_RATE)
        await talk(0.6)(worker)
        sessions.append(service.session)

    await run_pipeline([service, Probe()], feed, params=PARAMS)
    assert [p for p, _ in opened] == [None, str(prompt)], (
        "the new session was opened with the prompt"
    )
    assert sessions[0]._slot.handle is opened[1][1] and opened[1][1].steps >= 1, (
        "and it is the one talking"
    )
    assert service.settings.prompt == str(prompt)


async def test_a_failed_load_stays_failed_after_a_settings_update(tmp_path):
    service = HertzDuplexService(model=tmp_path / "no-such-model")
    errors = ErrorLog(service)

    async def feed(worker):
        await worker.queue_frame(
            ServiceUpdateSettingsFrame(delta=HertzDuplexSettings(temperature=0.5))
        )
        await talk(0.3)(worker)

    await run_pipeline([service, Probe()], feed, params=PARAMS)
    assert len(errors) == 1 and "no-such-model" in errors[0].error
    assert not service.is_usable and service.session is None


# -- idle timeout and interruptions -------------------------------------------------------------
@pytest.mark.parametrize("caller_talks", [True, False])
async def test_the_idle_timeout_waits_while_the_caller_speaks(tiny_model_dir, caller_talks):
    # The gate never opens at 0 dBFS: the model is silent, only the caller may be speaking.
    service = HertzDuplexService(
        model=tiny_model_dir, settings=HertzDuplexSettings(gate_threshold_db=0.0)
    )
    idle = []

    async def feed(worker):
        @worker.event_handler("on_idle_timeout")
        async def _idle(_worker):
            idle.append(time.monotonic())

        audio = speech_like(2.5, SAMPLE_RATE, max_gap_s=0.15)
        start = await feed_realtime(
            worker, audio if caller_talks else np.zeros_like(audio), SAMPLE_RATE
        )
        call.extend([start, time.monotonic()])

    call: list[float] = []
    await run_pipeline([service, FakeSpeaker()], feed, params=PARAMS, idle_timeout_secs=0.8)
    during = [t for t in idle if call[0] + 0.8 < t <= call[1]]  # after the pipeline ends it is idle
    if caller_talks:
        assert not during, "the idle timeout fired while the caller was talking"
    else:
        assert during, "the control: a silent call is idle"


async def test_user_aggregators_around_the_service_do_not_interrupt(tiny_model_dir):
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair

    service = HertzDuplexService(model=tiny_model_dir)
    aggregators = LLMContextAggregatorPair(LLMContext())
    seen = Probe(InterruptionFrame, UserSpeakingFrame)

    async def feed(worker):
        await talk(0.3, tail_s=0.0)(worker)
        await worker.queue_frame(VADUserStartedSpeakingFrame())
        await talk(0.5, tail_s=0.0)(worker)
        await worker.queue_frame(VADUserStoppedSpeakingFrame())
        await asyncio.sleep(0.3)

    await run_pipeline([aggregators.user(), service, seen], feed, params=PARAMS)
    assert not [f for _, f in seen.seen if isinstance(f, InterruptionFrame)]


async def test_an_interruption_on_a_real_output_transport_does_not_cut_the_model(tiny_model_dir):
    """Under Pipecat's output transport (FakeSpeaker plays into a clock), an InterruptionFrame
    mid-call leaves the model's audio playing without a gap."""
    engine = identity_engine(tiny_model_dir)
    service = HertzDuplexService(model=engine, settings=HertzDuplexSettings(gate_threshold_db=None))
    speaker = FakeSpeaker()
    cut = []

    async def feed(worker):
        async def interrupt():
            await asyncio.sleep(1.5)
            cut.append(time.monotonic())
            await worker.queue_frame(InterruptionFrame())

        task = asyncio.create_task(interrupt())
        await talk(3.0, tail_s=0.3)(worker)
        await task

    try:
        await run_pipeline([service, speaker], feed, params=PARAMS)
    finally:
        engine.close()
    starts = np.array([t for t, _ in speaker.played])
    after = [(t, len(s) / SAMPLE_RATE) for t, s in speaker.played if cut[0] <= t <= cut[0] + 1.0]
    played_after = sum(d for _, d in after)
    gaps = np.diff(starts[(starts >= cut[0] - 0.2) & (starts <= cut[0] + 1.0)])
    assert played_after >= 1.0 - 2 * STEP_SECONDS, (
        f"{played_after:.2f} s played in the second after"
    )
    assert gaps.max() < 0.1, f"a {gaps.max() * 1000:.0f} ms gap around the interruption"


async def test_silent_caller_frames_do_not_count_as_speech():
    from pipecat_hertz.turns import caller_speech_level

    quiet = (np.random.default_rng(0).standard_normal(320) * 0.001 * 32768).astype("<i2").tobytes()
    loud = (np.sin(np.arange(320) / 5) * 0.1 * 32768).astype("<i2").tobytes()
    assert not caller_speech_level(bytes(640)) and not caller_speech_level(quiet)
    assert caller_speech_level(loud) and not caller_speech_level(b"")
    assert isinstance(InputAudioRawFrame(loud, SAMPLE_RATE, 1).audio, bytes)
