"""The phone example (examples/pipecat_phone_bot.py) under Pipecat's development runner, called
by a fake Twilio over a real websocket: the call webhook checks Twilio's signature and hands out a
single-use token, a media stream without one is refused, a call with one talks in real time.

``FakeTwilio`` is a fake of Twilio's media servers (the real ones cannot be reached from a test):
it speaks the Media Streams protocol as documented by Twilio ("connected", "start", 20 ms "media"
messages of 8 kHz mu-law, "stop"), and plays the bot's audio into a real-time clock the way a
phone line does, dropping whatever it has not played yet when the bot sends "clear".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`"
)
websockets = pytest.importorskip(
    "websockets", reason="the Twilio test needs `pip install websockets`"
)

import aiohttp  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, WebSocket  # noqa: E402
from pipecat.frames.frames import InterruptionFrame  # noqa: E402
from pipecat.runner.types import WebSocketRunnerArguments  # noqa: E402
from test_pipecat_support import delay_s, free_port, identity_engine, speech_like, timeline  # noqa: E402

from hertz_agents.timing import STEP_SECONDS  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipecat_phone_bot.py"
RATE = 8000
CHUNK = 160  # Twilio sends 20 ms of 8 kHz mu-law per message
STREAM_SID = "MZ00000000000000000000000000000001"
AUTH_TOKEN = "twilio-test-auth-token"
PUBLIC_HOST = "bot.example.com"


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 -> G.711 mu-law bytes (bit-exact with the ITU reference encoder)."""
    v = np.right_shift(pcm.astype(np.int32), 2)
    sign = v < 0
    mag = np.minimum(np.where(sign, -v, v), 8158) + 33
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 5, 0, 7)
    mantissa = (mag >> (exponent + 1)) & 0x0F
    return (
        (~((sign.astype(np.int32) << 7) | (exponent << 4) | mantissa) & 0xFF)
        .astype(np.uint8)
        .tobytes()
    )


def ulaw_decode(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> float32 in [-1, 1]."""
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 7, u & 0x0F
    mag = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -mag, mag).astype(np.float32) / 32768


class FakeTwilio:
    """Twilio's side of one Media Stream (a fake, see the module docstring)."""

    def __init__(self, ws, *, call_sid: str = "CA0", parameters: dict | None = None) -> None:
        self.ws, self.call_sid, self.parameters = ws, call_sid, parameters or {}
        self.sent: list[tuple[float, np.ndarray]] = []  # caller audio, by send time
        self.played: list[tuple[float, np.ndarray]] = []  # bot audio, by the time it plays
        self.clears: list[float] = []
        self.media_messages = 0
        self._line_free_at = 0.0  # when the phone line finishes playing what it has queued

    async def call(self, audio: np.ndarray) -> None:
        await self.ws.send(
            json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        )
        await self.ws.send(
            json.dumps(
                {
                    "event": "start",
                    "sequenceNumber": "1",
                    "streamSid": STREAM_SID,
                    "start": {
                        "streamSid": STREAM_SID,
                        "accountSid": "AC0",
                        "callSid": self.call_sid,
                        "tracks": ["inbound"],
                        "customParameters": self.parameters,
                        "mediaFormat": {
                            "encoding": "audio/x-mulaw",
                            "sampleRate": RATE,
                            "channels": 1,
                        },
                    },
                }
            )
        )
        t0 = time.monotonic()
        for k in range(len(audio) // CHUNK):
            await asyncio.sleep(max(0.0, t0 + k * CHUNK / RATE - time.monotonic()))
            chunk = audio[k * CHUNK : (k + 1) * CHUNK]
            payload = base64.b64encode(ulaw_encode(np.clip(chunk * 32768, -32768, 32767))).decode()
            self.sent.append((time.monotonic(), chunk))
            await self.ws.send(
                json.dumps(
                    {
                        "event": "media",
                        "sequenceNumber": str(k + 2),
                        "streamSid": STREAM_SID,
                        "media": {
                            "track": "inbound",
                            "chunk": str(k + 1),
                            "timestamp": str(k * 20),
                            "payload": payload,
                        },
                    }
                )
            )
        stop = {"event": "stop", "streamSid": STREAM_SID, "stop": {"callSid": self.call_sid}}
        await self.ws.send(json.dumps(stop))

    async def listen(self) -> None:
        async for text in self.ws:
            message = json.loads(text)
            assert message.get("streamSid") == STREAM_SID, message
            now = time.monotonic()
            if message["event"] == "media":
                self.media_messages += 1
                audio = ulaw_decode(base64.b64decode(message["media"]["payload"]))
                start = max(now, self._line_free_at)
                self.played.append((start, audio))
                self._line_free_at = start + len(audio) / RATE
            elif message["event"] == "clear":  # drop what the line has not played yet
                self.clears.append(now)
                kept = []
                for start, audio in self.played:
                    if start < now:
                        kept.append((start, audio[: int((now - start) * RATE)]))
                self.played, self._line_free_at = kept, now
            else:
                raise AssertionError(f"unexpected message from the bot: {message}")


def load_example():
    spec = importlib.util.spec_from_file_location(EXAMPLE.stem, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def twilio_signed(url: str, params: dict[str, str]) -> str:
    """Twilio's X-Twilio-Signature, as its documentation defines it: HMAC-SHA1 of the URL and the
    sorted POST parameters, keyed with the account's auth token, in base64."""
    data = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(
        hmac.new(AUTH_TOKEN.encode(), data.encode(), hashlib.sha1).digest()
    ).decode()


@pytest.fixture(scope="module")
def phone_bot(tiny_model_dir, tmp_path_factory):
    """The phone example under Pipecat's development runner, as a user runs it (a subprocess):
    ``-t twilio -x bot.example.com``, Twilio's auth token set. Yields its base URL."""
    port, log = free_port(), tmp_path_factory.mktemp("phone") / "bot.log"
    command = [
        sys.executable, str(EXAMPLE), "-t", "twilio", "-x", PUBLIC_HOST,
        "--model", str(tiny_model_dir), "--gate-db", "off",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with open(log, "w") as out:
        env = {**os.environ, "TWILIO_AUTH_TOKEN": AUTH_TOKEN}
        bot = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert bot.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/api/model", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        yield url
    finally:
        bot.send_signal(signal.SIGINT)
        try:
            bot.wait(20)
        except subprocess.TimeoutExpired:
            bot.kill()


@contextlib.asynccontextmanager
async def serving(app):
    """Run ``app`` with uvicorn on a free local port; yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn has no startup event to wait on
        await asyncio.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


async def webhook(url: str, params: dict[str, str], signature: str | None) -> tuple[int, str]:
    headers = {"X-Twilio-Signature": signature} if signature else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/", data=params, headers=headers) as response:
            return response.status, await response.text()


async def call_token(url: str, call_sid: str) -> str:
    """What Twilio does when a call comes in: the signed webhook; returns the stream's token."""
    params = {"CallSid": call_sid, "From": "+15550000001", "To": "+15550000002"}
    status, xml = await webhook(url, params, twilio_signed(f"https://{PUBLIC_HOST}/", params))
    assert status == 200, xml
    return re.search(r'<Parameter name="hertz_token" value="([^"]+)"/>', xml).group(1)


async def phone_call(ws_url: str, audio: np.ndarray, **twilio_args) -> FakeTwilio:
    async with websockets.connect(ws_url) as ws:
        twilio = FakeTwilio(ws, **twilio_args)
        listening = asyncio.create_task(twilio.listen())
        await twilio.call(audio)
        await asyncio.sleep(0.3)
    await asyncio.wait_for(listening, 5)
    return twilio


async def test_the_call_webhook_needs_twilios_signature_and_hands_out_a_token(phone_bot):
    params = {"CallSid": "CA1", "From": "+15550000001"}
    assert (await webhook(phone_bot, params, None))[0] == 403
    assert (await webhook(phone_bot, params, twilio_signed("https://evil.example/", params)))[
        0
    ] == 403
    status, xml = await webhook(phone_bot, params, twilio_signed(f"https://{PUBLIC_HOST}/", params))
    assert status == 200, xml
    assert f'<Stream url="wss://{PUBLIC_HOST}/ws"><Parameter name="hertz_token" value="' in xml


@pytest.mark.parametrize("token", ["none", "forged", "other call", "reused"])
async def test_a_media_stream_without_a_valid_token_is_refused(phone_bot, token):
    ws_url = phone_bot.replace("http", "ws") + "/ws"
    parameters = {}
    if token == "forged":
        parameters = {"hertz_token": "9999999999.00.CA2.0123abcd"}
    elif token == "other call":
        parameters = {"hertz_token": await call_token(phone_bot, "CA-other")}
    elif token == "reused":
        parameters = {"hertz_token": await call_token(phone_bot, "CA2")}
        with contextlib.suppress(websockets.ConnectionClosed):  # a short call that uses the token
            silence = np.zeros(RATE // 2, dtype=np.float32)
            await phone_call(ws_url, silence, call_sid="CA2", parameters=parameters)
    async with websockets.connect(ws_url) as ws:
        twilio = FakeTwilio(ws, call_sid="CA2", parameters=parameters)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await twilio.call(np.zeros(RATE * 3, dtype=np.float32))
            await ws.recv()
    assert closed.value.rcvd.code == 1008, closed.value
    assert not twilio.played


async def test_phone_call_mulaw_in_mulaw_out_in_real_time(phone_bot):
    token = await call_token(phone_bot, "CA3")
    ws_url = phone_bot.replace("http", "ws") + "/ws"
    audio = speech_like(3.0, RATE, seed=7)
    twilio = await phone_call(ws_url, audio, call_sid="CA3", parameters={"hertz_token": token})
    assert twilio.played, "the bot sent no audio"
    first, last = twilio.played[0][0], twilio.played[-1][0] + len(twilio.played[-1][1]) / RATE
    played = sum(len(a) for _, a in twilio.played) / RATE
    loud = np.sqrt(np.mean(np.concatenate([a for _, a in twilio.played]) ** 2))
    print(
        f"\nphone: first audio {1000 * (first - twilio.sent[0][0]):.0f} ms after the caller's, "
        f"{played:.2f} s played over {last - first:.2f} s, {twilio.media_messages} media messages"
    )
    assert loud > 0.01, "the bot's audio is silent"
    assert played >= 0.9 * (last - first), "gaps: the bot's audio did not keep up with real time"
    assert played >= (len(twilio.sent) * CHUNK / RATE) - 4 * STEP_SECONDS


async def test_clear_drops_queued_audio_and_the_model_keeps_talking(tiny_model_dir):
    """In this process, the phone bot's call handler (what the runner runs on /ws) with the
    identity engine (the echo makes the round trip measurable) and a hook that interrupts."""
    bot = load_example()
    engine = identity_engine(tiny_model_dir)
    options = bot.BotOptions(model=engine)

    async def interrupt_later(worker):
        async def interrupt():
            await asyncio.sleep(1.5)
            await worker.queue_frame(InterruptionFrame())

        asyncio.get_running_loop().create_task(interrupt())

    app = FastAPI()

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        runner_args = WebSocketRunnerArguments(websocket=websocket)
        await bot.answer_call(runner_args, options, on_started=interrupt_later)

    audio = speech_like(4.0, RATE, seed=8)
    try:
        async with serving(app) as port:
            token = {"hertz_token": bot.TOKENS.mint("CA4")}
            twilio = await phone_call(
                f"ws://127.0.0.1:{port}/ws", audio, call_sid="CA4", parameters=token
            )
    finally:
        engine.close()
    assert len(twilio.clears) == 1, "an interruption reaches Twilio as one clear message"
    after = sum(len(a) for s, a in twilio.played if s >= twilio.clears[0]) / RATE
    assert after >= 1.5, f"only {after:.2f} s of audio after the clear: the model stopped talking"
    t0 = twilio.sent[0][0]
    sent = timeline(twilio.sent, t0, 4.5, RATE)
    heard = timeline(twilio.played, t0, 4.5, RATE)
    lag, agree = delay_s(sent, heard, RATE, start_s=2.5, end_s=4.3, window_s=0.33)
    print(
        f"\nphone round trip (fake Twilio -> bot -> fake Twilio, echo model): {lag * 1000:.0f} ms "
        f"(windows agreeing: {agree:.2f})"
    )
    assert agree >= 0.66, "the echo of the caller's audio was not found in what the bot sent back"
