"""The whole worker, end to end: ``examples/livekit_agent.py`` in LiveKit's console mode.

``python -m livekit.agents console examples/livekit_agent.py --connect-addr HOST:PORT`` is what
the ``lk`` CLI runs: the worker connects to the CLI over TCP and exchanges length-prefixed
``AgentSessionMessage`` protobufs (microphone frames in; speaker frames, playback flushes and
session events out). Here the test is that CLI: it listens, plays a caller (a tone) into the
worker in real time and keeps what comes back. The worker is the real example with the real
plugin and a real tiny model, with no LiveKit server. The tiny model's output is noise around
0.1 RMS, so the test declares its quiet level at 0.01 (``--silence-rms``) and the gate plays
all of it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from livekit.protocol.agent_pb import agent_session as pb

from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

ROOT = Path(__file__).resolve().parents[1]
WIRE_RATE = 48_000  # the console protocol's rate, both ways
TONE_HZ, TONE_AMP = 220.0, 0.3
CALL_SECONDS = 3.0

ConsoleIO = pb.AgentSessionMessage.ConsoleIO


class ConsolePeer:
    """The CLI's side of the console connection: a microphone, a speaker, and a log of events."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.speaker: list[np.ndarray] = []
        self.events: list[pb.AgentSessionEvent] = []
        self.flushes = self.clears = 0

    def send(self, msg: pb.AgentSessionMessage) -> None:
        data = msg.SerializeToString()
        self._writer.write(struct.pack(">I", len(data)) + data)

    async def receive(self) -> None:
        while True:
            try:
                size = struct.unpack(">I", await self._reader.readexactly(4))[0]
                msg = pb.AgentSessionMessage.FromString(await self._reader.readexactly(size))
            except asyncio.IncompleteReadError:
                return  # the worker hung up
            kind = msg.WhichOneof("message")
            if kind == "audio_output":
                assert (
                    msg.audio_output.sample_rate == WIRE_RATE and msg.audio_output.num_channels == 1
                )
                self.speaker.append(np.frombuffer(msg.audio_output.data, np.int16))
            elif kind == "event":
                self.events.append(msg.event)
            elif kind == "audio_playback_flush":  # the speaker plays instantly: report it played
                self.flushes += 1
                self.send(
                    pb.AgentSessionMessage(
                        audio_playback_finished=ConsoleIO.AudioPlaybackFinished()
                    )
                )
            elif kind == "audio_playback_clear":
                self.clears += 1

    async def talk(self, seconds: float) -> None:
        """A 220 Hz tone in 10 ms frames, paced in real time."""
        n = WIRE_RATE // 100
        start = time.monotonic()
        for i in range(int(seconds * 100)):
            t = (np.arange(n) + i * n) / WIRE_RATE
            pcm = (TONE_AMP * np.sin(2 * np.pi * TONE_HZ * t) * 32767).astype(np.int16)
            frame = ConsoleIO.AudioFrame(data=pcm.tobytes(), sample_rate=WIRE_RATE, num_channels=1)
            frame.samples_per_channel = n
            self.send(pb.AgentSessionMessage(audio_input=frame))
            await asyncio.sleep(max(0.0, start + (i + 1) / 100 - time.monotonic()))

    def agent_states(self) -> list[int]:
        return [
            e.agent_state_changed.new_state
            for e in self.events
            if e.HasField("agent_state_changed")
        ]


async def test_console_worker_hears_the_caller_and_streams_the_model_back(tiny_model_dir, tmp_path):
    connected: asyncio.Future = asyncio.get_running_loop().create_future()
    listener = await asyncio.start_server(lambda r, w: connected.set_result((r, w)), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    source_tree = [
        str(ROOT),
        str(ROOT / "adapters" / "livekit"),
    ]  # works with or without an install
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*source_tree, os.environ.get("PYTHONPATH", "")]),
        "HERTZ_MODEL": str(tiny_model_dir),
        "HERTZ_SILENCE_RMS": "0.01",
        "HERTZ_RECORD_DIR": str(tmp_path / "calls"),
    }
    log_path = tmp_path / "worker.log"
    log = log_path.open("w")  # noqa: ASYNC230 - a local file, opened once
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "livekit.agents", "console",
        str(ROOT / "examples" / "livekit_agent.py"),
        "--connect-addr", f"127.0.0.1:{port}",
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()  # the worker has its own copy of the descriptor
    try:
        reader, writer = await asyncio.wait_for(connected, timeout=120)
        peer = ConsolePeer(reader, writer)
        receiving = asyncio.create_task(peer.receive())
        await peer.talk(CALL_SECONDS)
        await asyncio.sleep(1.0)  # the caller hangs on, silent: the model keeps stepping
        clears_during_call = peer.clears
    finally:
        worker.send_signal(signal.SIGTERM)  # what Ctrl-C in the CLI does
        rc = await asyncio.wait_for(worker.wait(), timeout=60)
        listener.close()
    await asyncio.wait_for(receiving, timeout=10)
    log_tail = log_path.read_text()[-3000:]

    assert rc == 0, log_tail
    assert pb.AS_SPEAKING in peer.agent_states(), log_tail
    assert clears_during_call == 0, "the framework cut the model while the caller talked"
    heard = np.concatenate(peer.speaker).astype(np.float32) / 32767
    assert heard.shape[0] >= 2.5 * WIRE_RATE, (
        f"only {heard.shape[0] / WIRE_RATE:.2f} s of model audio came back"
    )

    # the worker's recording of the call: caller | model, as the model heard and said them
    recording, rate = sf.read(next((tmp_path / "calls").glob("*.wav")), dtype="float32")
    assert rate == SAMPLE_RATE
    caller, model = recording[:, 0], recording[SAMPLES_PER_STEP:, 1]  # the model plays a step late
    spectrum = np.abs(np.fft.rfft(caller))
    assert (
        abs(np.argmax(spectrum) * SAMPLE_RATE / caller.shape[0] - TONE_HZ) < 2.0
    )  # the caller's tone got in
    talking = caller.reshape(-1, SAMPLES_PER_STEP)
    talking = talking[np.abs(talking).max(axis=1) > 0.01]  # the steps that carried the caller
    assert talking.shape[0] >= (CALL_SECONDS - 0.5) * SAMPLE_RATE / SAMPLES_PER_STEP
    assert (
        abs(float(np.sqrt(np.mean(talking[1:-1] ** 2))) - TONE_AMP / np.sqrt(2)) < 0.02
    )  # at its level

    # and what the peer heard is the model's own output (resampled twice on the way: compared by
    # correlation, allowing for the second resampler's delay)
    expected = soxr.resample(model, SAMPLE_RATE, WIRE_RATE)
    segment = heard[WIRE_RATE // 2 : WIRE_RATE // 2 + WIRE_RATE]
    best = max(
        float(np.dot(segment, expected[WIRE_RATE // 2 + lag : WIRE_RATE // 2 + lag + WIRE_RATE]))
        / (
            np.linalg.norm(segment)
            * np.linalg.norm(expected[WIRE_RATE // 2 + lag : WIRE_RATE // 2 + lag + WIRE_RATE])
        )
        for lag in range(-480, 481)
    )
    assert best > 0.9, (
        f"the audio that came back does not match the model's output (correlation {best:.2f})"
    )
