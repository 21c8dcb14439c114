"""Helpers for the tests against a real LiveKit server (this module holds no tests).

- ``livekit_server``: the server ``scripts/livekit_dev_stack start`` runs on 127.0.0.1 (its env
  vars, or the running stack's). Without one the tests skip, except under CI (``CI=true``),
  where they fail: CI starts the stack, and a skip there would hide that they did not run.
- ``echo_server``: the project's inference server on loopback, serving a real ``Engine`` whose
  network is replaced by the identity (each step's output is its input). This is the one stand-in:
  the tiny test model makes noise unrelated to what it hears, so only an echo lets a test tell
  which output belongs to which input, and so measure latency and find gaps inside speech. The
  worker reaches it as ``--model hertz://...``, exactly as it would reach a GPU server.
- ``Worker``: ``python examples/livekit_agent.py ... start``, the README's command, as a subprocess.
- ``Caller``: a participant made with the ``livekit`` SDK that publishes a WAV as its microphone,
  paced in real time, and records the agent's track as it arrives.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from aiohttp import web
from early_audio import identity_engine
from livekit import api, rtc

from hertz_agents.engine import Engine
from hertz_agents.server.app import HertzServer, ServerConfig

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT.parent / "shared" / "audio" / "toaskanymore.wav"
RATE = 48_000  # the rate the caller publishes and records at (WebRTC's Opus rate)
FRAME = RATE // 100  # 10 ms frames, as a browser sends them
TOKEN = "livekit-room-test-token-0123"


@dataclass
class LiveKit:
    url: str
    key: str
    secret: str

    def env(self) -> dict[str, str]:
        return {
            "LIVEKIT_URL": self.url,
            "LIVEKIT_API_KEY": self.key,
            "LIVEKIT_API_SECRET": self.secret,
        }

    def api(self) -> api.LiveKitAPI:
        return api.LiveKitAPI(
            url=self.url.replace("ws", "http", 1), api_key=self.key, api_secret=self.secret
        )


def _running_stack() -> dict[str, str]:
    """The env the dev stack prints, if it is running."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "livekit_dev_stack"), "env"],
        capture_output=True,
        text=True,
        check=False,
    )
    env = {}
    for word in result.stdout.split() if result.returncode == 0 else []:
        name, _, value = word.partition("=")
        if name.startswith("LIVEKIT_"):
            env[name] = value
    return env


@pytest.fixture(scope="session")
def livekit_server() -> LiveKit:
    env = {k: v for k, v in os.environ.items() if k.startswith("LIVEKIT_")} or _running_stack()
    if not {"LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"} <= env.keys():
        message = "no LiveKit server: run scripts/livekit_dev_stack start (CI starts it in .ci/run)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return LiveKit(env["LIVEKIT_URL"], env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"])


def echo_engine(model_dir: Path, *, max_sessions: int = 4, compute_s: float = 0.0) -> Engine:
    """A real Engine whose network is the identity (the stand-in the module docstring explains).

    ``compute_s``: how long each tick takes, as a real model's would (the identity takes none).
    """
    return identity_engine(model_dir, compute_s=compute_s, max_sessions=max_sessions)


@asynccontextmanager
async def echo_server(model_dir: Path, *, max_sessions: int = 4, compute_s: float = 0.0):
    """Yields (hertz:// URL, engine) for the echo engine behind the project's inference server."""
    engine = echo_engine(model_dir, max_sessions=max_sessions, compute_s=compute_s)
    runner = web.AppRunner(
        HertzServer(engine, ServerConfig(token=TOKEN)).make_app(),
        access_log=None,
        shutdown_timeout=0.5,
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield (
            f"hertz://127.0.0.1:{runner.addresses[0][1]}?token={TOKEN}&reconnect=0",
            engine,
            runner,
        )
    finally:
        await runner.cleanup()
        engine.close()


class Worker:
    """``python examples/livekit_agent.py ... start``, with the server's env, logging to a file."""

    def __init__(
        self, livekit: LiveKit, log_path: Path, *options: str, env: dict[str, str] | None = None
    ):
        self.log_path = log_path
        source_tree = [str(ROOT), str(ROOT / "adapters" / "livekit")]
        self._env = {
            **os.environ,
            **livekit.env(),
            **(env or {}),
            "PYTHONPATH": os.pathsep.join([*source_tree, os.environ.get("PYTHONPATH", "")]),
        }
        # --http-port 0: several workers on one machine, each with its own health-check port
        self._args = [
            sys.executable,
            str(ROOT / "examples" / "livekit_agent.py"),
            *options,
            "--http-port",
            "0",
            "start",
            "--log-level",
            "INFO",
            "--log-format",
            "json",
        ]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 120.0) -> Worker:
        with self.log_path.open("w") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self._args,
                env=self._env,
                cwd=self.log_path.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while "registered worker" not in self.log():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"the worker did not register:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.2)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout=30)
        except asyncio.TimeoutError:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return await self.proc.wait()

    async def __aenter__(self) -> Worker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def speech(seconds: float) -> np.ndarray:
    """``seconds`` of a real speaker from ../shared/audio, at the caller's rate."""
    audio, rate = sf.read(SPEECH, dtype="float32", always_2d=True)
    audio = soxr.resample(audio[:, 0], rate, RATE)
    return audio[: int(seconds * RATE)]


def room_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Caller:
    """A participant that talks into a room in real time and records what the agent sends."""

    livekit: LiveKit
    room: str
    agent_name: str = ""
    identity: str = "caller"
    heard: list[np.ndarray] = field(default_factory=list)
    first_heard_at: float | None = None
    said_from: float | None = None
    agent_joined_at: float | None = None
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    disconnect_reason: int | None = None  # an ``rtc.DisconnectReason``

    async def join(self) -> None:
        token = (
            api.AccessToken(self.livekit.key, self.livekit.secret)
            .with_identity(self.identity)
            .with_grants(api.VideoGrants(room_join=True, room=self.room))
        )
        if self.agent_name:  # explicit dispatch: the worker registered under this name joins
            token = token.with_room_config(
                api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name=self.agent_name)])
            )
        self._room = rtc.Room()
        self._room.on("track_subscribed", self._on_track)
        self._room.on("participant_connected", self._on_participant)
        self._room.on("disconnected", self._on_disconnected)
        await self._room.connect(self.livekit.url, token.to_jwt())
        for p in self._room.remote_participants.values():
            self._on_participant(p)
        self._source = rtc.AudioSource(RATE, 1, queue_size_ms=100)
        track = rtc.LocalAudioTrack.create_audio_track("mic", self._source)
        await self._room.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        self._talking = False
        self._idle = asyncio.create_task(self._idle_microphone())

    async def _idle_microphone(self) -> None:
        """A real microphone never stops sending: silence until ``say`` takes over."""
        silence = rtc.AudioFrame(bytes(FRAME * 2), RATE, 1, FRAME)
        start, n = time.monotonic(), 0
        while not self._talking:
            await self._source.capture_frame(silence)
            n += 1
            await asyncio.sleep(max(0.0, start + n * FRAME / RATE - time.monotonic()))

    def _on_disconnected(self, reason: int | None = None, *_: object) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def _on_participant(self, participant: rtc.RemoteParticipant) -> None:
        if (
            participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
            and self.agent_joined_at is None
        ):
            self.agent_joined_at = time.monotonic()

    def _on_track(self, track: rtc.Track, pub: rtc.RemoteTrackPublication, participant) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            self._recording = asyncio.create_task(self._record(track))

    async def _record(self, track: rtc.Track) -> None:
        self._stream = rtc.AudioStream(track, sample_rate=RATE, num_channels=1)
        async for event in self._stream:
            if self.first_heard_at is None:
                # the stream runs continuously from here: its first sample plays at this time
                self.first_heard_at = time.monotonic() - event.frame.duration
            self.heard.append(np.frombuffer(event.frame.data, np.int16).astype(np.float32) / 32768)

    async def wait_for_agent(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.first_heard_at is None:
            assert time.monotonic() < deadline, "the agent never joined or sent audio"
            await asyncio.sleep(0.05)

    async def say(self, audio: np.ndarray, *, chat_at: tuple[float, ...] = ()) -> None:
        """Publish ``audio`` in 10 ms frames at real-time pace; at each ``chat_at`` second also
        send a chat message, as the Agents Playground's chat box does (topic ``lk.chat``)."""
        self._talking = True
        await self._idle
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        start = time.monotonic()
        self.said_from = start
        chats = [int(t * RATE) // FRAME * FRAME for t in chat_at]
        for i in range(0, len(pcm) - FRAME + 1, FRAME):
            if i in chats:
                await self._room.local_participant.send_text("can you hear me?", topic="lk.chat")
            await self._source.capture_frame(
                rtc.AudioFrame(pcm[i : i + FRAME].tobytes(), RATE, 1, FRAME)
            )
            await asyncio.sleep(max(0.0, start + (i + FRAME) / RATE - time.monotonic()))

    def recording(self) -> np.ndarray:
        return np.concatenate(self.heard) if self.heard else np.zeros(0, np.float32)

    async def hang_up(self) -> None:
        self._talking = True
        await self._idle
        with suppress(AttributeError):
            await self._stream.aclose()
        with suppress(AttributeError):
            self._recording.cancel()
            await asyncio.gather(self._recording, return_exceptions=True)
        await self._source.aclose()
        await self._room.disconnect()


# -- analysis ---------------------------------------------------------------------------------
HOP = RATE // 200  # 5 ms envelope blocks


def _envelope(x: np.ndarray, hop: int = HOP) -> np.ndarray:
    blocks = x[: len(x) // hop * hop].reshape(-1, hop).astype(np.float64)
    return np.sqrt(np.mean(blocks**2, axis=1))


def _log_envelope(x: np.ndarray, hop: int = HOP) -> np.ndarray:
    """Log level per block, floored at -50 dBFS: quiet is quiet, whatever the codec made of it."""
    return np.log(np.maximum(_envelope(x, hop), 10 ** (-50 / 20)))


def echo_delay(caller: Caller, sent: np.ndarray) -> tuple[float, float]:
    """(mouth-to-ear seconds, correlation): where the sent speech is found in what came back.

    The recording starts at ``first_heard_at``; the lag at which its envelope best matches the
    sent one, plus that offset, is the time from the caller's mouth to the caller's ear.
    """
    heard = caller.recording()
    offset = caller.first_heard_at - caller.said_from  # recording time 0 on the sender's clock
    es, eh = _log_envelope(sent), _log_envelope(heard)
    best, best_lag = -1.0, 0
    for lag in range(0, len(eh) - len(es) // 2):
        n = min(len(es), len(eh) - lag)
        a, b = es[:n] - es[:n].mean(), eh[lag : lag + n] - eh[lag : lag + n].mean()
        score = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
        if score > best:
            best, best_lag = score, lag
    return offset + best_lag * HOP / RATE, best


def _dropouts(caller: Caller, sent: np.ndarray, delay: float) -> list[tuple[float, str]]:
    """(seconds, kind) for each run of near-digital silence where the echo should be loud.

    A run of 5 ms blocks below -80 dBFS while the sent speech, delayed by ``delay`` (the call's
    typical delay; each burst has its own, within tens of ms), is above -40 dBFS. Its kind:

    - ``"gap"``: sound just before and just after: playback ran dry in the middle of a burst
      and went on where it stopped;
    - ``"late start"``: the silence had begun before the speech it covers: a burst that began
      later than the call's typical delay (its onset latency);
    - ``"early end"``: sound before, silence after: a burst that ended sooner than the typical
      delay puts its end (its own delay was shorter), not a hole in it.
    """
    heard = caller.recording()
    start = int(round((delay - (caller.first_heard_at - caller.said_from)) * RATE))
    expected = np.zeros_like(heard)
    if start >= 0:
        n = min(len(sent), len(heard) - start)
        expected[start : start + n] = sent[:n]
    loud = _envelope(expected) > 10 ** (-40 / 20)
    silent = _envelope(heard) < 10 ** (-80 / 20)
    runs: list[tuple[float, str]] = []
    block = 0
    while block < len(loud):
        if not (loud[block] and silent[block]):
            block += 1
            continue
        first = block
        while block < len(loud) and loud[block] and silent[block]:
            block += 1
        if first == 0 or silent[first - 1]:
            kind = "late start"
        elif block < len(silent) and not silent[block]:
            kind = "gap"
        else:
            kind = "early end"
        runs.append(((block - first) * HOP / RATE, kind))
    return runs


def gaps_in_speech(caller: Caller, sent: np.ndarray, delay: float) -> list[float]:
    """Lengths (s) of the holes inside the agent's bursts: silence between sound, where the echo
    should be loud (an output queue that ran dry)."""
    return [seconds for seconds, kind in _dropouts(caller, sent, delay) if kind == "gap"]


def late_starts(caller: Caller, sent: np.ndarray, delay: float) -> list[float]:
    """How much later than the call's typical delay each late burst began (s); latency, which
    the per-window delays measure, not a gap."""
    return [seconds for seconds, kind in _dropouts(caller, sent, delay) if kind == "late start"]


def early_ends(caller: Caller, sent: np.ndarray, delay: float) -> list[float]:
    """How much sooner than the call's typical delay each early burst ended (s); not a gap."""
    return [seconds for seconds, kind in _dropouts(caller, sent, delay) if kind == "early end"]


def window_delays(caller: Caller, sent: np.ndarray, *, window_s: float = 1.0) -> list[float]:
    """Mouth-to-ear delay of each second of speech (its own best match, where it is clear)."""
    offset = caller.first_heard_at - caller.said_from
    found = envelope_delays(sent, caller.recording(), RATE, window_s=window_s)
    return [offset + delay for delay in found]


def envelope_delays(
    sent: np.ndarray, heard: np.ndarray, rate: int, *, window_s: float = 1.0
) -> list[float]:
    """Where each ``window_s`` of ``sent`` turns up in ``heard`` (s), where the match is clear.

    Window by window: an agent plays the model's output in gated bursts, so each burst can come
    back with a delay of its own. Silent windows are skipped.
    """
    hop = rate // 200  # 5 ms envelope blocks
    es, eh = _log_envelope(sent, hop), _log_envelope(heard, hop)
    width = int(window_s * rate / hop)
    delays = []
    for a in range(0, len(es) - width + 1, width // 2):
        window = es[a : a + width] - es[a : a + width].mean()
        if np.std(es[a : a + width]) < 0.5:
            continue  # silence: nothing to match
        scores = []
        for i in range(0, len(eh) - width):
            b = eh[i : i + width] - eh[i : i + width].mean()
            scores.append(float(window @ b / (np.linalg.norm(window) * np.linalg.norm(b) + 1e-12)))
        i = int(np.argmax(scores))
        if scores[i] > 0.8:
            delays.append((i - a) * hop / rate)
    return delays
