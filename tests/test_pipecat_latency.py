"""The latency budget of HertzDuplexService, measured in a real-time Pipecat pipeline.

The model here is the identity (a fake, see test_pipecat_support): its output is its input, so
the time from a caller's step to the model's audio for it is exactly what the service and the
engine's scheduling add. The numbers are printed (run with ``-s``) and written in docs/pipecat.md.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip(
    "pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`"
)

from pipecat.frames.frames import InputAudioRawFrame, SpeechOutputAudioRawFrame  # noqa: E402
from pipecat.pipeline.worker import PipelineParams  # noqa: E402
from pipecat_hertz import HertzDuplexService, HertzDuplexSettings  # noqa: E402
from test_pipecat_support import (  # noqa: E402
    FakeSpeaker,
    Probe,
    feed_realtime,
    identity_engine,
    playout_latencies,
    run_pipeline,
    speech_like,
)

from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS  # noqa: E402

TARGET_OVERHEAD_S = 0.010  # the service's budget on top of one step of input
STEP_BYTES = 2 * SAMPLES_PER_STEP


def steps_of(seen, *, at_start: bool = False):
    """(time, bytes) of each whole 16 kHz step in a list of (time, audio frame): the time of the
    frame that completes the step, or with ``at_start`` of the frame that starts it."""
    stream, times = bytearray(), []
    for t, frame in seen:
        times += [t] * len(frame.audio)
        stream += frame.audio
    for k in range(len(stream) // STEP_BYTES):
        at = k * STEP_BYTES if at_start else (k + 1) * STEP_BYTES - 1
        yield times[at], bytes(stream[k * STEP_BYTES : (k + 1) * STEP_BYTES])


async def test_service_adds_under_10_ms_on_top_of_one_step(tiny_model_dir):
    """At 16 kHz in and out: from the caller's frame that completes a step to the first frame of
    the model's audio for that step, the service (and the engine's scheduling) add < 10 ms."""
    engine = identity_engine(tiny_model_dir)
    service = HertzDuplexService(model=engine, settings=HertzDuplexSettings(gate_threshold_db=None))
    into, out = Probe(InputAudioRawFrame), Probe(SpeechOutputAudioRawFrame)

    async def feed(worker):
        await feed_realtime(worker, speech_like(3.0, SAMPLE_RATE, seed=2), SAMPLE_RATE)
        await asyncio.sleep(0.3)

    try:
        await run_pipeline(
            [into, service, out], feed, params=PipelineParams(audio_out_sample_rate=SAMPLE_RATE)
        )
    finally:
        engine.close()
    assert service.dropped_steps == 0
    # The echo is exact, so each output step is found among the input steps by its samples.
    complete = {}  # input step's bytes -> time the frame completing it arrived
    began = {}  # input step's bytes -> time the frame holding its first sample arrived
    for (t_end, step), (t_start, _) in zip(steps_of(into.seen), steps_of(into.seen, at_start=True)):
        if any(step) and step not in complete:
            complete[step], began[step] = t_end, t_start
    first = {step: t for t, step in steps_of(out.seen, at_start=True) if step in complete}
    assert len(first) >= 0.8 * len(complete), "the model's audio is not the echo of the caller's"
    overhead = np.array([first[step] - complete[step] for step in first])
    # A step's first sample waits for the rest of the step, then for the service.
    worst_sample = np.array([first[step] - began[step] for step in first])
    print(
        f"\nservice overhead per step at 16 kHz: median {np.median(overhead) * 1000:.2f} ms, "
        f"p90 {np.percentile(overhead, 90) * 1000:.2f} ms, max {overhead.max() * 1000:.2f} ms; "
        f"worst sample latency {worst_sample.max() * 1000:.1f} ms"
    )
    # p90 too on a quiet machine; CI's CPUs are shared
    assert np.median(overhead) < TARGET_OVERHEAD_S
    assert np.percentile(worst_sample, 90) <= STEP_SECONDS + TARGET_OVERHEAD_S


async def playout_delays(
    tiny_model_dir, *, max_output_lead_ms: float | None
) -> tuple[float, float, HertzDuplexService]:
    """Play an echo call into a fake speaker with a 500 ms stall of one step at 1.8 s; return the
    median playout latency before the stall and 3 s after it, and the service."""
    engine = identity_engine(tiny_model_dir)
    service = HertzDuplexService(model=engine, max_output_lead_ms=max_output_lead_ms)
    speaker = FakeSpeaker()
    # Speech in 1.1 s stretches with 0.5 s pauses (where a remaining lead can be cut).
    pause = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    audio = np.concatenate(
        [part for k in range(4) for part in (speech_like(1.1, SAMPLE_RATE, seed=40 + k), pause)]
    )
    start = {}

    async def feed(worker):
        async def stall():
            await asyncio.sleep(1.8)
            engine.inject_stall(0.5)

        start["t0"] = time.monotonic()
        stall_task = asyncio.create_task(stall())
        await feed_realtime(worker, audio, SAMPLE_RATE)
        await stall_task
        await asyncio.sleep(0.5)

    try:
        await run_pipeline(
            [service, speaker], feed, params=PipelineParams(audio_out_sample_rate=SAMPLE_RATE)
        )
    finally:
        engine.close()
    t0 = start["t0"]
    found = playout_latencies(audio, SAMPLE_RATE, t0, 0.02, speaker.played)
    before = found[(found[:, 0] > t0 + 0.3) & (found[:, 0] < t0 + 1.7), 1]
    after = found[(found[:, 0] > t0 + 5.0) & (found[:, 0] < t0 + 6.3), 1]
    assert len(before) >= 10 and len(after) >= 10, "the echo of the caller's audio was not played"
    return float(np.median(before)), float(np.median(after)), service


async def test_a_500_ms_stall_leaves_no_lasting_latency(tiny_model_dir):
    before, after, service = await playout_delays(tiny_model_dir, max_output_lead_ms=100)
    print(
        f"\nplayout delay before the stall {before * 1000:.0f} ms, after {after * 1000:.0f} ms; "
        f"{service.dropped_steps} steps of the backlog dropped, "
        f"{service.trimmed_seconds * 1000:.0f} ms of silence cut"
    )
    assert after - before <= 0.03  # the stall itself was 0.5 s
    assert service.dropped_steps >= 2


async def test_without_pacing_the_stall_would_stay_in_the_playout_queue(tiny_model_dir):
    """The control for the test above: with the pacer off, the backlog burst is queued and every
    later word is late by about the stall."""
    before, after, service = await playout_delays(tiny_model_dir, max_output_lead_ms=None)
    assert service.dropped_steps == 0 and after - before >= 0.3
