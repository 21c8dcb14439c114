"""Each budget of the server on its own, against a server in this process (the tiny model).

Attackers connect from 127.0.0.2, well-behaved clients from 127.0.0.1: two peer addresses, as on a
network. The four-calls-beside-an-attack measurements are in test_server_limits.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import os
import time

import aiohttp
import numpy as np
import pytest
import soundfile as sf

from hertz_agents.checkpoint import load_model
from hertz_agents.engine import Engine
from hertz_agents.remote import protocol as p
from hertz_agents.remote.transport import ServerAddress
from hertz_agents.server.app import HertzServer, ServerConfig, start_site
from hertz_agents.server.auth import TokenAuth
from hertz_agents.server.compat import parse_temperatures
from hertz_agents.server.guards import PeerGuard, PeerLimits, TokenBucket
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS

TOKEN = "units-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ATTACKER = "127.0.0.2"
STEP = (np.zeros(SAMPLES_PER_STEP, np.int16) + 300).tobytes()


# -- pure units ----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_step_bucket_saves_no_credit_while_idle():
    clock = Clock()
    bucket = TokenBucket(1 / STEP_SECONDS, 8, clock)
    assert sum(bucket.take() for _ in range(20)) == 8  # the burst, then nothing
    clock.now += 12.0  # twelve idle seconds: 96 steps of credit if it banked
    assert sum(bucket.take() for _ in range(100)) == 8
    clock.now += STEP_SECONDS
    assert bucket.take() and not bucket.take()


def test_an_address_that_fails_authentication_is_cut_off_then_forgiven():
    clock = Clock()
    guard = PeerGuard(PeerLimits(auth_failures=3, auth_block_seconds=5.0), clock)
    for _ in range(2):
        guard.auth_failed("10.0.0.1")
    assert not guard.blocked("10.0.0.1")
    guard.auth_failed("10.0.0.1")
    assert guard.blocked("10.0.0.1") and not guard.blocked("10.0.0.2")
    assert not guard.cut_at_accept("10.0.0.1"), "the first answer says why (HTTP 429)"
    guard.told_blocked("10.0.0.1")
    guard.told_blocked("10.0.0.2")  # not blocked: nothing to remember
    assert guard.cut_at_accept("10.0.0.1") and not guard.cut_at_accept("10.0.0.2")
    clock.now += 5.1
    assert not guard.blocked("10.0.0.1") and not guard.cut_at_accept("10.0.0.1")


def test_session_starts_per_address_are_rate_limited():
    clock = Clock()
    guard = PeerGuard(PeerLimits(starts_per_second=2.0, start_burst=4), clock)
    assert [guard.take_start("a") for _ in range(5)] == [True] * 4 + [False]
    assert guard.take_start("b")
    clock.now += 0.5
    assert guard.take_start("a") and not guard.take_start("a")


def test_set_temperature_refuses_inf_and_nan():
    for bad in ("inf", "-inf", "nan", "1e999"):
        with pytest.raises(ValueError, match="finite"):
            parse_temperatures({"token_temp": bad})
    assert parse_temperatures({"token_temp": "0.7"}) == {"token_temp": 0.7}


def test_deeply_nested_json_is_a_clean_bad_request():
    text = '{"type": "settings", "sampling": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(p.ProtocolError) as e:
        p.parse_client_message(text, p.Limits())
    assert e.value.code == p.ErrorCode.BAD_REQUEST and "nested" in str(e.value)


def test_the_token_is_never_printed_by_an_address_or_its_errors():
    secret = "s3cret-token-0123456789"
    address, _ = ServerAddress.parse(f"hertz://gpu-1:8000?token={secret}")
    assert address.token == secret and secret not in repr(address) and secret not in str(address)
    for url in (
        f"http://gpu-1:8000?token={secret}",
        f"hertz://:8000?token={secret}",
        f"hertz://gpu-1:port?token={secret}",
        f"hertz://user:{secret}@:8000",
    ):
        with pytest.raises(ValueError) as e:
            ServerAddress.parse(url)
        assert secret not in str(e.value), e.value


def test_a_whitespace_token_is_refused():
    for token in (" " * 16, "\t" * 20, "abcdefgh ijklmnopq"):
        with pytest.raises(ValueError, match="without spaces"):
            TokenAuth(token)
    TokenAuth("a" * 16)


def test_inline_prompts_are_off_by_default_beyond_loopback():
    import argparse

    from hertz_agents.server.cli import add_serve_command, inline_prompts_allowed

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers(dest="command"))
    parse = lambda *a: parser.parse_args(["serve", *a])  # noqa: E731
    assert inline_prompts_allowed(parse("--host", "127.0.0.1"))
    assert not inline_prompts_allowed(parse("--host", "0.0.0.0"))
    assert inline_prompts_allowed(parse("--host", "0.0.0.0", "--inline-prompts"))
    assert not inline_prompts_allowed(parse("--no-inline-prompts"))


# -- against a server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(
        load_model(tiny_model_dir, device="cpu"), max_sessions=8, context=256, max_input_backlog=16
    )
    yield eng
    eng.close()


async def _serve(engine, **changes):
    limits = dataclasses.replace(p.Limits(), **changes.pop("limits", {}))
    server = HertzServer(engine, ServerConfig(limits=limits, token=TOKEN, **changes))
    runner, port = await start_site(server, "127.0.0.1", 0)
    server.port = port  # type: ignore[attr-defined]
    return server, runner


@pytest.fixture
async def served(engine):
    server, runner = await _serve(
        engine,
        limits={"heartbeat": 0.5},
        peer_limits=PeerLimits(header_timeout=0.5, keepalive_timeout=0.5, auth_block_seconds=2.0),
    )
    yield server
    await server.drain(0)
    await runner.cleanup()
    deadline = time.monotonic() + 5
    while engine.active_sessions and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


def _http(peer: str = "127.0.0.1") -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(peer, 0)))


async def _start(http, port, **kw):
    ws = await http.ws_connect(
        f"http://127.0.0.1:{port}{p.SESSION_PATH}", headers=AUTH, heartbeat=None, **kw
    )
    await ws.send_str(p.encode(p.Start()))
    return ws, await ws.receive_json(timeout=10)


async def _until_error(ws) -> tuple[dict | None, int | None]:
    error = None
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "error":
            error = json.loads(msg.data)
    return error, ws.close_code


async def test_a_control_flood_is_closed_as_rate_limited(served):
    async with _http(ATTACKER) as http:
        ws, started = await _start(http, served.port)
        assert started["type"] == "started"
        try:
            for _ in range(30):
                await ws.send_str(p.encode(p.MetricsRequest()))
        except (ConnectionError, aiohttp.ClientError):  # closed by the server while sending
            pass
        error, code = await _until_error(ws)
    assert error["code"] == "rate_limited" and "control messages" in error["message"], error


async def test_an_audio_flood_is_closed(served):
    async with _http(ATTACKER) as http:
        ws, _ = await _start(http, served.port)  # tiny messages: the second short one ends it
        try:
            await ws.send_bytes(b"\0\0")
            await ws.send_bytes(b"\0\0")
        except (ConnectionError, aiohttp.ClientError):
            pass
        error, code = await _until_error(ws)
        assert error["code"] == "bad_audio" and "only the" in error["message"], error
        ws, _ = await _start(http, served.port)  # big enough, far too many
        try:
            for _ in range(200):
                await ws.send_bytes(STEP[:640])
        except (ConnectionError, aiohttp.ClientError):
            pass
        error, code = await _until_error(ws)
        assert error["code"] == "rate_limited" and "audio messages" in error["message"], error


async def test_audio_after_idle_gets_no_saved_up_credit(served):
    async with _http() as http:
        ws, _ = await _start(http, served.port)
        idle_until = time.monotonic() + 2.0  # idle: 16 steps of credit if it banked
        while time.monotonic() < idle_until:  # receiving answers the server's pings
            with contextlib.suppress(asyncio.TimeoutError):
                await ws.receive(timeout=idle_until - time.monotonic())
        for _ in range(4):
            await ws.send_bytes(STEP * 8)  # 32 steps at once
        await ws.send_str(p.encode(p.MetricsRequest()))
        while True:
            msg = await ws.receive(timeout=10)
            if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "metrics":
                dropped = json.loads(msg.data)["session"]["rate_dropped_steps"]
                break
        await ws.close()
    assert 32 - 8 - 1 <= dropped <= 32 - 8, dropped  # the burst (8) and at most a step more


async def test_wrong_tokens_close_the_connection_and_then_cut_off_the_address(served):
    port = served.port
    request = (
        f"GET {p.INFO_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token-000000000"
        "\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER, 0))
    writer.write(request * 50)  # pipelined: only the first is answered, then the close
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.count(b"HTTP/1.1 401") == 1
    async with _http(ATTACKER) as http:
        for _ in range(4):
            async with http.get(f"http://127.0.0.1:{port}{p.INFO_PATH}") as r:
                assert r.status == 401
        async with http.get(f"http://127.0.0.1:{port}{p.INFO_PATH}", headers=AUTH) as r:
            assert r.status == 429  # cut off, even with the right token
            assert "too many failed authentications" in await r.text()
    # Told once why; from now until the block ends, its connections are cut before a byte is
    # read (a flood would otherwise cost a parse and an answer per attempt).
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER, 0))
    writer.write(request.replace(b"wrong-token-000000000", TOKEN.encode()))
    try:
        data = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        data = b""
    writer.close()
    assert data == b"", data[:200]
    async with _http() as http:  # another address is not affected
        async with http.get(f"http://127.0.0.1:{port}{p.INFO_PATH}", headers=AUTH) as r:
            assert r.status == 200
    await asyncio.sleep(2.1)  # --auth-block-seconds later the address may try again
    async with _http(ATTACKER) as http:
        async with http.get(f"http://127.0.0.1:{port}{p.INFO_PATH}", headers=AUTH) as r:
            assert r.status == 200


async def test_half_sent_and_silent_connections_are_closed(served):
    port = served.port
    conns = []
    for head in (b"", b"GET /v1/info HTTP/1.1\r\nHost: x\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER, 0))
        writer.write(head)
        conns.append((reader, writer))
    t0 = time.monotonic()
    for reader, writer in conns:
        for _ in range(5):  # a header line now and then (slowloris) does not keep it open
            try:
                writer.write(b"X-a: b\r\n")
            except ConnectionError:
                break
            await asyncio.sleep(0.2)
        try:
            data = await asyncio.wait_for(reader.read(), 3)
        except ConnectionError:  # reset by the server: closed too
            data = b""
        assert data == b""
        writer.transport.abort()
    assert time.monotonic() - t0 < 3


async def test_a_heartbeat_timeout_is_its_own_reason(served):
    """A raw client that starts, then never answers the server's pings."""
    port = served.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {p.SESSION_PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    payload = p.encode(p.Start()).encode()
    assert 126 <= len(payload) < 65536
    writer.write(bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") + b"\0" * 4 + payload)
    await writer.drain()
    deadline = time.monotonic() + 5.0  # pings every 0.5 s, none answered
    while not served.metrics.ended and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    writer.transport.abort()
    assert served.metrics.ended["heartbeat_timeout"] == 1, dict(served.metrics.ended)
    assert served.metrics.ended["bad_request"] == 0


def _flac(seconds: float, channels: int = 1, seed: int = 0, loud: float = 0.05) -> bytes:
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tone = loud * np.sin(2 * np.pi * (120 + seed) * t)
    buffer = io.BytesIO()
    sf.write(buffer, np.repeat(tone[:, None], channels, 1), SAMPLE_RATE, format="FLAC")
    return buffer.getvalue()


async def _prompt_start(http, port, audio: bytes) -> dict:
    async with http.ws_connect(f"http://127.0.0.1:{port}{p.SESSION_PATH}", headers=AUTH) as ws:
        await ws.send_str(p.encode(p.Start(prompt=p.Prompt(audio=audio))))
        return await ws.receive_json(timeout=30)


async def test_inline_prompts_are_checked_from_their_header_and_budgeted_per_address(engine):
    server, runner = await _serve(engine, max_inline_prompts_per_peer=2)
    try:
        async with _http(ATTACKER) as http:
            long = _flac(300.0, loud=0.0)  # a few KB of FLAC that would decode to 5 minutes
            assert len(long) < 100_000
            reply = await _prompt_start(http, server.port, long)
            assert reply["code"] == "bad_prompt" and "300.0 s" in reply["message"], reply
            reply = await _prompt_start(http, server.port, _flac(2.0, channels=3))
            assert reply["code"] == "bad_prompt" and "3 channels" in reply["message"], reply
            reply = await _prompt_start(http, server.port, b"this is not a WAV file")
            assert reply["code"] == "bad_prompt", reply
            # the reason, and what to send instead; not the server's in-memory buffer
            assert "WAV or FLAC" in reply["message"] and "BytesIO" not in reply["message"], reply
            for seed in (1, 2):
                assert (await _prompt_start(http, server.port, _flac(1.0, seed=seed)))["type"] == (
                    "started"
                )
            reply = await _prompt_start(http, server.port, _flac(1.0, seed=3))
            assert reply["code"] == "bad_prompt" and "this address" in reply["message"], reply
            reply = await _prompt_start(http, server.port, _flac(1.0, seed=1))  # a known one
            assert reply["type"] == "started", reply
        async with _http() as http:  # another address has its own budget
            assert (await _prompt_start(http, server.port, _flac(1.0, seed=4)))["type"] == (
                "started"
            )
        server.draining = True  # refused before decoding: the file is never read
        async with _http() as http:
            reply = await _prompt_start(http, server.port, b"not audio at all, never decoded")
            assert reply["code"] == "draining", reply
    finally:
        await server.drain(0)
        await runner.cleanup()


async def test_a_client_that_stops_reading_is_closed_within_seconds(served):
    """Raw socket, a 4 KiB receive buffer and no reads: the server's sends block, then it closes."""
    import socket

    reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.port, local_addr=(ATTACKER, 0), limit=1024
    )
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {p.SESSION_PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    payload = p.encode(p.Start()).encode()
    writer.write(bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") + b"\0" * 4 + payload)
    audio = bytes([0x82, 0x80 | 126]) + len(STEP).to_bytes(2, "big") + b"\0" * 4 + STEP
    t0 = time.monotonic()
    while time.monotonic() - t0 < 15 and not served.metrics.ended:
        writer.write(audio)  # real time, never reading
        await asyncio.sleep(STEP_SECONDS)
    closed_after = time.monotonic() - t0
    # The connection itself is cut (a close frame would wait forever behind the unread output):
    # the client's next writes fail.
    cut = False
    t1 = time.monotonic()
    while time.monotonic() - t1 < 3 and not cut:
        try:
            writer.write(audio)
            await asyncio.wait_for(writer.drain(), 0.5)
        except (ConnectionError, OSError):
            cut = True
        except asyncio.TimeoutError:
            pass
        cut = cut or writer.transport.is_closing()
        await asyncio.sleep(STEP_SECONDS)
    writer.transport.abort()
    print(f"closed after {closed_after:.1f} s: {dict(served.metrics.ended)}")
    assert served.metrics.ended["client_too_slow"] == 1, dict(served.metrics.ended)
    assert closed_after < 6.0  # measured 4.4 s; 10.2 s with aiohttp's 64 KiB writer limit
    assert cut, "the server ended the session but left the connection open"
