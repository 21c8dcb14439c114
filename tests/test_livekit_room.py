"""The example worker against a real LiveKit server: real WebRTC, real Opus, real rooms.

``scripts/livekit_dev_stack start`` runs the server on 127.0.0.1 (CI does it in .ci/run). The
worker is ``python examples/livekit_agent.py ... start``; each caller is a participant made with
the ``livekit`` SDK that publishes real speech from ../shared/audio in real time and records the
agent's track. The model is the echo engine behind the project's inference server
(``livekit_room_support``), so what comes back can be matched to what was said: that gives
the mouth-to-ear latency and shows gaps inside speech. Each test prints its figures.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from livekit import rtc
from livekit_room_support import (
    Caller,
    Worker,
    early_ends,
    echo_delay,
    echo_server,
    gaps_in_speech,
    late_starts,
    livekit_server,  # noqa: F401 - a fixture
    room_name,
    speech,
    window_delays,
)

pytestmark = pytest.mark.livekit_server

SAY_S = 6.0
MAX_GAP_S = 0.02


async def _call(
    caller: Caller, seconds: float = SAY_S, chat_at: tuple[float, ...] = ()
) -> np.ndarray:
    """Join, wait for the agent's track, talk, and listen a little longer for the echo."""
    await caller.join()
    await caller.wait_for_agent()
    sent = speech(seconds)
    await caller.say(
        np.concatenate([sent, np.zeros(int(1.5 * 48_000), np.float32)]), chat_at=chat_at
    )
    return sent


async def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


def _report(
    label: str, delays: list[float], gaps: list[float], late: list[float], early: list[float]
) -> tuple[float, float]:
    median, p90 = float(np.median(delays)), float(np.percentile(delays, 90))
    print(
        f"\n{label}: mouth-to-ear median {median * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms "
        f"({len(delays)} windows); longest gap in speech {max(gaps, default=0) * 1000:.0f} ms; "
        f"bursts that began late: {[round(s * 1000) for s in late]} ms, "
        f"that ended early: {[round(s * 1000) for s in early]} ms"
    )
    return median, p90


def _echo_worker(livekit, tmp_path, url: str, agent: str, io: str, *options: str) -> Worker:
    """The example worker on the echo server, registered under ``agent``, in ``io`` mode."""
    return Worker(
        livekit,
        tmp_path / "worker.log",
        *("--model", url, "--agent-name", agent, "--io", io, "--silence-rms", "0.001"),
        *options,
    )


@pytest.mark.parametrize("io", ["agent", "rtc"])
async def test_a_caller_hears_the_agent_and_hanging_up_frees_the_slot(
    livekit_server,  # noqa: F811 - the fixture
    tiny_model_dir,
    tmp_path,
    io,
):
    agent = room_name("hertz")
    async with echo_server(tiny_model_dir) as (url, engine, _):
        worker = _echo_worker(livekit_server, tmp_path, url, agent, io)
        async with worker:
            caller = Caller(livekit_server, room_name("call"), agent_name=agent)
            # chat messages while the model speaks: RoomIO's default text input would interrupt()
            # the agent and mute the burst in progress (a gap the check below would find)
            sent = await _call(caller, chat_at=(2.0, 4.0))
            assert caller.agent_joined_at is not None
            assert engine.active_sessions == 1

            delay, match = echo_delay(caller, sent)
            assert match > 0.6, f"the caller's speech did not come back (match {match:.2f})"
            delays = window_delays(caller, sent)
            assert len(delays) >= 4, "too few seconds of speech were found in what came back"
            gaps = gaps_in_speech(caller, sent, delay)
            # each burst has its own delay: one that began late or ended early is not a hole
            late, early = late_starts(caller, sent, delay), early_ends(caller, sent, delay)
            median, p90 = _report(f"{io} mode", delays, gaps, late, early)
            assert 0.1 < median < 2.0
            assert max(gaps, default=0.0) <= MAX_GAP_S, f"gaps inside speech: {gaps}"

            await caller.hang_up()  # the job ends, the engine slot is free again
            await _wait_until(lambda: engine.active_sessions == 0, 20, "the slot stayed taken")
        assert "Traceback" not in worker.log(), worker.log()[-3000:]


async def test_four_rooms_at_once_share_one_engine(livekit_server, tiny_model_dir, tmp_path):  # noqa: F811
    agent = room_name("hertz")
    # Ticks of 40 ms, as a model on a GPU takes: four callers deliver their steps at independent
    # phases of the 125 ms clock, and calls that become ready while a tick runs share the next
    # one (the engine's policy, docs/engine.md). With the echo's zero compute they would share a
    # tick only when their phases happened to meet, which about one run in three never did.
    async with echo_server(tiny_model_dir, max_sessions=4, compute_s=0.04) as (url, engine, _):
        # job processes (the default with a remote engine): one call's stall cannot starve the rest
        worker = Worker(
            livekit_server,
            tmp_path / "worker.log",
            "--model",
            url,
            "--agent-name",
            agent,
            "--io",
            "rtc",
            "--max-sessions",
            "4",
        )
        async with worker:
            callers = [
                Caller(livekit_server, room_name(f"call{i}"), agent_name=agent) for i in range(4)
            ]
            for caller in callers:  # a second apart: the worker starts a job process for each
                await caller.join()
                await asyncio.sleep(1.0)
            for caller in callers:
                await caller.wait_for_agent()
            assert engine.active_sessions == 4
            engine.tick_sizes.clear()
            talk = speech(8.0)
            sent = [
                talk[i * 48_000 : (i + 4) * 48_000] for i in range(4)
            ]  # four different stretches
            silence = np.zeros(int(1.5 * 48_000), np.float32)
            await asyncio.gather(
                *(c.say(np.concatenate([s, silence])) for c, s in zip(callers, sent))
            )
            found = [len(window_delays(c, s)) for c, s in zip(callers, sent)]
            sizes = list(engine.tick_sizes)
            await asyncio.gather(*(c.hang_up() for c in callers))
            await _wait_until(lambda: engine.active_sessions == 0, 20, "slots stayed taken")
    shared = sum(size > 1 for size in sizes) / len(sizes)
    print(
        f"\nfour rooms: seconds of speech found per caller {found}; ticks {len(sizes)}, "
        f"largest batch {max(sizes)}, {shared:.0%} of ticks stepped several calls"
    )
    # four calls on the one engine at once (asserted above), stepped in shared forwards when their
    # audio is ready together (which calls share a tick depends on when each call's 125 ms of
    # audio arrives: the engine's batching policy, not the worker's)
    assert max(sizes) >= 2, "the calls were never stepped together"
    assert min(found) >= 1, "a caller's speech did not come back"


def _rooms_of(worker: Worker) -> set[str]:
    """Rooms the worker ran a job for, from its JSON log."""
    rooms = set()
    for line in worker.log().splitlines():
        with_room = line.startswith("{") and "room" in line
        if with_room and ("job" in line.lower()):
            record = json.loads(line)
            if record.get("room"):
                rooms.add(record["room"])
    return rooms


async def test_a_full_worker_sends_the_next_room_to_another(
    livekit_server, tiny_model_dir, tmp_path  # noqa: F811 - the fixture
):
    agent = room_name("hertz")
    async with echo_server(tiny_model_dir, max_sessions=4) as (url, engine, _):
        options = (
            "--model",
            url,
            "--agent-name",
            agent,
            "--io",
            "rtc",
            "--executor",
            "thread",
            "--max-sessions",
            "1",
        )
        first = Worker(livekit_server, tmp_path / "first.log", *options)
        second = Worker(livekit_server, tmp_path / "second.log", *options)
        async with first, second:
            one = Caller(livekit_server, room_name("one"), agent_name=agent)
            await one.join()
            await one.wait_for_agent()
            await asyncio.sleep(1.5)  # the busy worker reports its load (every 0.5-2.5 s)
            two = Caller(livekit_server, room_name("two"), agent_name=agent)
            await two.join()
            await two.wait_for_agent()
            assert engine.active_sessions == 2
            rooms = [_rooms_of(first), _rooms_of(second)]
            await one.hang_up()
            await two.hang_up()
            await _wait_until(lambda: engine.active_sessions == 0, 20, "slots stayed taken")
    print(f"\nrooms per worker: {rooms}")
    assert sorted(len(r) for r in rooms) == [1, 1], f"one worker took both calls: {rooms}"


@pytest.mark.parametrize("io", ["agent", "rtc"])
async def test_an_engine_that_fails_mid_call_ends_the_call(
    livekit_server, tiny_model_dir, tmp_path, io  # noqa: F811 - the fixture
):
    agent = room_name("hertz")
    async with echo_server(tiny_model_dir) as (url, engine, _):
        worker = _echo_worker(livekit_server, tmp_path, url, agent, io)
        async with worker:
            caller = Caller(livekit_server, room_name("call"), agent_name=agent)
            await caller.join()
            await caller.wait_for_agent()
            await caller.say(speech(1.0))
            engine.close()  # the GPU server's engine dies (a fault, a restart)
            # the agent ends the call instead of leaving the caller in silence (a phone hangs up)
            await asyncio.wait_for(caller.disconnected.wait(), timeout=30)
            log = worker.log()
    assert "hertz-dev" in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("io", ["agent", "rtc"])
async def test_a_call_whose_model_cannot_start_is_ended_not_left_in_silence(
    livekit_server,  # noqa: F811 - the fixture
    tiny_model_dir,
    tmp_path,
    io,
):
    # the session never opens: here a prompt that is not audio, read when each call starts. The
    # worker registers and takes the call, so the caller would sit in a silent room unless the
    # agent ends it (the plain-rtc mode once never checked that its session had opened)
    prompt = tmp_path / "prompt.wav"
    prompt.write_bytes(b"this is not a WAV file")
    agent = room_name("hertz")
    async with echo_server(tiny_model_dir) as (url, engine, _):
        worker = _echo_worker(livekit_server, tmp_path, url, agent, io, "--prompt", str(prompt))
        async with worker:
            caller = Caller(livekit_server, room_name("call"), agent_name=agent)
            await caller.join()
            await asyncio.wait_for(caller.disconnected.wait(), timeout=60)
            # the agent deleted the room (the plain-rtc agent may do so before the caller sees
            # it join)
            assert caller.disconnect_reason == rtc.DisconnectReason.ROOM_DELETED
            assert engine.active_sessions == 0
            log = worker.log()
    assert "hertz-dev" in log and "bad_prompt" in log and "WAV or FLAC" in log, log[-3000:]
    assert not _tracebacks_but_livekits_publish_race(log), log[-3000:]


def _tracebacks_but_livekits_publish_race(log: str) -> list[str]:
    """Log lines with a traceback, except one LiveKit's SDK logs on its own: a session closed
    while RoomIO was still publishing its track, so the SDK's handlers for the late
    ``local_track_published`` and ``local_track_subscribed`` events look the track up, find it
    gone and raise KeyError (rtc 1.1.21's room.py; its other handlers look up defensively)."""
    return [
        line
        for line in log.splitlines()
        if "Traceback" in line and not _is_livekits_publish_race(line)
    ]


def _is_livekits_publish_race(line: str) -> bool:
    late_event = "local_track_published" in line or "local_track_subscribed" in line
    return late_event and "KeyError" in line and "track_publications[sid]" in line
