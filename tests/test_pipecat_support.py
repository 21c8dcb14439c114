"""Shared helpers for the Pipecat tests (this module holds no tests).

Fakes here, and why they are needed:

- ``identity_engine`` (from ``early_audio``): the real ``Engine`` whose network is replaced by
  the identity (each step's output is its input). The tiny model makes noise unrelated to its
  input, so only an echo lets a test find which output belongs to which input and measure latency
  by correlation.
- ``FakeSpeaker``: a Pipecat output transport that plays into a clock instead of a sound card,
  recording what it played and when. Pipecat's own output logic (chunking, bot-speaking
  detection, interruptions) runs unchanged above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp
import numpy as np
from early_audio import identity_engine as identity_engine  # re-exported for the Pipecat tests
from pipecat.frames.frames import EndFrame, Frame, InputAudioRawFrame
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS

ENVELOPE_HOP_S = 0.005


def speech_like(
    seconds: float,
    rate: int,
    *,
    seed: int = 0,
    level_db: float = -20.0,
    gap_level_db: float | None = None,
    max_gap_s: float = 0.3,
) -> np.ndarray:
    """Syllable-like bursts of a harmonic tone with random pitch and length, and random gaps.

    The random structure makes the envelope unique, so a delayed copy can be found (``delay_s``).
    ``gap_level_db`` fills the gaps with faint noise at that level (None: digital silence); gaps
    last 50 ms to ``max_gap_s``.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    out = np.zeros(n, dtype=np.float64)
    if gap_level_db is not None:
        out += rng.standard_normal(n) * 10 ** (gap_level_db / 20)
    gain = 10 ** (level_db / 20) * np.sqrt(2)
    i = int(rng.uniform(0.05, 0.2) * rate)
    while i < n:
        length = min(int(rng.uniform(0.08, 0.25) * rate), n - i)
        t = np.arange(length) / rate
        f0 = rng.uniform(100, 220) * (1 + 0.05 * np.sin(2 * np.pi * 5 * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        tone = sum(np.sin(k * phase) / k for k in range(1, 12) if k * 220 < 0.45 * rate)
        ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        burst = tone * ramp
        out[i : i + length] = burst / (np.sqrt(np.mean(burst**2)) + 1e-9) * gain / np.sqrt(2)
        i += length + int(rng.uniform(0.05, max_gap_s) * rate)
    return out.astype(np.float32)


def to_pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1 - 1 / 32768) * 32768).astype("<i2").tobytes()


def from_pcm16(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<i2").astype(np.float32) / 32768


def timeline(
    pieces: Sequence[tuple[float, np.ndarray]], t0: float, seconds: float, rate: int
) -> np.ndarray:
    """Place (start time, samples) pieces on one signal that starts at ``t0``."""
    out = np.zeros(int(seconds * rate) + rate, dtype=np.float32)
    for start, samples in pieces:
        i = int(round((start - t0) * rate))
        if 0 <= i < len(out):
            j = min(len(out), i + len(samples))
            out[i:j] = samples[: j - i]
    return out[: int(seconds * rate)]


def envelope(x: np.ndarray, rate: int) -> np.ndarray:
    """Log RMS per ``ENVELOPE_HOP_S`` block."""
    hop = int(rate * ENVELOPE_HOP_S)
    blocks = x[: len(x) // hop * hop].reshape(-1, hop)
    return np.log(np.sqrt(np.mean(blocks.astype(np.float64) ** 2, axis=1)) + 1e-4)


def best_lag(es: np.ndarray, er: np.ndarray, a: int, b: int, max_lag: int) -> int:
    """The lag (in envelope blocks) at which ``es`` best matches ``er[a:b]``."""
    window = er[a:b] - er[a:b].mean()
    scores = []
    for lag in range(0, min(a, max_lag) + 1):
        ref = es[a - lag : b - lag] - es[a - lag : b - lag].mean()
        scores.append(float(window @ ref / (np.linalg.norm(window) * np.linalg.norm(ref) + 1e-12)))
    return int(np.argmax(scores))


def delay_s(
    sent: np.ndarray,
    received: np.ndarray,
    rate: int,
    *,
    start_s: float,
    end_s: float,
    max_delay_s: float = 1.5,
    window_s: float = 0.5,
) -> tuple[float, float]:
    """Delay of ``received`` behind ``sent`` within [start_s, end_s] of ``received``.

    Envelopes are matched in consecutive ``window_s`` windows that have sound in them; returns
    the median delay and the share of those windows that agree with it within 30 ms. An echo
    gives the same delay in (nearly) every window; unrelated audio gives scattered ones, so the
    agreement says whether the echo was found at all (one window alone can match noise well by
    chance).
    """
    es, er = envelope(sent, rate), envelope(received, rate)
    hop = ENVELOPE_HOP_S
    step, end = int(window_s / hop), min(int(end_s / hop), len(er))
    active = er > np.log(1e-3)  # blocks louder than -60 dBFS
    starts = range(int(start_s / hop), end - step + 1, step)
    # A window that is mostly pause says nothing about the delay: only windows with sound count.
    lags = [
        best_lag(es, er, a, a + step, int(max_delay_s / hop))
        for a in starts
        if active[a : a + step].mean() > 0.4
    ]
    if not lags:
        return 0.0, 0.0
    median = float(np.median(lags))
    agree = float(np.mean([abs(lag - median) * hop <= 0.03 for lag in lags]))
    return median * hop, agree


def playout_latencies(
    audio: np.ndarray,
    rate: int,
    t0: float,
    frame_s: float,
    played: Sequence[tuple[float, np.ndarray]],
) -> np.ndarray:
    """[k, 2]: (play time, latency) of every played chunk found verbatim in the caller's audio.

    For an echo played without resampling (the identity model, 16 kHz end to end), each chunk
    the speaker played is a run of the caller's samples: its latency is exact, from the time the
    caller's frame holding its first sample was sent (``feed_realtime`` from ``t0``) to the
    time it started playing. Silent chunks (and the gate's ramps) match nothing and are skipped.
    """
    pcm = np.frombuffer(to_pcm16(audio), dtype="<i2")
    frame = int(rate * frame_s)
    index: dict[tuple[int, bytes], int] = {}
    found = []
    for start, samples in played:
        n = len(samples)
        if (n, b"") not in index:  # index the caller's audio for chunks of this length, once
            index[(n, b"")] = 0
            stride = int(np.gcd(frame, np.gcd(n, SAMPLES_PER_STEP * rate // SAMPLE_RATE)))
            for p in range(0, len(pcm) - n + 1, stride):
                index.setdefault((n, pcm[p : p + n].tobytes()), p)
        chunk = to_pcm16(samples)
        p = index.get((n, chunk)) if any(chunk) else None
        if p is not None:
            found.append((start, start - (t0 + (p // frame) * frame_s)))
    return np.array(found).reshape(-1, 2)


class FakeSpeaker(BaseOutputTransport):
    """An output transport that plays into a real-time clock (a fake of a sound card).

    ``played`` lists (monotonic start time, float32 samples) of every chunk, in playout order.
    """

    def __init__(self, params: TransportParams | None = None, **kwargs) -> None:
        super().__init__(
            params or TransportParams(audio_out_enabled=True, audio_out_10ms_chunks=2), **kwargs
        )
        self.played: list[tuple[float, np.ndarray]] = []
        self._clock = 0.0

    async def start(self, frame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame) -> bool:
        start = max(self._clock, time.monotonic())  # an empty device starts at once
        self.played.append((start, from_pcm16(frame.audio)))
        self._clock = start + frame.num_frames / frame.sample_rate
        # Like a device with a 10 ms buffer: the write returns as the chunk's end starts playing.
        await asyncio.sleep(max(0.0, self._clock - 0.01 - time.monotonic()))
        return True


class Probe(FrameProcessor):
    """Records (monotonic time, frame) of every frame of the given types going downstream."""

    def __init__(self, *types: type[Frame]) -> None:
        super().__init__(enable_direct_mode=True)
        self.types = types or (Frame,)
        self.seen: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM and isinstance(frame, self.types):
            self.seen.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)


class FrameLog(BaseObserver):
    """Observer recording (monotonic time, frame) of frames of ``types``.

    Only frames pushed downstream by ``source`` count.
    """

    def __init__(self, source: FrameProcessor, *types: type[Frame]) -> None:
        super().__init__()
        self.source, self.types = source, types
        self.frames: list[tuple[float, Frame]] = []
        self._ids: set[int] = set()

    async def on_push_frame(self, data: FramePushed) -> None:
        if data.direction != FrameDirection.DOWNSTREAM or data.source is not self.source:
            return
        if isinstance(data.frame, self.types) and data.frame.id not in self._ids:
            self._ids.add(data.frame.id)
            self.frames.append((time.monotonic(), data.frame))


async def run_pipeline(
    processors: list[FrameProcessor],
    feed: Callable[[PipelineWorker], Awaitable[None]],
    *,
    params: PipelineParams | None = None,
    observers: list[BaseObserver] | None = None,
    feed_at_once: bool = False,
    **worker_options,
) -> None:
    """Run ``processors`` as a pipeline; ``feed(worker)`` queues frames, then the pipeline ends.

    The feed starts once the pipeline has started (its ``StartFrame`` went through every
    processor), or at once with ``feed_at_once``, as a transport's input does: it reads audio as
    soon as it has started itself, whatever the processors after it are still doing.
    ``worker_options`` go to ``PipelineWorker`` (by default the idle timeout cancels nothing).
    """
    worker_options.setdefault("cancel_on_idle_timeout", False)
    worker = PipelineWorker(
        Pipeline(processors),
        params=params or PipelineParams(),
        observers=observers or [],
        **worker_options,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker, _frame):
        started.set()

    async def drive() -> None:
        if not feed_at_once:
            await asyncio.wait_for(started.wait(), timeout=30)
        await feed(worker)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), drive())


async def feed_realtime(
    worker: PipelineWorker,
    audio: np.ndarray,
    rate: int,
    *,
    frame_s: float = 0.02,
    on_frame: Callable[[int, float], None] | None = None,
) -> float:
    """Queue ``audio`` as InputAudioRawFrames on a real-time schedule; returns the start time."""
    step = int(rate * frame_s)
    t0 = time.monotonic()
    for k, i in enumerate(range(0, len(audio) - step + 1, step)):
        delay = t0 + k * frame_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if on_frame is not None:
            on_frame(k, time.monotonic())
        await worker.queue_frame(InputAudioRawFrame(to_pcm16(audio[i : i + step]), rate, 1))
    return t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def identity_server(model_dir, token: str = "pipecat-test-token-0123456789"):
    """The project's inference server on loopback, in this process, serving ``identity_engine``
    (a fake model that echoes); yields (engine, its ``hertz://`` URL)."""
    from aiohttp import web

    from hertz_agents.server.app import HertzServer, ServerConfig

    engine = identity_engine(model_dir)
    app = HertzServer(engine, ServerConfig(token=token)).make_app()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield engine, f"hertz://127.0.0.1:{runner.addresses[0][1]}?token={token}"
    finally:
        await runner.cleanup()
        engine.close()


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def _spawn(command: list[str], log: Path, env: dict | None) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        env = {**os.environ, **(env or {})}
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


@contextlib.asynccontextmanager
async def example_bot(example: Path, *args: str, log: Path, env: dict | None = None, timeout=120.0):
    """Run an example bot as a user does, under Pipecat's development runner, in a subprocess on
    a free local port; yields its base URL once it answers (its output goes to ``log``)."""
    port = free_port()
    command = [sys.executable, str(example), *args, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    bot = _spawn(command, log, env)
    try:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                assert bot.poll() is None, f"the bot exited: {_tail(log)}"
                try:
                    async with http.get(f"{url}/api/model") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"the bot did not start: {_tail(log)}"
                await asyncio.sleep(0.3)
        yield url
    finally:
        bot.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(bot.wait, 20)
        except subprocess.TimeoutExpired:
            bot.kill()
            bot.wait()


__all__ = [
    "SAMPLE_RATE",
    "SAMPLES_PER_STEP",
    "STEP_SECONDS",
    "FakeSpeaker",
    "FrameLog",
    "Probe",
    "delay_s",
    "envelope",
    "example_bot",
    "feed_realtime",
    "free_port",
    "from_pcm16",
    "identity_engine",
    "identity_server",
    "playout_latencies",
    "run_pipeline",
    "speech_like",
    "timeline",
    "to_pcm16",
]
