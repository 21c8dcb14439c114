"""The server and remote sessions on loopback, with the tiny real model: the remote API equals the
local one, tokens, a full server, prompts, health/readiness/metrics, limits, drain and
reconnection."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from hertz_agents.checkpoint import load_model
from hertz_agents.engine import Engine
from hertz_agents.errors import AudioInputError, EngineFull, SessionClosed
from hertz_agents.remote import protocol as p
from hertz_agents.remote.client import (
    AuthenticationFailed,
    ReconnectPolicy,
    RemoteEngine,
    ServerGone,
    ServerUnavailable,
)
from hertz_agents.server.app import HertzServer, ServerConfig
from hertz_agents.server.guards import PeerLimits
from hertz_agents.session import DuplexSession
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS

TOKEN = "test-token-0123456789abcdef"
BOB = "/work/shared/audio/bob_duo.wav"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(
        load_model(tiny_model_dir, device="cpu"), max_sessions=3, context=256, stall_timeout=0.25
    )
    yield eng
    eng.close()


class Served:
    """A server on a free loopback port, in this process (its engine steps on its own thread)."""

    def __init__(self, server: HertzServer) -> None:
        self.server = server
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, port: int = 0) -> Served:
        self.runner = web.AppRunner(self.server.make_app(), access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self, drain: float = 0.0) -> None:
        await self.server.drain(drain)
        assert self.runner is not None
        await self.runner.cleanup()

    def url(self, token: str | None = TOKEN, **query: str) -> str:
        params = {"token": token, **query} if token else query
        q = "&".join(f"{k}={v}" for k, v in params.items())
        return f"hertz://127.0.0.1:{self.port}" + (f"?{q}" if q else "")

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


UNLIMITED_PEERS = PeerLimits(auth_failures=0, starts_per_second=0, max_pending_per_peer=0)


def _config(**changes) -> ServerConfig:
    limits = dataclasses.replace(p.Limits(), **changes.pop("limits", {}))
    # Every client here is 127.0.0.1: the per-address budgets are proven in test_server_limits.py.
    changes.setdefault("peer_limits", UNLIMITED_PEERS)
    return ServerConfig(limits=limits, token=TOKEN, prompts={"bob": BOB}, **changes)


@pytest.fixture
async def served(engine):
    s = await Served(HertzServer(engine, _config())).start()
    yield s
    await s.stop()
    await _slots_free(engine)


async def _slots_free(engine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.active_sessions and time.monotonic() < deadline:  # noqa: ASYNC110 (the engine has no event)
        await asyncio.sleep(0.02)
    assert engine.active_sessions == 0, "a session slot leaked"


def _tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


async def _paced(session: DuplexSession, seconds: float, rate: int = 48000) -> None:
    """Push a tone in 20 ms frames, in real time."""
    frame = rate // 50
    audio = _tone(seconds, rate)
    start = time.monotonic()
    for i, at in enumerate(range(0, len(audio), frame)):
        await session.push_audio(audio[at : at + frame], rate)
        await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - time.monotonic()))


async def test_a_remote_session_has_the_local_api(served, engine):
    session = await DuplexSession.open(served.url(), output_sample_rate=24000, seed=1)
    assert engine.active_sessions == 1
    pushing = asyncio.create_task(_paced(session, 1.5))
    chunks = [await asyncio.wait_for(session.read(), 10) for _ in range(8)]
    assert [c.step for c in chunks] == list(range(8))
    assert all(c.sample_rate == 24000 and c.audio.dtype == np.float32 for c in chunks)
    settings = session.update_sampling(token_temp=0.5, top_p=0.9)
    await pushing
    await asyncio.sleep(0.3)
    (conn,) = [c for c in served.server.connections if c.started]
    assert conn.slot.sampling == settings  # the live settings reached the server's slot
    snap = session.metrics.snapshot()
    assert snap["steps"] >= 8 and snap["latency_ms_median"] > 0
    await session.close()
    await session.close()  # idempotent
    with pytest.raises(SessionClosed):
        await session.push_audio(_tone(0.1, SAMPLE_RATE), SAMPLE_RATE)
    await _slots_free(engine)


async def test_remote_and_local_sessions_are_the_same_model(served, engine):
    """Greedy sampling makes output a function of input alone: remote equals local, step by step."""
    greedy = p.SamplingSettings(token_temp=0, categorical_temp=0, gaussian_temp=0)
    steps = np.stack([_tone(STEP_SECONDS, SAMPLE_RATE)] * 6)

    async def run(backend) -> list[np.ndarray]:
        outputs: list[np.ndarray] = []
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_output(audio, info):
            outputs.append(audio.copy())
            if len(outputs) == len(steps):
                loop.call_soon_threadsafe(done.set)

        handle = await asyncio.to_thread(backend.open, on_output, sampling=greedy, seed=3)
        for step in steps:
            handle.submit(step, time.monotonic())
            await asyncio.sleep(STEP_SECONDS)
        await asyncio.wait_for(done.wait(), 10)
        handle.close()
        return outputs

    local = await run(engine)
    remote = await run(await RemoteEngine.connect(served.url()))
    for a, b in zip(local, remote):
        assert np.abs(a - b).max() <= 1.5 / 32768  # PCM16 on the wire


async def test_tokens_are_required_and_checked(served):
    with pytest.raises(AuthenticationFailed):
        await RemoteEngine.connect(served.url(token="wrong-token-0123456789"))
    with pytest.raises(AuthenticationFailed):
        await RemoteEngine.connect(served.url(token=None))
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
            async with http.get(served.http(p.SESSION_PATH), headers=headers) as r:
                assert r.status == 401
            async with http.get(served.http("/metrics"), headers=headers) as r:
                assert r.status == 401
        async with http.get(served.http("/healthz")) as r:  # probes need no token
            assert r.status == 200
    assert served.server.metrics.auth_failures >= 8


async def test_a_full_server_refuses_with_a_clear_reason(served, engine):
    remote = await RemoteEngine.connect(served.url())
    handles = [
        await asyncio.to_thread(remote.open, lambda a, i: None) for _ in range(engine.max_sessions)
    ]
    async with aiohttp.ClientSession() as http:
        async with http.get(served.http("/readyz")) as r:
            assert r.status == 503 and (await r.json())["status"] == "full"
    with pytest.raises(EngineFull, match=f"all {engine.max_sessions} session slots"):
        await DuplexSession.open(served.url())
    assert served.server.metrics.rejected["server_full"] == 1
    for h in handles:
        h.close()
    await _slots_free(engine)
    async with aiohttp.ClientSession() as http:
        async with http.get(served.http("/readyz")) as r:
            assert r.status == 200


async def test_prompts_by_name_inline_and_unknown(served, engine):
    for prompt in ("bob", np.stack([_tone(0.5, SAMPLE_RATE)] * 2)):
        session = await DuplexSession.open(served.url(), prompt=prompt)
        await session.push_audio(_tone(STEP_SECONDS, SAMPLE_RATE), SAMPLE_RATE)
        assert (await asyncio.wait_for(session.read(), 10)).step == 0
        await session.close()
    with pytest.raises(AudioInputError, match="no prompt named 'nobody'.*bob"):
        await DuplexSession.open(served.url(), prompt="nobody")
    with pytest.raises(AudioInputError, match="prompt"):
        await DuplexSession.open(
            served.url(), prompt=np.zeros(100, np.float32)
        )  # too short to prefill
    await _slots_free(engine)


async def test_health_readiness_info_and_prometheus_metrics(served):
    session = await DuplexSession.open(served.url())
    await _paced(session, 0.5, SAMPLE_RATE)
    await asyncio.wait_for(session.read(), 10)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(served.http("/healthz")) as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with http.get(served.http("/readyz")) as r:
            assert r.status == 200 and (await r.json())["active_sessions"] == 1
        async with http.get(served.http(p.INFO_PATH), headers=headers) as r:
            info = await r.json()
            assert info["protocol"] == p.PROTOCOL_VERSION and info["prompts"] == ["bob"]
            assert info["session_state_bytes"] > 0
        async with http.get(served.http("/metrics"), headers=headers) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
    await session.close()
    for line in (
        'hertz_sessions_active{endpoint="session"} 1',
        "hertz_sessions_max 3",
        'hertz_step_compute_seconds_bucket{le="+Inf"}',
        "hertz_late_steps_total",
        "hertz_real_time_factor",
        "hertz_step_latency_seconds_count",
        "# TYPE hertz_steps_total counter",
    ):
        assert line in text
    assert (
        int(next(x for x in text.splitlines() if x.startswith("hertz_steps_total ")).split()[1])
        >= 1
    )


async def test_when_no_server_answers_the_error_says_so():
    with pytest.raises(ServerUnavailable, match="no hertz server answers at hertz://127.0.0.1:9"):
        await DuplexSession.open("hertz://127.0.0.1:9")


async def test_session_length_and_idle_limits_end_only_that_session(engine):
    s = await Served(
        HertzServer(engine, _config(limits={"max_session_seconds": 1.0, "idle_timeout": 0.6}))
    ).start()
    try:
        closed: list[BaseException] = []
        remote = await RemoteEngine.connect(s.url())
        idle = await asyncio.to_thread(remote.open, lambda a, i: None, on_closed=closed.append)
        busy = await asyncio.to_thread(remote.open, lambda a, i: None, on_closed=closed.append)
        for _ in range(16):  # 2 s: the idle one is cut at 0.6 s, the busy one at its 1 s limit
            if busy.closed:
                break
            busy.submit(_tone(STEP_SECONDS, SAMPLE_RATE), time.monotonic())
            await asyncio.sleep(STEP_SECONDS)
        assert idle.closed and "timeout" in str(idle.error)
        assert busy.closed and "session_limit" in str(busy.error)
        with pytest.raises(SessionClosed, match="session_limit"):
            busy.submit(_tone(STEP_SECONDS, SAMPLE_RATE))
        assert len(closed) == 2
        assert (
            s.server.metrics.ended["timeout"] == 1 and s.server.metrics.ended["session_limit"] == 1
        )
    finally:
        await s.stop()
    await _slots_free(engine)


async def test_drain_finishes_open_sessions_and_refuses_new_ones(engine):
    s = await Served(HertzServer(engine, _config())).start()
    session = await DuplexSession.open(s.url(reconnect="0"))
    drain = asyncio.create_task(s.server.drain(timeout=10))
    await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as http:
        async with http.get(s.http("/readyz")) as r:
            assert r.status == 503 and (await r.json())["status"] == "draining"
    with pytest.raises(ServerUnavailable, match="shutting down"):
        await DuplexSession.open(s.url())
    await _paced(session, 0.5, SAMPLE_RATE)  # the open session still works while draining
    assert (await asyncio.wait_for(session.read(), 10)).step == 0
    assert not drain.done()
    await session.close()
    await asyncio.wait_for(drain, 5)  # it returns as soon as the last session ends
    await s.runner.cleanup()
    await _slots_free(engine)


async def test_a_session_reconnects_when_its_server_restarts(engine):
    s = await Served(HertzServer(engine, _config())).start()
    port = s.port
    closed: list[BaseException] = []
    remote = await RemoteEngine.connect(
        s.url(), reconnect=ReconnectPolicy(attempts=8, initial_delay=0.1)
    )
    outputs: list[int] = []
    handle = await asyncio.to_thread(
        remote.open, lambda a, info: outputs.append(info.step), on_closed=closed.append
    )
    await s.stop(drain=0)  # ends the session with 1001 "going away"
    s2 = await Served(HertzServer(engine, _config())).start(port)
    try:
        for _ in range(40):
            handle.submit(_tone(STEP_SECONDS, SAMPLE_RATE), time.monotonic())
            await asyncio.sleep(STEP_SECONDS / 2)
            if handle.reconnects and len(outputs) >= 4:
                break
        assert handle.reconnects == 1 and not closed and len(outputs) >= 4
    finally:
        handle.close()
        await s2.stop()
    await _slots_free(engine)


async def test_when_the_server_is_gone_for_good_the_session_says_so(engine):
    s = await Served(HertzServer(engine, _config())).start()
    closed: list[BaseException] = []
    remote = await RemoteEngine.connect(
        s.url(), reconnect=ReconnectPolicy(attempts=2, initial_delay=0.05)
    )
    handle = await asyncio.to_thread(remote.open, lambda a, i: None, on_closed=closed.append)
    await s.stop(drain=0)
    for _ in range(50):
        if closed:
            break
        await asyncio.sleep(0.05)
    assert len(closed) == 1 and isinstance(closed[0], ServerGone)
    with pytest.raises(ServerGone, match="could not reconnect.*hertz-agents serve"):
        handle.submit(np.zeros(SAMPLES_PER_STEP, np.float32))
    await _slots_free(engine)


async def test_load_engine_takes_a_hertz_url_and_every_model_value_resolves_in_one_place(
    served, engine, tiny_model_dir
):
    """README's `load_engine("hertz://...")`: a connected remote backend, same seam as local."""
    import hertz_agents
    from hertz_agents.backend import Backend
    from hertz_agents.engine import load_engine as load_local
    from hertz_agents.remote import RemoteEngine

    remote = await asyncio.to_thread(hertz_agents.load_engine, served.url())
    assert isinstance(remote, RemoteEngine) and isinstance(remote, Backend)
    assert remote.max_sessions == engine.max_sessions and 0.0 <= remote.occupancy <= 1.0
    session = DuplexSession(remote, seed=2)  # created at once; the slot opens on the server
    session.push_audio_nowait(_tone(0.5, SAMPLE_RATE), SAMPLE_RATE)
    await session.wait_open()
    chunks = [await asyncio.wait_for(session.read(), 30) for _ in range(4)]
    await session.close()
    assert [c.input_seq for c in chunks] == [0, 1, 2, 3]
    assert hertz_agents.load_engine(engine) is engine  # a backend is used as it is
    with pytest.raises(ValueError, match="hertz_agents.load_engine"):
        load_local(served.url())  # local weights only, and it says where URLs go
    with pytest.raises(TypeError, match="hertz://HOST:PORT"):
        hertz_agents.load_engine(42)  # type: ignore[arg-type]
