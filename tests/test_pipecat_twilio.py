"""The phone example (examples/pipecat_phone_bot.py) called by a fake Twilio, over a real websocket.

``FakeTwilio`` is a fake of Twilio's media servers (the real ones cannot be reached from a test):
it speaks the Media Streams protocol as documented by Twilio ("connected", "start", 20 ms "media"
messages of 8 kHz mu-law, "stop"), and plays the bot's audio into a real-time clock the way a
phone line does, dropping whatever it has not played yet when the bot sends "clear".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`")
websockets = pytest.importorskip("websockets", reason="the Twilio test needs `pip install websockets`")

import aiohttp  # noqa: E402
import uvicorn  # noqa: E402
from pipecat.frames.frames import InterruptionFrame  # noqa: E402
from test_pipecat_support import delay_s, free_port, identity_engine, speech_like, timeline  # noqa: E402

from hertz_agents.timing import STEP_SECONDS  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipecat_phone_bot.py"
RATE = 8000
CHUNK = 160  # Twilio sends 20 ms of 8 kHz mu-law per message
STREAM_SID = "MZ00000000000000000000000000000001"


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 -> G.711 mu-law bytes (bit-exact with the ITU reference encoder)."""
    v = np.right_shift(pcm.astype(np.int32), 2)
    sign = v < 0
    mag = np.minimum(np.where(sign, -v, v), 8158) + 33
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 5, 0, 7)
    mantissa = (mag >> (exponent + 1)) & 0x0F
    return (~((sign.astype(np.int32) << 7) | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> float32 in [-1, 1]."""
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 7, u & 0x0F
    mag = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -mag, mag).astype(np.float32) / 32768


class FakeTwilio:
    """Twilio's side of one Media Stream (a fake, see the module docstring)."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.sent: list[tuple[float, np.ndarray]] = []  # caller audio, by send time
        self.played: list[tuple[float, np.ndarray]] = []  # bot audio, by the time it plays
        self.clears: list[float] = []
        self.media_messages = 0
        self._line_free_at = 0.0  # when the phone line finishes playing what it has queued

    async def call(self, audio: np.ndarray) -> None:
        await self.ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await self.ws.send(
            json.dumps(
                {
                    "event": "start",
                    "sequenceNumber": "1",
                    "streamSid": STREAM_SID,
                    "start": {
                        "streamSid": STREAM_SID,
                        "accountSid": "AC0",
                        "callSid": "CA0",
                        "tracks": ["inbound"],
                        "customParameters": {},
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
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
        await self.ws.send(json.dumps({"event": "stop", "streamSid": STREAM_SID, "stop": {"callSid": "CA0"}}))

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


async def phone_call(app, audio: np.ndarray) -> FakeTwilio:
    async with serving(app) as port:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            twilio = FakeTwilio(ws)
            listening = asyncio.create_task(twilio.listen())
            await twilio.call(audio)
            await asyncio.sleep(0.3)
        await asyncio.wait_for(listening, 5)
    return twilio


async def test_twiml_points_twilio_at_the_media_stream(tiny_model_dir):
    app = load_example().create_app(str(tiny_model_dir), public_host="bot.example.com")
    async with serving(app) as port, aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/twiml") as response:
            assert response.status == 200 and response.content_type == "application/xml"
            assert '<Stream url="wss://bot.example.com/ws"/>' in await response.text()


async def test_phone_call_mulaw_in_mulaw_out_in_real_time(tiny_model_dir):
    app = load_example().create_app(str(tiny_model_dir), gate_db=None)  # the tiny model is all "quiet"
    twilio = await phone_call(app, speech_like(3.0, RATE, seed=7))
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
    engine = identity_engine(tiny_model_dir)  # the echo makes the round trip measurable

    async def interrupt_later(worker):
        async def interrupt():
            await asyncio.sleep(1.5)
            await worker.queue_frame(InterruptionFrame())

        asyncio.get_running_loop().create_task(interrupt())

    audio = speech_like(4.0, RATE, seed=8)
    try:
        twilio = await phone_call(load_example().create_app(engine, on_started=interrupt_later), audio)
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
