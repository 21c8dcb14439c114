"""The speech gate and the output pacer, alone and under Pipecat's own bot-speaking detection."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip(
    "pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`"
)

from pipecat.frames.frames import (  # noqa: E402
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InputAudioRawFrame,
    SpeechOutputAudioRawFrame,
)
from pipecat.pipeline.worker import PipelineParams  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402
from pipecat_hertz import HertzDuplexService, HertzDuplexSettings, OutputPacer, SpeechGate  # noqa: E402
from pipecat_hertz.gate import AUTO_MARGIN_DB, DEFAULT_THRESHOLD_DB, MIN_THRESHOLD_DB, threshold_db  # noqa: E402
from test_pipecat_support import (  # noqa: E402
    FakeSpeaker,
    FrameLog,
    feed_realtime,
    identity_engine,
    run_pipeline,
    speech_like,
    to_pcm16,
)

from hertz_agents.engine import measure_quiet_level  # noqa: E402
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS  # noqa: E402


def step(level_db: float, n: int = SAMPLES_PER_STEP) -> tuple[np.ndarray, float]:
    rms = 10 ** (level_db / 20)
    return np.full(n, rms, dtype=np.float32), rms


def test_gate_passes_speech_unchanged_and_zeroes_near_silence():
    gate = SpeechGate(threshold_db=-45, hangover_steps=0)
    quiet, quiet_rms = step(-60)
    assert not gate.process(quiet, quiet_rms, SAMPLE_RATE).any() and not gate.is_open
    loud, loud_rms = step(-20)
    opened = gate.process(loud, loud_rms, SAMPLE_RATE)
    assert gate.is_open and opened[0] == 0.0 and opened[-1] == loud[-1], "fades in, then passes"
    assert np.array_equal(gate.process(loud, loud_rms, SAMPLE_RATE), loud)
    closing = gate.process(quiet, quiet_rms, SAMPLE_RATE)
    assert not gate.is_open and closing[0] == quiet[0] and not closing[100:].any(), (
        "fades out, then zeros"
    )


def test_gate_hysteresis_and_hangover_keep_soft_word_endings():
    gate = SpeechGate(threshold_db=-45, hysteresis_db=6, hangover_steps=1)
    gate.process(*step(-20), SAMPLE_RATE)
    gate.process(*step(-49), SAMPLE_RATE)  # below the threshold, within the hysteresis: stays open
    assert gate.is_open
    gate.process(*step(-70), SAMPLE_RATE)  # first quiet step: the hangover keeps it open
    assert gate.is_open
    gate.process(*step(-70), SAMPLE_RATE)
    assert not gate.is_open
    gate.process(*step(-49), SAMPLE_RATE)  # a closed gate needs the full threshold to open
    assert not gate.is_open


def test_gate_disabled_passes_everything():
    gate = SpeechGate(threshold_db=None)
    quiet, quiet_rms = step(-90)
    assert np.array_equal(gate.process(quiet, quiet_rms, SAMPLE_RATE), quiet)


def test_pacer_admits_jittery_steps_and_early_pairs():
    pacer = OutputPacer(max_lead=0.1, patience=3)
    # up to 60 ms off, one pair
    jitter = [
        0.0,
        0.06,
        -0.06,
        0.03,
        -0.05,
        0.0,
        0.0,
        -0.124,
        0.0,
        0.0,
    ]
    assert [pacer.admit(STEP_SECONDS, k * STEP_SECONDS + j) for k, j in enumerate(jitter)] == [
        0.0
    ] * 10
    assert pacer.dropped_steps == 0


def test_pacer_drops_a_stall_backlog_until_the_queue_is_short_again():
    pacer = OutputPacer(max_lead=0.1, patience=3)
    for k in range(4):
        assert pacer.admit(STEP_SECONDS, k * STEP_SECONDS) == 0.0
    burst_at = 4 * STEP_SECONDS + 0.5  # a 500 ms stall, then four steps at once, then regular steps
    arrivals = [burst_at + 0.001 * i for i in range(4)] + [
        burst_at + k * STEP_SECONDS for k in range(1, 6)
    ]
    played = [pacer.admit(STEP_SECONDS, t) is not None for t in arrivals]
    assert played == [True, True, True, False, False, False, True, True, True]
    assert pacer.lead(arrivals[-1]) <= STEP_SECONDS, "back to one step queued: no lasting latency"


def test_pacer_removes_a_lasting_lead_in_silence_only():
    pacer = OutputPacer(max_lead=0.1, patience=3, slack=0.02, window=8)
    # Two steps arrive 45 ms apart, then every 125 ms: 80 ms stay queued at every later arrival.
    arrivals = [0.0] + [0.045 + k * STEP_SECONDS for k in range(12)]
    assert [pacer.admit(STEP_SECONDS, t) for t in arrivals] == [0.0] * 13, "speech is never cut"
    at = arrivals[-1] + STEP_SECONDS
    assert pacer.lead(at) == pytest.approx(0.08)
    assert pacer.admit(STEP_SECONDS, at, silent_end=0.03) == pytest.approx(0.03), (
        "no more than its silence"
    )
    at += STEP_SECONDS
    assert pacer.lead(at) == pytest.approx(0.05)
    for k in range(8):  # a second of speech, then a pause
        assert pacer.admit(STEP_SECONDS, at + k * STEP_SECONDS) == 0.0
    at += 8 * STEP_SECONDS
    cut = pacer.admit(STEP_SECONDS, at, silent_end=STEP_SECONDS)
    assert cut == pytest.approx(0.05 - 0.02), "a pause loses the excess over the slack"
    assert pacer.lead(at + STEP_SECONDS) == pytest.approx(0.02)
    assert pacer.dropped_steps == 0 and pacer.trimmed_s == pytest.approx(0.06)  # 30 + 30 ms


async def speaking_events(tiny_model_dir, gate_db: float | None) -> tuple[int, int]:
    """Bursts of speech separated by faint noise (-60 dBFS), echoed by the identity model into a
    fake speaker; counts the bot-started/stopped events Pipecat's output transport sends while
    the caller's audio is playing."""
    engine = identity_engine(tiny_model_dir)
    rng = np.random.default_rng(0)
    t = np.arange(int(0.6 * SAMPLE_RATE)) / SAMPLE_RATE
    burst = 0.1 * np.sin(2 * np.pi * 180 * t)
    gap = 0.001 * rng.standard_normal(int(1.2 * SAMPLE_RATE))
    audio = np.concatenate([gap[:4000], burst, gap, burst, gap, burst, gap]).astype(np.float32)
    service = HertzDuplexService(
        model=engine, settings=HertzDuplexSettings(gate_threshold_db=gate_db)
    )
    speaker = FakeSpeaker()
    log = FrameLog(speaker, BotStartedSpeakingFrame, BotStoppedSpeakingFrame)
    ended = {}

    async def feed(worker):
        await feed_realtime(worker, audio, SAMPLE_RATE)
        ended["at"] = asyncio.get_running_loop().time()

    try:
        await run_pipeline(
            [service, speaker],
            feed,
            observers=[log],
            params=PipelineParams(audio_out_sample_rate=SAMPLE_RATE),
        )
    finally:
        engine.close()
    during = [f for t, f in log.frames if t <= ended["at"]]
    return (
        sum(isinstance(f, BotStartedSpeakingFrame) for f in during),
        sum(isinstance(f, BotStoppedSpeakingFrame) for f in during),
    )


@pytest.mark.integration  # a real-time Pipecat pipeline on an engine
async def test_gated_model_starts_and_stops_speaking_with_its_bursts(tiny_model_dir):
    started, stopped = await speaking_events(tiny_model_dir, gate_db=-45)
    assert (started, stopped) == (3, 3)


@pytest.mark.integration  # a real-time Pipecat pipeline on an engine
async def test_ungated_faint_noise_counts_as_speech_forever(tiny_model_dir):
    """The control for the test above: without the gate the bot never stops speaking."""
    started, stopped = await speaking_events(tiny_model_dir, gate_db=None)
    assert (started, stopped) == (1, 0)


def test_threshold_settings():
    assert threshold_db(-40.0, 0.5) == -40.0 and threshold_db(None, 0.5) is None
    assert threshold_db("auto", None) == DEFAULT_THRESHOLD_DB, (
        "unknown quiet level (a remote engine)"
    )
    assert threshold_db("auto", 0.0) == MIN_THRESHOLD_DB, "a model that is silent when quiet"
    assert threshold_db("auto", 0.01) == pytest.approx(-40.0 + AUTO_MARGIN_DB)


@pytest.mark.integration  # a real-time Pipecat pipeline on an engine
async def test_auto_gate_is_set_from_the_models_quiet_level(tiny_model_dir):
    """The tiny model makes noise at one level whatever it hears: its quiet level. Measured, the
    auto gate calls all of it silence; a gate at -45 dBFS would call it speech."""
    engine = await HertzDuplexService.preload(tiny_model_dir)  # measures the quiet level once
    quiet = measure_quiet_level(engine)
    assert quiet is not None and 0.01 < quiet < 0.5
    service = HertzDuplexService(model=tiny_model_dir)
    audio = speech_like(1.0, SAMPLE_RATE)
    frames = []
    for i in range(0, len(audio), 320):
        frames += [
            InputAudioRawFrame(to_pcm16(audio[i : i + 320]), SAMPLE_RATE, 1),
            SleepFrame(0.02),
        ]
    down, _ = await run_test(service, frames_to_send=frames, start_timeout=30)
    speech = [f for f in down if isinstance(f, SpeechOutputAudioRawFrame)]
    assert len(speech) > 20 and not any(any(f.audio) for f in speech)
