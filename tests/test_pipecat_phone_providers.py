"""The phone example (examples/pipecat_phone_bot.py) with Telnyx and Plivo, as with Twilio in
test_pipecat_twilio.py: under Pipecat's development runner (``-t telnyx`` / ``-t plivo``), the
call webhook hands out a stream URL that carries a single-use token, a stream without it is
refused, and a call with it talks in real time; in this process, with an echo model, the caller's
own audio comes back through each provider's serializer.

``FakeTelnyx`` and ``FakePlivo`` are fakes of the providers' media servers (the real ones cannot be
reached from a test). Each speaks its provider's bidirectional media-stream protocol as the
provider documents it and as Pipecat's serializer and runner read it: Telnyx sends "connected",
"start" (with ``stream_id``, ``call_control_id`` and ``media_format``), 20 ms "media" messages of
8 kHz PCMU and "stop", and takes "media" and "clear" back; Plivo sends "start" (``streamId``,
``callId``, ``mediaFormat``), "media" and "stop", and takes "playAudio" and "clearAudio" back.
Both play the bot's audio into a real-time clock the way a phone line does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip(
    "pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`"
)
websockets = pytest.importorskip(
    "websockets", reason="the phone tests need `pip install websockets`"
)

import aiohttp  # noqa: E402
from fastapi import FastAPI, WebSocket  # noqa: E402
from pipecat.runner.types import WebSocketRunnerArguments  # noqa: E402
from test_pipecat_support import delay_s, free_port, identity_engine, speech_like, timeline  # noqa: E402
from test_pipecat_twilio import EXAMPLE, load_example, serving, ulaw_decode, ulaw_encode  # noqa: E402

from hertz_agents.timing import STEP_SECONDS  # noqa: E402

RATE = 8000
CHUNK = 160  # 20 ms of 8 kHz mu-law per media message, as both providers send it
PUBLIC_HOST = "bot.example.com"
PROVIDERS = ("telnyx", "plivo")


class FakePhoneLine:
    """What both fakes share: send the caller's audio in real time, play the bot's."""

    stream_id = "stream-0001"

    def __init__(self, ws, *, call_id: str) -> None:
        self.ws, self.call_id = ws, call_id
        self.sent: list[tuple[float, np.ndarray]] = []  # caller audio, by send time
        self.played: list[tuple[float, np.ndarray]] = []  # bot audio, by the time it plays
        self.clears: list[float] = []
        self._line_free_at = 0.0

    async def call(self, audio: np.ndarray) -> None:
        for message in self.opening():
            await self.ws.send(json.dumps(message))
        t0 = time.monotonic()
        for k in range(len(audio) // CHUNK):
            await asyncio.sleep(max(0.0, t0 + k * CHUNK / RATE - time.monotonic()))
            chunk = audio[k * CHUNK : (k + 1) * CHUNK]
            payload = base64.b64encode(ulaw_encode(np.clip(chunk * 32768, -32768, 32767)))
            self.sent.append((time.monotonic(), chunk))
            await self.ws.send(json.dumps(self.media(k, payload.decode())))
        await self.ws.send(json.dumps(self.closing()))

    async def listen(self) -> None:
        async for text in self.ws:
            message, now = json.loads(text), time.monotonic()
            payload = self.bot_audio(message)
            if payload is not None:
                audio = ulaw_decode(base64.b64decode(payload))
                start = max(now, self._line_free_at)
                self.played.append((start, audio))
                self._line_free_at = start + len(audio) / RATE
            elif self.is_clear(message):  # drop what the line has not played yet
                self.clears.append(now)
                self.played = [(s, a[: int((now - s) * RATE)]) for s, a in self.played if s < now]
                self._line_free_at = now
            else:
                raise AssertionError(f"unexpected message from the bot: {message}")

    # -- each provider's messages -------------------------------------------------------
    def opening(self) -> list[dict]:
        raise NotImplementedError

    def media(self, k: int, payload: str) -> dict:
        raise NotImplementedError

    def closing(self) -> dict:
        raise NotImplementedError

    def bot_audio(self, message: dict) -> str | None:
        raise NotImplementedError

    def is_clear(self, message: dict) -> bool:
        raise NotImplementedError


class FakeTelnyx(FakePhoneLine):
    def opening(self) -> list[dict]:
        start = {
            "call_control_id": self.call_id,
            "client_state": None,
            "from": "+15550000001",
            "to": "+15550000002",
            "media_format": {"encoding": "PCMU", "sample_rate": RATE, "channels": 1},
        }
        return [
            {"event": "connected", "version": "1.0.0"},
            {"event": "start", "sequence_number": "1", "start": start, "stream_id": self.stream_id},
        ]

    def media(self, k: int, payload: str) -> dict:
        media = {"track": "inbound", "chunk": str(k + 1), "timestamp": str(20 * k)}
        return {
            "event": "media",
            "sequence_number": str(k + 2),
            "media": {**media, "payload": payload},
            "stream_id": self.stream_id,
        }

    def closing(self) -> dict:
        return {
            "event": "stop",
            "stop": {"call_control_id": self.call_id},
            "stream_id": self.stream_id,
        }

    def bot_audio(self, message: dict) -> str | None:
        return message["media"]["payload"] if message.get("event") == "media" else None

    def is_clear(self, message: dict) -> bool:
        return message.get("event") == "clear"


class FakePlivo(FakePhoneLine):
    def opening(self) -> list[dict]:
        start = {
            "callId": self.call_id,
            "streamId": self.stream_id,
            "accountId": "MA0",
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE},
        }
        return [{"event": "start", "sequenceNumber": 0, "start": start, "extra_headers": "{}"}]

    def media(self, k: int, payload: str) -> dict:
        media = {"track": "inbound", "timestamp": str(20 * k), "chunk": k + 1, "payload": payload}
        return {
            "event": "media",
            "sequenceNumber": k + 1,
            "streamId": self.stream_id,
            "media": media,
        }

    def closing(self) -> dict:
        return {"event": "stop", "sequenceNumber": 10**6, "streamId": self.stream_id}

    def bot_audio(self, message: dict) -> str | None:
        if message.get("event") != "playAudio":
            return None
        assert message["media"]["contentType"] == "audio/x-mulaw", message
        assert message["media"]["sampleRate"] == RATE, message
        return message["media"]["payload"]

    def is_clear(self, message: dict) -> bool:
        return message.get("event") == "clearAudio" and message["streamId"] == self.stream_id


FAKES = {"telnyx": FakeTelnyx, "plivo": FakePlivo}


async def phone_call(provider: str, ws_url: str, audio: np.ndarray, call_id: str) -> FakePhoneLine:
    async with websockets.connect(ws_url) as ws:
        line = FAKES[provider](ws, call_id=call_id)
        listening = asyncio.create_task(line.listen())
        await line.call(audio)
        await asyncio.sleep(0.3)
    await asyncio.wait_for(listening, 5)
    return line


def stream_url(xml: str) -> str:
    """The stream URL in the webhook's answer: Telnyx's ``url=`` attribute or Plivo's text."""
    found = re.search(r'url="(wss://[^"]+)"', xml) or re.search(r">(wss://[^<]+)</Stream>", xml)
    assert found, xml
    return found.group(1)


@pytest.fixture(scope="module", params=PROVIDERS)
def phone_bot(request, tiny_model_dir, tmp_path_factory):
    """The phone example under Pipecat's runner, as a user runs it: ``-t <provider> -x host``.

    Yields (provider, base URL)."""
    provider = request.param
    port, log = free_port(), tmp_path_factory.mktemp(provider) / "bot.log"
    command = [
        sys.executable, str(EXAMPLE), "-t", provider, "-x", PUBLIC_HOST,
        "--model", str(tiny_model_dir), "--gate-db", "off",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELNYX_", "PLIVO_"))}
    with open(log, "w") as out:
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
        yield provider, url
    finally:
        bot.send_signal(signal.SIGINT)
        try:
            bot.wait(20)
        except subprocess.TimeoutExpired:
            bot.kill()


async def webhook(url: str) -> str:
    """What the provider does when a call comes in: POST the call webhook, read its XML."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/", data={"CallUUID": "c-1"}) as response:
            assert response.status == 200, await response.text()
            return await response.text()


def local(ws_url: str, base: str) -> str:
    """The public stream URL the webhook gave, pointed at the bot on loopback."""
    return ws_url.replace(f"wss://{PUBLIC_HOST}", base.replace("http", "ws"))


async def test_a_stream_url_from_the_webhook_talks_in_real_time(phone_bot):
    provider, url = phone_bot
    xml = await webhook(url)
    public = stream_url(xml)
    assert re.fullmatch(rf"wss://{PUBLIC_HOST}/ws/[^/]+", public), xml
    audio = speech_like(3.0, RATE, seed=11)
    line = await phone_call(provider, local(public, url), audio, call_id=f"{provider}-call-1")
    assert line.played, "the bot sent no audio"
    first, last = line.played[0][0], line.played[-1][0] + len(line.played[-1][1]) / RATE
    played = sum(len(a) for _, a in line.played) / RATE
    loud = np.sqrt(np.mean(np.concatenate([a for _, a in line.played]) ** 2))
    print(f"\n{provider}: {played:.2f} s played over {last - first:.2f} s")
    assert loud > 0.01, "the bot's audio is silent"
    assert played >= 0.9 * (last - first), "gaps: the bot's audio did not keep up with real time"
    assert played >= len(line.sent) * CHUNK / RATE - 4 * STEP_SECONDS


@pytest.mark.parametrize("token", ["none", "forged", "reused"])
async def test_a_stream_without_a_valid_token_is_refused(phone_bot, token):
    provider, url = phone_bot
    base = url.replace("http", "ws")
    if token == "none":
        ws_url = f"{base}/ws"
    elif token == "forged":
        ws_url = f"{base}/ws/9999999999.00.x.0123abcd"
    else:  # a short call uses the token first
        ws_url = local(stream_url(await webhook(url)), url)
        silence = np.zeros(RATE // 2, dtype=np.float32)
        await phone_call(provider, ws_url, silence, call_id=f"{provider}-call-2")
    async with websockets.connect(ws_url) as ws:
        line = FAKES[provider](ws, call_id=f"{provider}-call-3")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await line.call(np.zeros(RATE * 3, dtype=np.float32))
            await ws.recv()
    assert closed.value.rcvd.code == 1008, closed.value
    assert not line.played


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_callers_audio_comes_back_through_the_providers_serializer(
    provider, tiny_model_dir
):
    """In this process, with the echo model: the round trip through the provider's serializer
    (mu-law 8 kHz in, 16 kHz through the model, mu-law 8 kHz out) keeps the caller's audio."""
    bot = load_example()
    engine = identity_engine(tiny_model_dir)
    options = bot.BotOptions(model=engine)
    app = FastAPI()

    @app.websocket("/ws/{token}")
    async def media_stream(websocket: WebSocket, token: str) -> None:
        await websocket.accept()
        await bot.answer_call(WebSocketRunnerArguments(websocket=websocket), options)

    audio = speech_like(4.0, RATE, seed=12)
    try:
        async with serving(app) as port:
            ws_url = f"ws://127.0.0.1:{port}/ws/{bot.TOKENS.mint()}"
            line = await phone_call(provider, ws_url, audio, call_id=f"{provider}-echo")
    finally:
        engine.close()
    t0 = line.sent[0][0]
    sent, heard = timeline(line.sent, t0, 4.5, RATE), timeline(line.played, t0, 4.5, RATE)
    lag, agree = delay_s(sent, heard, RATE, start_s=2.0, end_s=4.3, window_s=0.33)
    print(
        f"\n{provider} round trip (echo model): {lag * 1000:.0f} ms (windows agreeing: {agree:.2f})"
    )
    assert agree >= 0.66, "the echo of the caller's audio was not found in what the bot sent back"
