"""The server's engine in its own process (``hertz_agents/server/engine_process.py``).

Real parts throughout: the tiny real model loaded in a real spawned engine process, the real
server (its guarded site) on a free loopback port, real WebSocket clients, and ``python -m
hertz_agents.server`` itself for the CLI's start, failure and SIGTERM drain.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from hertz_agents.checkpoint import load_model
from hertz_agents.engine import Engine
from hertz_agents.remote import protocol as p
from hertz_agents.server.app import HertzServer, ServerConfig, start_site
from hertz_agents.server.engine_process import EngineProcess
from hertz_agents.server.engine_wire import EngineSpec
from hertz_agents.server.guards import PeerLimits
from hertz_agents.session import DuplexSession
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

TOKEN = "engine-process-token-0123456789"
BOB = "/work/shared/audio/bob_duo.wav"
REPO = Path(__file__).resolve().parents[1]
ENGINE_OPTIONS = {"max_sessions": 3, "context": 256, "stall_timeout": 0.25}
STEP = (np.zeros(SAMPLES_PER_STEP, np.int16) + 300).tobytes()


def _spec(model_dir) -> EngineSpec:
    return EngineSpec(
        model=str(model_dir), device="cpu", engine_options=ENGINE_OPTIONS, prompts=(BOB,)
    )


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = EngineProcess(_spec(tiny_model_dir))
    yield eng
    eng.close()


def _config() -> ServerConfig:
    return ServerConfig(
        token=TOKEN,
        prompts={"bob": Path(BOB)},
        peer_limits=PeerLimits(auth_failures=0, starts_per_second=0, max_pending_per_peer=0),
    )


async def _serve(engine):
    server = HertzServer(engine, _config())
    runner, port = await start_site(server, "127.0.0.1", 0)
    return server, runner, port


async def _raw_session(http: aiohttp.ClientSession, port: int, **start):
    ws = await http.ws_connect(
        f"http://127.0.0.1:{port}{p.SESSION_PATH}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    await ws.send_str(p.encode(p.Start(**start)))
    return ws, await ws.receive_json(timeout=30)


async def test_a_call_is_served_by_the_engine_process(engine):
    assert engine.pid != os.getpid() and engine.alive
    server, runner, port = await _serve(engine)
    try:
        session = await DuplexSession.open(
            f"hertz://127.0.0.1:{port}?token={TOKEN}", prompt="bob", seed=1
        )
        assert engine.active_sessions == 1
        tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(
            np.float32
        )
        for at in range(0, len(tone), SAMPLE_RATE // 50):  # 1 s in 20 ms frames, real time
            await session.push_audio(tone[at : at + SAMPLE_RATE // 50], SAMPLE_RATE)
            await asyncio.sleep(0.02)
        chunks = [await asyncio.wait_for(session.read(), 10) for _ in range(8)]
        assert [c.step for c in chunks] == list(range(8))
        assert all(c.audio.dtype == np.float32 and np.isfinite(c.audio).all() for c in chunks)
        await session.close()
        await asyncio.sleep(0.6)  # the engine process reports its figures twice a second
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 200 and (await r.json())["status"] == "ready"
            async with http.get(f"http://127.0.0.1:{port}{p.INFO_PATH}") as r:
                info = await r.json()
        ticks = float(re.search(r"^hertz_engine_ticks_total (\S+)$", text, re.M).group(1))
        assert ticks >= 8
        assert info["session_state_bytes"] == engine.bytes_per_session() > 0
        assert engine.active_sessions == 0
    finally:
        await server.drain(0)
        await runner.cleanup()


def test_the_process_gives_the_same_steps_as_an_engine_in_this_process(engine, tiny_model_dir):
    """Same model, seed and input: the transport changes no sample and no sequence number."""
    local = Engine(load_model(tiny_model_dir, device="cpu"), **ENGINE_OPTIONS)
    rng = np.random.default_rng(0)
    steps = [(0.1 * rng.standard_normal(SAMPLES_PER_STEP)).astype(np.float32) for _ in range(5)]
    try:
        results = []
        for backend in (local, engine):
            got: list[tuple[int | None, np.ndarray]] = []
            done = threading.Event()

            def on_output(audio, info, got=got, done=done):
                got.append((info.input_seq, audio))
                if len(got) == len(steps):
                    done.set()

            slot = backend.open(on_output, seed=7, prompt=BOB)
            for i, step in enumerate(steps):  # one at a time: the backlog bound drops none
                slot.submit(step)
                deadline = time.monotonic() + 10
                while len(got) <= i and time.monotonic() < deadline:
                    time.sleep(0.005)
            assert done.wait(10)
            slot.close()
            results.append(got)
    finally:
        local.close()
    (mine, theirs) = results
    assert [s for s, _ in mine] == [s for s, _ in theirs] == list(range(len(steps)))
    for (_, a), (_, b) in zip(mine, theirs):
        np.testing.assert_array_equal(a, b)


def test_a_malformed_frame_does_not_stop_the_engine_process(engine):
    """The engine process logs a frame it cannot read and goes on serving every slot."""
    got = threading.Event()
    slot = engine.open(lambda audio, info: got.set(), seed=1)
    try:
        engine.send(b"S\0\0")  # a submit cut short
        engine.send(b"U" + b"not a pickle")
        slot.submit(np.zeros(SAMPLES_PER_STEP, np.float32))
        assert got.wait(10), "no output after the malformed frames"
        assert engine.alive
    finally:
        slot.close()


async def test_a_dead_engine_process_ends_every_call_with_the_reason(tiny_model_dir):
    engine = EngineProcess(_spec(tiny_model_dir))
    server, runner, port = await _serve(engine)
    try:
        async with aiohttp.ClientSession() as http:
            calls = [await _raw_session(http, port) for _ in range(2)]
            assert [reply["type"] for _, reply in calls] == ["started", "started"]
            for ws, _ in calls:
                await ws.send_bytes(STEP)
                assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY
            killed = time.monotonic()
            os.kill(engine.pid, signal.SIGKILL)
            for ws, _ in calls:  # no dead air: each call is told why, then closed
                msg = await ws.receive(timeout=5)
                while msg.type == aiohttp.WSMsgType.BINARY:
                    msg = await ws.receive(timeout=5)
                error = p.parse_server_message(msg.data)
                assert isinstance(error, p.Error) and error.code == "internal", error
                assert "engine process stopped" in error.message, error.message
                assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
                assert ws.close_code == 1011
            assert time.monotonic() - killed < 5
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503 and (await r.json())["status"] == "engine stopped"
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 503
            ws, reply = await _raw_session(http, port)  # a new call is refused, with the reason
            assert reply["type"] == "error" and "engine process stopped" in reply["message"]
            await ws.close()
        assert server.metrics.ended["engine_stopped"] == 2
    finally:
        await server.drain(0)
        await runner.cleanup()
        engine.close()


def _start_cli(*args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "hertz_agents.server", "--device", "cpu", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )  # fmt: skip


def _gone(pid: int, within: float) -> bool:
    """The process ``pid`` has exited (gone, or a zombie) within ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _children(pid: int) -> list[int]:
    return [
        int(c)
        for t in Path(f"/proc/{pid}/task").iterdir()
        for c in (t / "children").read_text().split()
    ]


async def test_sigterm_drains_the_server_and_stops_its_engine_process(tiny_model_dir):
    proc = _start_cli("--model", str(tiny_model_dir), "--token", TOKEN, "--drain-timeout", "20")
    try:
        lines = []
        port = None
        while port is None:
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, "the server did not start:\n" + "".join(lines)
            lines.append(line)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        children = _children(proc.pid)
        assert children, "the engine runs in a child process"
        async with aiohttp.ClientSession() as http:
            ws, reply = await _raw_session(http, port)
            assert reply["type"] == "started"
            # A service manager signals every process of the group: the engine must wait.
            for pid in [proc.pid, *children]:
                os.kill(pid, signal.SIGTERM)
            await asyncio.sleep(0.5)
            for _ in range(3):  # the open call still works while the server drains
                await ws.send_bytes(STEP)
                assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert (await r.json())["status"] == "draining"
            await ws.send_str(p.encode(p.End()))
            ended = p.parse_server_message((await ws.receive(timeout=10)).data)
            assert isinstance(ended, p.Ended) and ended.reason == "client"
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert "stopped" in proc.stdout.read()
        for pid in children:  # no process left behind
            assert _gone(pid, within=5.0), pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_model_that_cannot_load_is_one_line_and_exit_2(tmp_path):
    proc = _start_cli("--model", str(tmp_path / "no-such-model"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("hertz-agents serve: error:")]
    assert len(errors) == 1 and "no-such-model" in errors[0], out


def test_the_engine_process_is_the_default_and_can_be_turned_off():
    import argparse

    from hertz_agents.server.cli import add_serve_command

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["serve"]).engine_process is True
    assert parser.parse_args(["serve", "--no-engine-process"]).engine_process is False


async def test_no_engine_process_serves_from_the_servers_own_process(tiny_model_dir):
    proc = _start_cli("--model", str(tiny_model_dir), "--token", TOKEN, "--no-engine-process")
    try:
        lines: list[str] = []
        port = None
        while port is None:
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, "the server did not start:\n" + "".join(lines)
            lines.append(line)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        assert _children(proc.pid) == []  # the engine is a thread of the server's process
        async with aiohttp.ClientSession() as http:
            ws, reply = await _raw_session(http, port)
            assert reply["type"] == "started"
            await ws.send_bytes(STEP)
            assert (await ws.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY
            await ws.send_str(p.encode(p.End()))
            await ws.receive(timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_engine_uses_one_core_fewer_than_the_machine_unless_told(monkeypatch, tiny_model_dir):
    import torch

    from hertz_agents.errors import HertzError
    from hertz_agents.server import cli, engine_child

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert cli.engine_threads(None) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert cli.engine_threads(None) == 1  # never zero
    assert cli.engine_threads(2) == 2
    with pytest.raises(HertzError, match="--threads must be at least 1"):
        cli.engine_threads(0)
    # The engine process applies it before it loads the model.
    before = torch.get_num_threads()
    try:
        engine_child._load(EngineSpec(model=str(tiny_model_dir), device="cpu", threads=1)).close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_bad_thread_count_is_one_line_and_exit_2():
    proc = _start_cli("--threads", "0")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert "hertz-agents serve: error: --threads must be at least 1, got 0" in out, out
