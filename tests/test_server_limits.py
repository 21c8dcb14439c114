"""No client can starve the others: four real-time calls beside each attack keep every step.

A real server process (``python -m hertz_agents.server``, the default model on the CPU) serves
four well-behaved real-time sessions (``loadtest.run_load``) from 127.0.0.1. Each test measures
them twice in the same run: alone (the baseline), then beside one attacker running in its own
process at idle priority from another loopback address (127.0.0.2: another peer, as on a network).
Each well-behaved session must get exactly one output step per input step, and its p99 latency
must stay within 50 ms of its own baseline. The attacker is this file run as a script
(``python tests/test_server_limits.py ATTACK PORT TOKEN SECONDS``).

Figures vary on a shared CPU, so a failed comparison is measured up to three times before it
counts; the failure names every try.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import soundfile as sf

from hertz_agents.remote import protocol as p
from hertz_agents.remote.client import ReconnectPolicy, RemoteEngine
from hertz_agents.remote.loadtest import report, run_load
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS

REPO = Path(__file__).resolve().parents[1]
TOKEN = "limits-token-0123456789abcdef"
VICTIMS = 4
PHASE_SECONDS = 6.0
P99_MARGIN_MS = 50.0
MEASUREMENTS = 3  # tries before a failed comparison counts
ATTACKER_ADDRESS = "127.0.0.2"
# HERTZ_LIMITS_ENGINE=inprocess measures the server with its engine in its own process turned off.
ENGINE_FLAGS = (
    ["--no-engine-process"] if os.environ.get("HERTZ_LIMITS_ENGINE") == "inprocess" else []
)


# -- the server, in its own process -----------------------------------------------------
@pytest.fixture(scope="module")
def server():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "hertz_agents.server", "--model", "default", "--device", "cpu",
         "--port", "0", "--token", TOKEN, "--max-sessions", "8", "--max-input-backlog", "16",
         "--inline-prompts", *ENGINE_FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    port = None
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline and port is None:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
    if port is None:
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(lines))
    yield proc, port
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _victims(port: int, seconds: float, seed: int) -> dict:
    remote = await RemoteEngine.connect(
        f"hertz://127.0.0.1:{port}?token={TOKEN}", reconnect=ReconnectPolicy(attempts=0)
    )
    loads = await run_load(remote, sessions=VICTIMS, seconds=seconds, seed=seed)
    per_session = [load.summary() for load in loads]
    return {"total": report(loads), "sessions": per_session}


def _check(baseline: dict, attacked: dict) -> list[str]:
    """What broke for the well-behaved sessions (empty: nothing)."""
    problems = []
    total = attacked["total"]
    if total["errors"] or total["missing"] or not total["all_in_order_once"]:
        problems.append(f"steps lost or sessions ended: {total}")
    for base, under in zip(baseline["sessions"], attacked["sessions"]):
        if under["answered"] != under["sent"] or under["unmatched_outputs"]:
            problems.append(f"not one output per input step: {under}")
        if under["latency_ms_p99"] > base["latency_ms_p99"] + P99_MARGIN_MS:
            problems.append(
                f"p99 {under['latency_ms_p99']:.0f} ms against a baseline of "
                f"{base['latency_ms_p99']:.0f} ms"
            )
    return problems


async def _beside(port: int, attack: str, seed: int) -> tuple[dict, dict, str]:
    """Baseline, then the same four sessions beside the attacker; (baseline, attacked, its log)."""
    # The attacker (idle priority) imports while the baseline runs, and attacks when told to: on a
    # loaded machine its imports alone take longer than a phase.
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, __file__, attack, str(port), TOKEN, str(PHASE_SECONDS + 1.5),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, preexec_fn=lambda: os.nice(19),
    )  # fmt: skip
    baseline = await _victims(port, PHASE_SECONDS, seed)
    try:
        ready = await asyncio.wait_for(attacker.stdout.readline(), 120)
    except asyncio.TimeoutError:
        ready = b""
    assert ready.strip() == b"ready", f"the attacker did not start: {ready!r}"
    attacker.stdin.write(b"go\n")
    await attacker.stdin.drain()
    assert (await asyncio.wait_for(attacker.stdout.readline(), 30)).strip() == b"attacking"
    await asyncio.sleep(1.0)  # the attack is under way before the measurement starts
    attacked = await _victims(port, PHASE_SECONDS, seed + 100)
    try:
        out, _ = await asyncio.wait_for(attacker.communicate(), 20)
    except asyncio.TimeoutError:
        attacker.kill()
        out, _ = await attacker.communicate()
    return baseline, attacked, out.decode(errors="replace")


async def test_memory_stays_flat_over_20_inline_prompts(server):
    proc, port = server

    def rss_mb() -> float:  # the server's processes: the front end and its engine process
        return sum(_rss_kb(pid) for pid in _process_tree(proc.pid)) / 1024

    async def start_with(prompt: bytes, peer: str) -> dict:
        connector = aiohttp.TCPConnector(local_addr=(peer, 0))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.ws_connect(
                f"http://127.0.0.1:{port}{p.SESSION_PATH}",
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as ws:
                await ws.send_str(p.encode(p.Start(prompt=p.Prompt(audio=prompt))))
                reply = await ws.receive_json(timeout=60)
                await ws.send_str(p.encode(p.End()))
                return reply

    # A 60 s prompt is refused from its header, before anything is decoded.
    refused = await start_with(_flac(60.0, 99), "127.0.0.9")
    assert refused["type"] == "error" and refused["code"] == "bad_prompt"
    assert "60.0 s" in refused["message"], refused
    replies = [await start_with(_flac(3.0, 0), "127.0.0.3")]
    assert replies[0]["type"] == "started", replies
    first = rss_mb()
    for i in range(1, 20):  # five addresses, four prompts each: the per-client budget holds
        replies.append(await start_with(_flac(3.0, i), f"127.0.0.{3 + i // 4}"))
    after = rss_mb()
    started = sum(r["type"] == "started" for r in replies)
    assert started >= 16, replies
    assert after - first < 300, (first, after)


# Attacks that still did not hold, with what was measured (none, since the engine runs in its
# own process: issue #12).
_NOT_YET: dict[str, str] = {}
ATTACKS = [
    pytest.param(a, marks=pytest.mark.xfail(reason=_NOT_YET[a], strict=False))
    if a in _NOT_YET
    else a
    for a in (
        "audio_flood",
        "control_flood",
        "wrong_token_flood",
        "slowloris",
        "slowloris_token",
        "churn",
        "non_reader",
        "idle_then_burst",
        "prompt_flood",
    )
]


@pytest.mark.parametrize("attack", ATTACKS)
async def test_four_calls_keep_every_step_beside(server, attack):
    _, port = server
    # p99 of a 6 s phase (48 steps a session) is nearly its slowest step, so one hiccup of a shared
    # CPU spoils a measurement; a real fault repeats in every attempt.
    spoiled = []
    for attempt in range(MEASUREMENTS):
        baseline, attacked, log = await _beside(port, attack, seed=10 * attempt)
        problems = _check(baseline, attacked)
        if not problems:
            break
        spoiled.append(problems[0][:200])
    alone = baseline["total"]
    if problems and (alone["missing"] or alone["latency_ms_p50"] > STEP_SECONDS * 1000):
        # As the soak does: without an attacker this machine already misses real time, so
        # the comparison says nothing; report the figures as an expected failure.
        pytest.xfail(
            f"this machine cannot step {VICTIMS} sessions in real time even alone "
            f"(baseline: {alone['missing']} steps lost, p50 {alone['latency_ms_p50']:.0f} ms); "
            f"beside {attack}: {problems[0][:200]}"
        )
    assert not problems, (spoiled, alone, log[-3000:])
    summary = json.loads(log.strip().splitlines()[-1])
    # The attacker met the budget meant for it (it was refused, cut or closed), not nothing.
    assert summary["refused"] > 0, summary


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the server's engine process is its child)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            pids += _process_tree(int(child))
    return pids


def _rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


def _flac(seconds: float, seed: int) -> bytes:
    """A quiet, distinct FLAC prompt: a few KB that decode to ``seconds`` of audio."""
    n = int(seconds * SAMPLE_RATE)
    tone = 0.05 * np.sin(2 * np.pi * (100 + seed) * np.arange(n) / SAMPLE_RATE)
    buffer = io.BytesIO()
    sf.write(buffer, tone.astype(np.float32), SAMPLE_RATE, format="FLAC")
    return buffer.getvalue()


# -- the attacker (this file run as a script) -------------------------------------------
class _Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.refused = 0  # HTTP refusals, closes by the server, connections cut


async def _ws(http: aiohttp.ClientSession, port: int, token: str):
    return await http.ws_connect(
        f"http://127.0.0.1:{port}{p.SESSION_PATH}",
        headers={"Authorization": f"Bearer {token}"},
        heartbeat=None,
        timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
    )


async def _started_ws(http, port, token, tally: _Tally, start: str | None = None):
    """A started session, or None when the server refused it (counted)."""
    try:
        ws = await _ws(http, port, token)
    except (aiohttp.ClientError, OSError):
        tally.refused += 1
        await asyncio.sleep(0.05)
        return None
    await ws.send_str(start or p.encode(p.Start()))
    msg = await ws.receive()
    if msg.type != aiohttp.WSMsgType.TEXT or json.loads(msg.data)["type"] != "started":
        tally.refused += 1
        await ws.close()
        return None
    return ws


async def _attack(kind: str, port: int, token: str, seconds: float) -> _Tally:
    tally = _Tally()
    end = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(local_addr=(ATTACKER_ADDRESS, 0), limit=0)
    step = (np.zeros(SAMPLES_PER_STEP, np.int16) + 300).tobytes()
    async with aiohttp.ClientSession(connector=connector) as http:
        if kind in ("audio_flood", "control_flood"):
            payload = b"\0\0" if kind == "audio_flood" else p.encode(p.MetricsRequest())
            while time.monotonic() < end:
                ws = await _started_ws(http, port, token, tally)
                if ws is None:
                    continue
                try:
                    while not ws.closed and time.monotonic() < end:
                        for _ in range(200):
                            if isinstance(payload, bytes):
                                await ws.send_bytes(payload)
                            else:
                                await ws.send_str(payload)
                            tally.sent += 1
                        await asyncio.sleep(0)
                except (ConnectionError, aiohttp.ClientError, RuntimeError):
                    pass
                tally.refused += 1  # the server closed it
                await ws.close()
        elif kind == "wrong_token_flood":
            request = (
                f"GET {p.INFO_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token-0000"
                "00000000000\r\n\r\n"
            ).encode()
            while time.monotonic() < end:
                try:
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", port, local_addr=(ATTACKER_ADDRESS, 0)
                    )
                    writer.write(request * 200)  # pipelined
                    tally.sent += 200
                    data = await asyncio.wait_for(reader.read(), 2)
                    tally.refused += data.count(b"HTTP/1.1 4")
                    writer.close()
                except (ConnectionError, OSError, asyncio.TimeoutError):
                    tally.refused += 1
        elif kind == "slowloris":
            conns = []
            for _ in range(200):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(ATTACKER_ADDRESS, 0)
                )
                writer.write(b"GET /v1/info HTTP/1.1\r\n")
                conns.append((reader, writer))
            while time.monotonic() < end:
                await asyncio.sleep(0.5)
                for _, writer in conns:
                    try:
                        writer.write(b"X-a: b\r\n")
                        tally.sent += 1
                    except (ConnectionError, OSError):
                        pass
            tally.refused = sum(reader.at_eof() for reader, _ in conns)
            for _, writer in conns:
                writer.transport.abort()
        elif kind == "slowloris_token":
            held = []
            while time.monotonic() < end:
                try:
                    held.append(await _ws(http, port, token))  # never sends a start
                    tally.sent += 1
                except (aiohttp.ClientError, OSError):
                    tally.refused += 1
                    await asyncio.sleep(0.01)
            tally.refused += sum(ws.closed for ws in held)
        elif kind == "churn":
            while time.monotonic() < end:
                ws = await _started_ws(http, port, token, tally)
                if ws is not None:
                    await ws.send_bytes(step)
                    tally.sent += 1
                    await ws.close()
        elif kind == "non_reader":
            # Raw socket, a 1 KiB read buffer and no reads: the server's output backs up at once.
            reader, writer = await _raw_session(port, token)
            started = time.monotonic()
            closed_after = None
            while time.monotonic() < end:
                try:
                    writer.write(_frame(0x2, step))
                    await asyncio.wait_for(writer.drain(), 1)
                    tally.sent += 1
                except (ConnectionError, OSError, asyncio.TimeoutError):
                    closed_after = time.monotonic() - started
                    break
                if reader.at_eof() or writer.transport.is_closing():
                    closed_after = time.monotonic() - started
                    break
                await asyncio.sleep(STEP_SECONDS)
            writer.transport.abort()
            tally.refused = int(closed_after is not None)
            print(json.dumps({"closed_after_s": closed_after}))
        elif kind == "idle_then_burst":
            ws = await _started_ws(http, port, token, tally)
            for _ in range(4):
                await ws.send_bytes(step)
            await asyncio.sleep(3.0)  # idle: no credit may build up
            burst = step * 8
            try:
                for _ in range(40):  # 40 s of audio as fast as the message budget allows
                    await ws.send_bytes(burst)
                    tally.sent += 8
                    await asyncio.sleep(0.03)
                await ws.send_str(p.encode(p.MetricsRequest()))
                while True:
                    msg = await ws.receive(timeout=5)
                    if msg.type == aiohttp.WSMsgType.TEXT and '"metrics"' in msg.data:
                        dropped = json.loads(msg.data)["session"]["rate_dropped_steps"]
                        tally.refused = dropped  # steps the budget refused
                        break
            except (ConnectionError, RuntimeError, asyncio.TimeoutError):
                pass
        elif kind == "prompt_flood":
            i = 0
            while time.monotonic() < end:
                i += 1
                start = p.encode(p.Start(prompt=p.Prompt(audio=_flac(25.0, 1000 + i))))
                ws = await _started_ws(http, port, token, tally, start)
                if ws is not None:
                    tally.sent += 1
                    await ws.close()
    return tally


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client WebSocket frame (RFC 6455), all-zero mask."""
    n = len(payload)
    if n < 126:
        size = bytes([0x80 | n])
    elif n < 65536:
        size = bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        size = bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([0x80 | opcode]) + size + b"\0\0\0\0" + payload


async def _raw_session(port: int, token: str):
    """A started session over a raw socket whose reads stop after 1 KiB is buffered."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(ATTACKER_ADDRESS, 0), limit=1024
    )
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {p.SESSION_PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    writer.write(_frame(0x1, p.encode(p.Start()).encode()))
    await writer.drain()
    return reader, writer


if __name__ == "__main__":
    kind, port, token, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    print("ready", flush=True)
    sys.stdin.readline()  # "go": the test's baseline is measured
    print("attacking", flush=True)
    result = asyncio.run(_attack(kind, port, token, seconds))
    print(json.dumps({"attack": kind, "sent": result.sent, "refused": result.refused}))
