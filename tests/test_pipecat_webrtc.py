"""The WebRTC example bot (examples/pipecat_webrtc_bot.py) run as a user runs it, under Pipecat's
development runner in a subprocess, and called by a real aiortc peer on loopback the way Pipecat's
clients call it: ``POST /start``, then the SDP offer to ``/sessions/<id>/api/offer``.

The client sends speech-like audio at 48 kHz through Opus, as a browser would, and records what
comes back. With the tiny model it checks that the model's audio arrives, in real time, and that the
bot heard the client (from the bot's call recording). With the identity engine (a fake model that
echoes, see test_pipecat_support; served by the project's inference server in the test process, and
named to the bot as ``--model hertz://...``) it measures the round trip by matching what was sent
with what came back, and checks that a 500 ms stall of one step leaves no lasting delay.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`"
)
aiortc = pytest.importorskip(
    "aiortc", reason="the WebRTC tests need `pip install 'hertz-agents[dev]'`"
)

import aiohttp  # noqa: E402
import av  # noqa: E402
import soundfile as sf  # noqa: E402
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402
from test_pipecat_support import (  # noqa: E402
    delay_s,
    example_bot,
    free_port,
    identity_server,
    speech_like,
    timeline,
)

from hertz_agents.timing import SAMPLE_RATE, STEP_SECONDS  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipecat_webrtc_bot.py"
RATE = 48000  # what browsers send and receive (Opus)
PTIME = 0.02


class SpeechTrack(MediaStreamTrack):
    """A microphone that plays ``audio`` (48 kHz) in real time, then silence; logs what it sent."""

    kind = "audio"

    def __init__(self, audio: np.ndarray) -> None:
        super().__init__()
        self.audio, self.k, self.start = audio, 0, 0.0
        self.sent: list[tuple[float, np.ndarray]] = []

    async def recv(self) -> av.AudioFrame:
        n = int(RATE * PTIME)
        if self.k == 0:
            self.start = time.monotonic()
        await asyncio.sleep(max(0.0, self.start + self.k * PTIME - time.monotonic()))
        chunk = np.zeros(n, dtype=np.float32)
        piece = self.audio[self.k * n : (self.k + 1) * n]
        chunk[: len(piece)] = piece
        self.sent.append((time.monotonic(), chunk))
        frame = av.AudioFrame.from_ndarray(
            (chunk * 32767).astype(np.int16)[None, :], format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts, frame.time_base = (
            RATE,
            self.k * n,
            fractions.Fraction(1, RATE),
        )
        self.k += 1
        return frame


async def call(
    base_url: str, audio: np.ndarray, seconds: float, during=None, messages=None, states=None
):
    """Call the bot at ``base_url`` as Pipecat's clients do (``POST /start``, then the offer to
    ``/sessions/<id>/api/offer``) from aiortc for ``seconds``; returns what the client sent and
    received as (time, samples) lists, when the call started, and the /start answer."""
    pc, mic = RTCPeerConnection(), SpeechTrack(audio)
    received: list[tuple[float, np.ndarray]] = []
    readers: list[asyncio.Task] = []

    async def read(track):
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            samples = (
                frame.to_ndarray()
                .astype(np.float32)
                .reshape(-1, len(frame.layout.channels))
                .mean(axis=1)
            )
            assert frame.sample_rate == RATE
            received.append((time.monotonic(), samples / 32768))

    pc.on("track", lambda track: readers.append(asyncio.create_task(read(track))))
    pc.addTrack(mic)
    if states is not None:  # (time, state) of the connection, as the page watches it
        pc.on(
            "connectionstatechange", lambda: states.append((time.monotonic(), pc.connectionState))
        )
    channel = pc.createDataChannel("pipecat")  # as the page does: the bot's RTVI messages
    channel.on(
        "message", lambda text: messages.append(json.loads(text)) if messages is not None else None
    )
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base_url}/start", json={"transport": "webrtc"}) as response:
                assert response.status == 200, await response.text()
                start = await response.json()
            body = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
            offer_url = f"{base_url}/sessions/{start['sessionId']}/api/offer"
            async with http.post(offer_url, json=body) as response:
                assert response.status == 200, await response.text()
                answer = await response.json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        started = time.monotonic()
        if during is not None:
            await during()
        await asyncio.sleep(seconds - (time.monotonic() - started))
    finally:
        await pc.close()
        for reader in readers:
            reader.cancel()
        await asyncio.sleep(0.5)  # the bot sees the peer leave and ends its pipeline
    return mic.sent, received, started, start


def loud(samples: np.ndarray) -> bool:
    return float(np.sqrt(np.mean(samples**2))) > 0.01


async def test_runner_bot_a_browser_like_peer_hears_the_model_in_real_time(
    tiny_model_dir, tmp_path
):
    audio = speech_like(6.0, RATE, seed=5)
    records = tmp_path / "calls"
    # The tiny model's output is noise at one level whatever it hears: the gate, set from that
    # level, would call all of it silence. Off, every step plays. The STUN server is local and
    # answers nothing: it only shows that /start hands the bot's ICE servers to the client.
    stun = f"stun:127.0.0.1:{free_port()}"
    args = [
        "-t",
        "webrtc",
        "--model",
        str(tiny_model_dir),
        "--gate-db",
        "off",
        "--record-dir",
        str(records),
    ]
    async with example_bot(EXAMPLE, *args, "--ice-servers", stun, log=tmp_path / "bot.log") as url:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/api/model") as response:
            assert (await response.json())["model"] == str(tiny_model_dir)
        sent, received, started, start = await call(url, audio, seconds=4.0)
    assert start["iceConfig"] == {"iceServers": [{"urls": stun}]}, start
    assert received, "no audio track came back"
    ended = received[-1][0]
    first_loud = next(t for t, s in received if loud(s))
    model_audio = sum(len(s) for t, s in received if t >= first_loud) / RATE
    print(
        f"\nfirst model audio {1000 * (first_loud - started):.0f} ms after the connection; "
        f"{model_audio:.2f} s of audio in {ended - first_loud:.2f} s"
    )
    # The track delivers audio in real time: as much as the time that passed, give or take a packet.
    assert abs(model_audio - (ended - first_loud)) <= 0.15
    # And it is the model talking (the tiny model never goes quiet), not comfort silence.
    loud_s = sum(len(s) for t, s in received if t >= first_loud and loud(s)) / RATE
    assert loud_s >= 0.8 * (ended - first_loud)
    # The bot heard the client: its recording's caller channel follows what the client sent.
    (recording,) = records.glob("*.wav")
    caller = sf.read(recording, dtype="float32")[0][:, 0]
    sent_16k = np.concatenate([s for _, s in sent])[
        ::3
    ]  # 48 kHz -> 16 kHz is enough for an envelope
    # The recording starts when the bot's session opens, which can be a little before or after the
    # client's first sample went out (the transport may drop the first packets of a new track), so
    # the consistent offset is searched in both directions.
    end_s = len(caller) / SAMPLE_RATE - 0.3
    _, behind = delay_s(sent_16k, caller, SAMPLE_RATE, start_s=1.0, end_s=end_s)
    _, ahead = delay_s(
        caller,
        sent_16k,
        SAMPLE_RATE,
        start_s=1.0,
        end_s=min(end_s, len(sent_16k) / SAMPLE_RATE - 0.3),
    )
    agree = max(behind, ahead)
    assert agree >= 0.66, (
        f"the bot's recording does not follow the client's audio (agreement {agree:.2f})"
    )


async def test_runner_bot_round_trip_latency_and_recovery_from_a_stall(tiny_model_dir, tmp_path):
    """The bot under the runner, its model the echo (the identity engine behind the project's
    inference server in this process, reached with --model hertz://...)."""
    audio = speech_like(7.0, RATE, seed=6)
    async with identity_server(tiny_model_dir) as (engine, model_url):

        async def stall_at_2s():
            async def stall():
                await asyncio.sleep(2.0)
                engine.inject_stall(0.5)

            asyncio.get_running_loop().create_task(stall())

        async with example_bot(
            EXAMPLE, "-t", "webrtc", "--model", model_url, log=tmp_path / "bot.log"
        ) as url:
            sent, received, _, _ = await call(url, audio, seconds=6.5, during=stall_at_2s)
    t0 = sent[0][0]
    span = received[-1][0] - t0
    mic = timeline(sent, t0, span, RATE)[::3]
    # A received frame ends when it arrives: place it before its arrival time.
    back = timeline([(t - len(s) / RATE, s) for t, s in received], t0, span, RATE)[::3]
    before, agree1 = delay_s(mic, back, SAMPLE_RATE, start_s=0.8, end_s=1.9, window_s=0.33)
    after, agree2 = delay_s(mic, back, SAMPLE_RATE, start_s=3.6, end_s=span - 0.2, window_s=0.33)
    print(
        f"\nround trip (browser-like peer -> bot -> peer, echo model): {before * 1000:.0f} ms "
        f"before the stall, {after * 1000:.0f} ms after (windows agreeing: {agree1:.2f}, "
        f"{agree2:.2f})"
    )
    assert min(agree1, agree2) >= 0.66, "the echo was not found in what came back"
    # One step of input, then aiortc's two jitter buffers and Opus twice (about 180 ms on loopback).
    assert before <= STEP_SECONDS + 0.4, "round trip: one step of input plus transport and codecs"
    assert after - before <= 0.06, "the stall left a lasting delay"


async def test_runner_bot_a_model_that_cannot_be_reached_ends_the_call_with_the_reason(tmp_path):
    """The fatal-error policy: the bot's model is a server that is not there, so the session
    cannot open; the call ends (the bot closes the connection) and the client is told why, in
    the RTVI error message the page shows."""
    model = f"hertz://127.0.0.1:{free_port()}?token=nobody-listens-here"
    messages: list[dict] = []
    states: list[tuple[float, str]] = []
    log = tmp_path / "bot.log"
    async with example_bot(EXAMPLE, "-t", "webrtc", "--model", model, log=log) as url:
        audio = speech_like(6.0, RATE)
        _, _, started, _ = await call(url, audio, seconds=5.0, messages=messages, states=states)
    errors = [
        m["data"]["error"] for m in messages if m.get("label") == "rtvi-ai" and m["type"] == "error"
    ]
    assert errors and "could not open a hertz-dev session" in errors[0], messages
    hung_up = started + 5.0
    ended = [t for t, state in states if state in ("closed", "failed") and t < hung_up]
    assert ended, f"the bot did not end the call: {states}"
