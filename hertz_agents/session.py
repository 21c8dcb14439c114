"""``DuplexSession``: the asyncio API every integration talks to (see docs/session_api.md).

A session owns one engine slot. Caller audio of any rate, channel count, dtype and frame size
goes in through ``push_audio``; it is resampled statefully to 16 kHz, mixed to mono and cut into
125 ms steps that the engine's worker thread consumes. The model's audio comes back one chunk
per step, resampled to the rate the caller asked for, through ``read()`` or ``async for``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from hertz_agents.audio import rms
from hertz_agents.errors import SessionClosed
from hertz_agents.metrics import SessionMetrics
from hertz_agents.resample import StepInput, StreamResampler
from hertz_agents.sampling import SamplingSettings
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

REMOTE_SCHEME = "hertz://"


@dataclass
class OutputChunk:
    """One model step of audio: float32 mono at ``sample_rate``, with the engine's timing of it.

    ``input_complete`` is the ``time.monotonic()`` at which the caller's step this chunk answers
    was complete (its last sample pushed), so the chunk's latency so far is
    ``time.monotonic() - input_complete``. A step the engine fed silence (``silence_input``)
    answers no caller step: there it is only the engine's reference time (when the step was due;
    for a remote engine, when the step arrived). ``queue_ms`` is the wait from the input step being
    complete to the engine's batched step starting and ``compute_ms`` that step's duration (for a
    remote engine, both as measured on the server).
    """

    audio: np.ndarray
    sample_rate: int
    step: int
    rms: float  # of the 16 kHz step: lets gates tell speech from the model's quiet noise
    silence_input: bool = False
    input_complete: float = 0.0
    queue_ms: float = 0.0
    compute_ms: float = 0.0


class DuplexSession:
    """One full-duplex conversation with hertz-dev. Create it with :meth:`open`."""

    def __init__(self, *, output_sample_rate: int, record_path: str | os.PathLike[str] | None,
                 max_output_backlog: int) -> None:
        self._loop = asyncio.get_running_loop()
        self.output_sample_rate = output_sample_rate
        self._output_resampler = StreamResampler(SAMPLE_RATE, output_sample_rate)
        self._input: StepInput | None = None
        self._outbox: deque[OutputChunk] = deque()
        self._has_output = asyncio.Event()
        self._max_output_backlog = max_output_backlog
        self._handle: Any = None
        self._closed = False
        self._error: BaseException | None = None
        self._record_lock = threading.Lock()
        self._record: sf.SoundFile | None = None
        self._record_model_prev = np.zeros(SAMPLES_PER_STEP, dtype=np.float32)
        if record_path is not None:
            self._record = sf.SoundFile(str(record_path), "w", SAMPLE_RATE, 2, subtype="PCM_16")

    @classmethod
    async def open(
        cls,
        engine: Any = None,
        *,
        prompt: str | Path | np.ndarray | None = None,
        sampling: SamplingSettings | None = None,
        output_sample_rate: int = SAMPLE_RATE,
        record_path: str | os.PathLike[str] | None = None,
        seed: int | None = None,
        max_output_backlog: int = 16,
    ) -> DuplexSession:
        """Open a session on ``engine``: an :class:`Engine`, a model name or directory (the
        process's shared engine for it is used), ``"hertz://host:port"`` for a remote server, or
        None for the default model."""
        if output_sample_rate <= 0:
            raise ValueError(f"output_sample_rate must be positive, got {output_sample_rate}")
        session = cls(output_sample_rate=output_sample_rate, record_path=record_path,
                      max_output_backlog=max_output_backlog)
        backend = await session._backend(engine)
        opening = asyncio.ensure_future(
            asyncio.to_thread(
                backend.open, session._on_output, sampling=sampling, prompt=prompt, seed=seed,
                on_closed=session._on_backend_closed,
            )
        )
        try:
            session._handle = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The slot is being taken on another thread: give it back as soon as it arrives.
            opening.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().close())
            session._close_recording()
            raise
        except BaseException:
            session._close_recording()
            raise
        return session

    @staticmethod
    async def _backend(engine: Any) -> Any:
        if isinstance(engine, str) and engine.startswith(REMOTE_SCHEME):
            from hertz_agents.server.client import RemoteEngine

            return await RemoteEngine.connect(engine)
        if engine is None or isinstance(engine, (str, os.PathLike)):
            from hertz_agents.engine import load_engine

            return await asyncio.to_thread(load_engine, engine or "default")
        return engine

    # -- input ------------------------------------------------------------------------------
    def push_audio_nowait(self, audio: bytes | np.ndarray, sample_rate: int, channels: int = 1) -> None:
        """Queue caller audio: int16 bytes or an int16/float array, any rate, any frame size."""
        if self._closed:
            raise self._error or SessionClosed("this session is closed; open a new one")
        if self._input is None:
            self._input = StepInput(sample_rate, channels)
        now = time.monotonic()
        for step in self._input.push(audio, sample_rate=sample_rate, channels=channels):
            self._handle.submit(step, now)

    async def push_audio(self, audio: bytes | np.ndarray, sample_rate: int, channels: int = 1) -> None:
        """Same as :meth:`push_audio_nowait`; never waits on the model."""
        self.push_audio_nowait(audio, sample_rate, channels)

    # -- output -----------------------------------------------------------------------------
    def _on_output(self, audio: np.ndarray, info: Any) -> None:
        """Called on the engine's thread with one 16 kHz step."""
        out = self._output_resampler.process(audio)
        chunk = OutputChunk(
            out, self.output_sample_rate, info.step, rms(audio), info.silence_input,
            input_complete=info.input_complete, queue_ms=info.queue_ms, compute_ms=info.compute_ms,
        )
        self._write_recording(info.input_audio, audio)
        try:
            self._loop.call_soon_threadsafe(self._deliver, chunk)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            pass

    def _deliver(self, chunk: OutputChunk) -> None:
        if self._closed:
            return
        self._outbox.append(chunk)
        while len(self._outbox) > self._max_output_backlog:
            # The reader fell behind: drop a quiet step if there is one, else the oldest.
            quiet = next((c for c in self._outbox if c.rms < 1e-3), None)
            self._outbox.remove(quiet if quiet is not None else self._outbox[0])
            self.metrics.dropped_output_steps += 1
        self._has_output.set()

    def _on_backend_closed(self, error: BaseException) -> None:
        """The engine or server ended this session (any thread): wake readers with the reason."""
        try:
            self._loop.call_soon_threadsafe(self._backend_closed, error)
        except RuntimeError:  # the event loop is gone
            pass

    def _backend_closed(self, error: BaseException) -> None:
        if self._closed:
            return
        self._error, self._closed = error, True
        self._close_recording()
        self._has_output.set()

    async def read(self) -> OutputChunk:
        """The next output chunk; raises SessionClosed (or the backend's reason) once closed."""
        while not self._outbox:
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise SessionClosed("this session is closed")
            self._has_output.clear()
            await self._has_output.wait()
        return self._outbox.popleft()

    def __aiter__(self) -> DuplexSession:
        return self

    async def __anext__(self) -> OutputChunk:
        try:
            return await self.read()
        except SessionClosed as e:
            if e is self._error:
                raise  # ended by the backend (server gone, engine closed): not a normal end
            raise StopAsyncIteration from None

    # -- control ----------------------------------------------------------------------------
    @property
    def sampling(self) -> SamplingSettings:
        return self._handle.sampling

    def update_sampling(self, **changes: float | None) -> SamplingSettings:
        """Change temperatures, top-p or min-p; takes effect from the next step."""
        settings = self._handle.sampling.replace(**changes)
        self._handle.update_sampling(settings)
        return settings

    @property
    def metrics(self) -> SessionMetrics:
        return self._handle.metrics

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Free the engine slot and finish the recording. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._handle is not None:
            self._handle.close()
        self._close_recording()
        self._has_output.set()

    async def __aenter__(self) -> DuplexSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- recording --------------------------------------------------------------------------
    def _write_recording(self, caller: np.ndarray | None, model: np.ndarray) -> None:
        """Caller | model, aligned as heard: the model's answer plays one step after its input."""
        with self._record_lock:
            if self._record is None:
                return
            left = caller if caller is not None else np.zeros(SAMPLES_PER_STEP, dtype=np.float32)
            self._record.write(np.stack([left, self._record_model_prev], axis=1).clip(-1, 1))
            self._record_model_prev = model

    def _close_recording(self) -> None:
        with self._record_lock:
            if self._record is not None:
                self._record.close()
                self._record = None
