"""Bad clients end only themselves: while two well-behaved sessions run in real time, a fuzzer
sends garbage bytes, wrong sizes, invalid JSON, huge messages, wrong tokens and abrupt disconnects
(mid-step and mid-start). The server stays up, frees every slot and the two sessions never miss a
step.
Also: a client written for the original hertz-dev server works against /audio unchanged."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import random
import time

import aiohttp
import numpy as np
import pytest
import requests
import websockets
from aiohttp import web

from hertz_agents.checkpoint import load_model
from hertz_agents.engine import Engine
from hertz_agents.remote import protocol as p
from hertz_agents.remote.client import ReconnectPolicy, RemoteEngine
from hertz_agents.remote.loadtest import report, run_load
from hertz_agents.server.app import HertzServer, ServerConfig
from hertz_agents.server.guards import PeerLimits
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS

TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
START = p.encode(p.Start())


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    # A 2 s input backlog: a hiccup of this shared CPU must not drop a step, only the fuzzer may.
    eng = Engine(
        load_model(tiny_model_dir, device="cpu"), max_sessions=5, context=256, max_input_backlog=16
    )
    yield eng
    eng.close()


@pytest.fixture
async def server(engine):
    limits = dataclasses.replace(p.Limits(), start_timeout=1.0, idle_timeout=3.0)
    # The fuzzer and the victims share 127.0.0.1: per-address budgets are off here (they are
    # proven in test_server_limits.py); this file is about malformed messages.
    peers = PeerLimits(auth_failures=0, starts_per_second=0, max_pending_per_peer=0)
    srv = HertzServer(engine, ServerConfig(limits=limits, token=TOKEN, peer_limits=peers))
    runner = web.AppRunner(srv.make_app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    srv.port = runner.addresses[0][1]  # type: ignore[attr-defined]
    yield srv
    await srv.drain(0)
    await runner.cleanup()


# -- a raw client: every byte under the test's control ---------------------------------------------
async def raw_connect(port: int, path: str = p.SESSION_PATH, token: str | None = TOKEN):
    """TCP + a hand-written WebSocket upgrade. Returns (reader, writer, HTTP status)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer, int(head.split()[1])


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    size = (
        bytes([0x80 | n])
        if n < 126
        else (
            bytes([0x80 | 126]) + n.to_bytes(2, "big")
            if n < 65536
            else bytes([0x80 | 127]) + n.to_bytes(8, "big")
        )
    )
    mask = os.urandom(4)
    key = np.resize(np.frombuffer(mask, np.uint8), n)
    return bytes([first]) + size + mask + (np.frombuffer(payload, np.uint8) ^ key).tobytes()


async def read_until_close(
    reader: asyncio.StreamReader, timeout: float = 10
) -> tuple[int | None, list[dict]]:
    """Server frames until its close frame: (close code, the JSON messages seen)."""
    messages: list[dict] = []
    try:
        while True:
            b0, b1 = await asyncio.wait_for(reader.readexactly(2), timeout)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await reader.readexactly(8), "big")
            payload = await reader.readexactly(n)
            opcode = b0 & 0x0F
            if opcode == 1:
                messages.append(json.loads(payload))
            elif opcode == 8:
                return (int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None), messages
    except (asyncio.IncompleteReadError, ConnectionError):
        return None, messages


async def expect_refusal(
    port: int, frames: list[bytes], code: str | None, close: int | tuple | None
) -> None:
    reader, writer, status = await raw_connect(port)
    assert status == 101
    try:
        for f in frames:
            writer.write(f)
        await writer.drain()
    except ConnectionError:  # the server already hung up on us: that is a refusal too
        pass
    got_close, messages = await read_until_close(reader)
    writer.close()
    errors = [m for m in messages if m["type"] == "error"]
    if code is not None:
        assert errors and errors[-1]["code"] == code and errors[-1]["message"], messages
    if close is not None:
        assert got_close in (close if isinstance(close, tuple) else (close,)), (got_close, messages)


def _start_with_prompt(audio: bytes) -> bytes:
    prompt = {"audio_base64": base64.b64encode(audio).decode()}
    return json.dumps({"type": "start", "version": 1, "prompt": prompt}).encode()


def _wav_bytes() -> bytes:
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _step_pcm(n: int = 1) -> bytes:
    return (np.zeros(n * SAMPLES_PER_STEP, np.int16) + 300).tobytes()


async def test_bad_inputs_end_only_their_own_session(server, engine):
    port = server.port
    remote = await RemoteEngine.connect(
        f"hertz://127.0.0.1:{port}?token={TOKEN}", reconnect=ReconnectPolicy(attempts=0)
    )
    victims = asyncio.create_task(run_load(remote, sessions=2, seconds=14, seed=11))
    await asyncio.sleep(0.5)

    text, binary = 0x1, 0x2
    cases = [
        ([frame(binary, os.urandom(64))], "bad_request", 1008),  # garbage bytes instead of a start
        ([frame(text, b"{not json")], "bad_request", 1008),
        ([frame(text, b'{"type": "launch"}')], "bad_request", 1008),
        ([frame(text, b'{"type": "start", "version": 0}')], "unsupported_version", 1008),
        (
            [frame(text, b'{"type": "start", "version": 1, "sampling": {"token_temp": -3}}')],
            "bad_request",
            1008,
        ),
        (
            [frame(text, b'{"type": "start", "version": 1, "prompt": {"name": "nobody"}}')],
            "unknown_prompt",
            1008,
        ),
        (
            [frame(text, _start_with_prompt(os.urandom(2000)))],
            "bad_prompt",
            1008,
        ),  # not an audio file
        (
            [frame(text, _start_with_prompt(_wav_bytes()[:60]))],
            "bad_prompt",
            1008,
        ),  # a truncated WAV
        ([frame(text, b"\xff\xfe invalid utf-8")], None, 1007),
        (
            [frame(text, b"x" * (3 * 1024 * 1024))],
            None,
            (1009, None),
        ),  # too big: closed (maybe reset mid-send)
        (
            [frame(text, START.encode()), frame(binary, b"\0" * 3)],
            "bad_audio",
            1007,
        ),  # odd byte count
        (
            [frame(text, START.encode()), frame(binary, _step_pcm(9))],
            "bad_audio",
            1007,
        ),  # over the frame limit
        ([frame(text, START.encode()), frame(binary, b"")], "bad_audio", 1007),
        ([frame(text, START.encode()), frame(text, b"[]")], "bad_request", 1008),
        ([frame(text, START.encode()), frame(text, START.encode())], "bad_request", 1008),
        (
            [
                frame(text, START.encode()),
                frame(text, b'{"type": "settings", "sampling": {"min_p": 7}}'),
            ],
            "bad_request",
            1008,
        ),
        (
            [frame(text, START.encode()), frame(text, b" " * (p.Limits().max_control_bytes + 1))],
            "bad_request",
            1008,
        ),
        ([frame(0x3, b"reserved opcode")], None, None),
        ([], "timeout", 1008),  # connected, never started
    ]
    for frames, code, close in cases:
        await expect_refusal(port, frames, code, close)

    # Wrong or missing tokens never reach the WebSocket.
    for token in (None, "wrong-token-0123456789abcdef"):
        _, writer, status = await raw_connect(port, token=token)
        writer.close()
        assert status == 401

    # Abrupt disconnects: mid-step, right after the start (slot being set up), and mid-frame.
    for cut in (
        [frame(text, START.encode()), frame(binary, _step_pcm(1)[:1000])],
        [frame(text, START.encode())],
        [frame(text, START.encode()), frame(binary, _step_pcm(2))[:2500]],
    ):
        _, writer, _ = await raw_connect(port)
        writer.write(b"".join(cut))
        await writer.drain()
        writer.transport.abort()

    # Garbage that is not even HTTP, and random frames from a seeded fuzzer.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(os.urandom(512) + b"\r\n\r\n")
    await writer.drain()
    await reader.read()
    writer.close()
    rng = random.Random(7)
    for _ in range(25):
        frames = [frame(text, START.encode())] if rng.random() < 0.5 else []
        kind = rng.choice(["bytes", "json", "odd"])
        body = (
            os.urandom(rng.randrange(1, 3000))
            if kind == "bytes"
            else json.dumps(
                {"type": rng.choice(["start", "settings", "x"]), "sampling": rng.random()}
            ).encode()
            if kind == "json"
            else b"\1" * (2 * rng.randrange(1, 100) + 1)
        )
        frames.append(frame(rng.choice([text, binary]), body))
        reader, writer, _ = await raw_connect(port)
        writer.write(b"".join(frames))
        await asyncio.sleep(0.05)
        writer.transport.abort()  # whether the server refused it or not, hang up abruptly

    # A client sending far faster than real time is held to real time; it is not disconnected.
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"http://127.0.0.1:{port}{p.SESSION_PATH}", headers=AUTH) as ws:
            await ws.send_str(START)
            started = await ws.receive_json()
            assert started["type"] == "started", (
                started,
                [(c.started, c._end) for c in server.connections],
            )
            for _ in range(40):
                await ws.send_bytes(_step_pcm(8))
            await ws.send_str(p.encode(p.End()))
            async for _msg in ws:
                pass
            assert ws.close_code == p.CLOSE_NORMAL
    assert server.metrics.dropped["rate"] > 0

    result = report(await victims)
    assert result["errors"] == [] and result["missing"] == 0 and result["all_in_order_once"], result
    assert result["sent"] == 2 * int(14 / STEP_SECONDS)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
    for _ in range(100):  # every fuzzed slot is free again
        if engine.active_sessions == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.active_sessions == 0
    ended = server.metrics.ended
    assert ended["bad_audio"] >= 3 and ended["bad_request"] >= 4 and ended["disconnect"] >= 2
    assert server.metrics.auth_failures == 2


async def test_an_original_hertz_dev_client_works_unchanged(server, engine):
    """The original client's calls: websockets to {server}/audio, a POST to /set_temperature."""
    base = f"ws://127.0.0.1:{server.port}/t/{TOKEN}"  # the token rides in the base URL's path
    http_base = base.replace("ws://", "http://")
    response = await asyncio.to_thread(
        requests.post,
        f"{http_base}/set_temperature",
        params={"token_temp": 0.7, "categorical_temp": 0.4, "gaussian_temp": 0.1},
    )
    assert response.status_code == 200 and "0.7" in response.json()["message"]
    assert server.compat.sampling.token_temp == 0.7

    t = np.arange(SAMPLES_PER_STEP * 12) / SAMPLE_RATE
    mic = (0.3 * np.sin(2 * np.pi * 200 * t) * 32767).astype(np.int16).reshape(12, SAMPLES_PER_STEP)
    replies = []
    async with websockets.connect(f"{base}/audio") as ws:
        for block in mic:  # as the original client: one 2000-sample block, then wait for its reply
            sent = time.monotonic()
            await ws.send(
                f"data:audio/raw;base64,{base64.b64encode(block.tobytes()).decode('utf-8')}"
            )
            response = await asyncio.wait_for(ws.recv(), 10)
            audio = np.frombuffer(base64.b64decode(response.split(",")[1]), dtype=np.int16)
            replies.append(audio)
            await asyncio.sleep(max(0.0, STEP_SECONDS - (time.monotonic() - sent)))
        assert engine.active_sessions == 1
    assert len(replies) == 12 and all(r.shape == (SAMPLES_PER_STEP,) for r in replies)
    assert server.metrics.started["compat"] == 1

    # A message that is not whole steps closes that session with a reason.
    async with websockets.connect(f"{base}/audio") as ws:
        await ws.send("data:audio/raw;base64," + base64.b64encode(b"\0" * 1000).decode())
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 1007 and "bad_audio" in closed.value.rcvd.reason

    # Without the token in the path there is no session.
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(f"ws://127.0.0.1:{server.port}/audio")
