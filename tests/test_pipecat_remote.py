"""The same HertzDuplexService on a remote engine: model="hertz://host:port".

The engine is served by the project's inference server (hertz_agents.server) on loopback, in
this process."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip(
    "pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`"
)
pytest.importorskip(
    "aiohttp", reason="the inference server needs `pip install 'hertz-agents[server]'`"
)

from aiohttp import web  # noqa: E402
from pipecat.frames.frames import InputAudioRawFrame, SpeechOutputAudioRawFrame  # noqa: E402
from pipecat.pipeline.worker import PipelineParams  # noqa: E402
from pipecat_hertz import HertzDuplexService, HertzDuplexSettings  # noqa: E402
from test_pipecat_support import Probe, feed_realtime, identity_engine, run_pipeline, speech_like  # noqa: E402

from hertz_agents.server.app import HertzServer, ServerConfig  # noqa: E402
from hertz_agents.timing import SAMPLE_RATE, STEP_SECONDS  # noqa: E402

TOKEN = "pipecat-test-token-0123456789"


async def test_the_service_talks_to_a_remote_engine(tiny_model_dir):
    """The echo model behind the server: what comes back through the network is what was sent."""
    engine = identity_engine(tiny_model_dir)
    # This checks the transport, not the real-time policy (test_engine.py does): a CI hiccup of
    # a quarter second would otherwise have the engine step the call on silence, by design, and
    # the echo would come back with that silence in it (seen once in a full CI run).
    engine.stall_timeout = 2.0
    runner = web.AppRunner(
        HertzServer(engine, ServerConfig(token=TOKEN)).make_app(),
        access_log=None,
        shutdown_timeout=0.5,
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"hertz://127.0.0.1:{runner.addresses[0][1]}?token={TOKEN}"
    service = HertzDuplexService(model=url, settings=HertzDuplexSettings(gate_threshold_db=None))
    into, out = Probe(InputAudioRawFrame), Probe(SpeechOutputAudioRawFrame)
    audio = speech_like(2.0, SAMPLE_RATE, seed=9)

    async def feed(worker):
        await feed_realtime(worker, audio, SAMPLE_RATE)
        await asyncio.sleep(0.4)

    try:
        await run_pipeline(
            [into, service, out], feed, params=PipelineParams(audio_out_sample_rate=SAMPLE_RATE)
        )
    finally:
        await runner.cleanup()
        engine.close()
    assert engine.ticks >= int(2.0 / STEP_SECONDS) - 1, "the remote engine did not step"
    back = np.concatenate([np.frombuffer(f.audio, dtype="<i2") for _, f in out.seen])
    sent = np.concatenate([np.frombuffer(f.audio, dtype="<i2") for _, f in into.seen])
    # The echo comes back whole, behind any silence steps the engine inserted before it started.
    start = int(np.argmax(back != 0))
    n = min(len(sent), len(back) - start) - 4000
    assert n > SAMPLE_RATE, "too little audio came back"
    first = int(np.argmax(sent != 0))
    got, want = back[start : start + n - first], sent[first:n]
    differs = np.flatnonzero(got != want)
    assert differs.size == 0, (
        f"the echo differs in {differs.size} samples, from sample {differs[0]} of {len(got)}"
    )
