"""What the plugin does when a call goes wrong after it opened, and the conventions a LiveKit
plugin keeps (``APIError`` family, ``NOT_GIVEN`` defaults, ``download_files``, ``py.typed``).

A real tiny model on a real engine; the engine is closed mid-call, as a CUDA fault or a restart
would close it, and a real hertz inference server on loopback stands for a ``hertz://`` engine.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "adapters" / "livekit"))

from aiohttp import web  # noqa: E402
from livekit import rtc  # noqa: E402
from livekit.agents import NOT_GIVEN, APIConnectionError, Plugin, llm  # noqa: E402
from livekit.plugins import hertz  # noqa: E402

from hertz_agents.checkpoint import load_model  # noqa: E402
from hertz_agents.engine import Engine, loaded_engines  # noqa: E402
from hertz_agents.errors import ModelNotFound, SessionClosed  # noqa: E402
from hertz_agents.server.app import HertzServer, ServerConfig  # noqa: E402
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS  # noqa: E402

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "adapters" / "livekit" / "livekit" / "plugins"


def _step_frame(value: float = 0.1) -> rtc.AudioFrame:
    pcm = np.full(SAMPLES_PER_STEP, int(value * 32767), dtype=np.int16)
    return rtc.AudioFrame(pcm.tobytes(), SAMPLE_RATE, 1, SAMPLES_PER_STEP)


@pytest.fixture
def own_engine(tiny_model_dir):
    engine = Engine(load_model(tiny_model_dir), max_sessions=2)
    yield engine
    engine.close()


async def _open_and_fail(engine) -> tuple[hertz.DuplexSession, list[llm.RealtimeModelError]]:
    """A call that opened and heard a second of audio, then its engine closed under it."""
    session = hertz.DuplexModel(model=engine).session()
    errors: list[llm.RealtimeModelError] = []
    session.on("error", errors.append)
    assert await session.wait_open()
    frames = []

    async def read() -> None:
        async for f in session.audio_stream:
            frames.append(f)

    reading = asyncio.create_task(read())
    for _ in range(8):
        session.push_audio(_step_frame())
        await asyncio.sleep(STEP_SECONDS)
    engine.close()  # what a CUDA fault or a restarted engine does to the calls on it
    await asyncio.wait_for(reading, timeout=10)  # the output ends instead of hanging
    assert frames, "the call never produced audio before the failure"
    return session, errors


async def test_an_engine_that_dies_mid_call_is_a_fatal_error_not_silence(own_engine):
    session, errors = await _open_and_fail(own_engine)
    assert len(errors) == 1, "the failure was not reported: the caller would hear silence"
    error = errors[0]
    assert not error.recoverable  # AgentSession closes on it, and the example ends the call
    assert isinstance(error.error, APIConnectionError) and not error.error.retryable
    assert isinstance(error.error.__cause__, SessionClosed)
    assert session.failed is error.error
    await session.aclose()


async def test_caller_audio_after_a_failure_is_dropped_without_growing_a_traceback(own_engine):
    session, _ = await _open_and_fail(own_engine)
    core = session.core_session
    assert core is not None and core.closed

    def depth() -> int:
        tb, n = core._error.__traceback__, 0
        while tb is not None:
            tb, n = tb.tb_next, n + 1
        return n

    before = depth()
    for _ in range(1000):
        session.push_audio(_step_frame())
    # every re-raise of the stored error would add frames, each holding a caller frame's PCM
    assert depth() == before
    await session.aclose()


def test_worker_load_counts_accepted_jobs_before_they_take_a_slot(own_engine):
    class Server:  # what AgentServer offers load_fnc: its jobs, the accepted ones included
        active_jobs = [object(), object()]

    busy = sum(e.active_sessions for e in loaded_engines())
    capacity = sum(e.max_sessions for e in loaded_engines())
    engine_load = busy / capacity if capacity else 0.0
    assert hertz.WorkerLoad(max_sessions=4)(Server()) == pytest.approx(max(engine_load, 2 / 4))
    if capacity:
        assert hertz.worker_load(Server()) == pytest.approx(max(2, busy) / capacity)


async def test_worker_load_of_a_hertz_server_is_what_the_server_says(tiny_model_dir):
    engine = Engine(load_model(tiny_model_dir), max_sessions=4)
    runner = web.AppRunner(HertzServer(engine, ServerConfig(token="t" * 24)).make_app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"hertz://127.0.0.1:{runner.addresses[0][1]}?token={'t' * 24}"
    try:
        session = hertz.DuplexModel(model=url).session()
        assert await session.wait_open()
        load = hertz.WorkerLoad(url)
        assert await asyncio.to_thread(load) == pytest.approx(1 / 4)
        await session.aclose()
    finally:
        await runner.cleanup()
        engine.close()
    gone = hertz.WorkerLoad(url)  # a server that does not answer takes no calls
    assert await asyncio.to_thread(gone) == 1.0


def test_options_default_to_not_given_as_in_livekit_plugins():
    for name in ("sampling", "prompt", "seed", "gate", "record_dir"):
        assert inspect.signature(hertz.DuplexModel).parameters[name].default is NOT_GIVEN


def test_download_files_puts_the_named_checkpoint_in_place(monkeypatch, tiny_model_dir):
    plugin = next(p for p in Plugin.registered_plugins if p.package == "livekit.plugins.hertz")
    monkeypatch.setenv("HERTZ_MODEL", str(tiny_model_dir))
    plugin.download_files()  # a folder that is there: nothing to do
    monkeypatch.setenv("HERTZ_MODEL", "hertz://gpu-1:8000")
    plugin.download_files()  # the server holds the weights
    monkeypatch.setenv("HERTZ_MODEL", str(tiny_model_dir / "missing"))
    with pytest.raises(ModelNotFound):
        plugin.download_files()

    # an official model is fetched from the Hub, which cannot be reached here: the download
    # function is replaced by a recorder of what it was asked
    asked = []
    monkeypatch.setattr("hertz_agents.download.download_variant", lambda v, d: asked.append((v, d)))
    monkeypatch.setenv("HERTZ_MODEL", "hertz-dev")
    plugin.download_files()
    assert [(v.name, d.name) for v, d in asked] == [("hertz-dev", "hertz-dev")]


def test_the_plugin_ships_type_information():
    assert (PLUGIN_DIR / "hertz" / "py.typed").is_file()


class _RecordingSource:
    """Stands in for rtc.AudioSource (which needs a room to play out): when each frame came."""

    def __init__(self) -> None:
        self.captured: list[tuple[float, rtc.AudioFrame]] = []

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        self.captured.append((asyncio.get_running_loop().time(), frame))


async def test_output_is_held_for_the_prebuffer_then_handed_over_at_once():
    async def steps(n: int):
        for _ in range(n):
            await asyncio.sleep(STEP_SECONDS / 5)  # faster than real time: the test measures order
            yield _step_frame()

    source = _RecordingSource()
    await hertz.play_stream(steps(6), source, prebuffer=0.3)
    times = [t for t, _ in source.captured]
    assert len(times) == 6
    # nothing before 0.3 s of audio was in hand (3 steps), then those 3 at once
    assert times[2] - times[0] < 0.01 and times[3] - times[2] > 0.01
    assert hertz.DEFAULT_PREBUFFER == 0.3



def test_each_burst_is_held_for_the_prebuffer_and_the_quiet_between_is_not():
    from livekit.plugins.hertz.prebuffer import BurstPrebuffer

    gate_options = hertz.GateOptions(silence_rms=0.01, min_silence_duration=0.25)
    adapters_gate = hertz.DuplexModel(gate=gate_options).audio_gate()
    prebuffer = BurstPrebuffer(hertz.DuplexModel(gate=gate_options).audio_gate(), 0.3)
    levels = [0.0, 0.0] + [0.2] * 6 + [0.0] * 3 + [0.2] + [0.0] * 4  # a long and a short burst
    handed: list[list[int]] = []
    heard: list[bool] = []
    for step, level in enumerate(levels):
        out = prebuffer.push(llm.DuplexAudioFrame(_step_frame(level), start_ms=step * 125))
        handed.append([f.start_ms // 125 for f in out])
        heard += [adapters_gate.update(f.frame) for f in out]  # what the adapter's gate says
    handed.append([f.start_ms // 125 for f in prebuffer.flush()])
    # quiet steps go at once; a burst is held until 0.3 s of it is in hand (3 steps), then goes
    # on at once and its later steps as they come; a burst shorter than that goes when it ends
    assert handed[:8] == [[0], [1], [], [], [2, 3, 4], [5], [6], [7]]
    assert handed[11:14] == [[], [], [11, 12, 13]]
    assert sum(handed, []) == list(range(len(levels)))  # nothing lost, nothing reordered
    # the adapter's gate, fed what was handed on, opens and closes where the copy did
    assert heard == [False] * 2 + [True] * 7 + [False] * 2 + [True] * 2 + [False] * 3
