"""``DuplexSession``: the asyncio API every integration talks to (see docs/session_api.md).

A session owns one backend slot (a local engine's or a hertz server's). Caller audio of any
rate, channel count, dtype and frame size goes in through ``push_audio``; it is resampled
statefully to 16 kHz, mixed to mono and cut into 125 ms steps for the backend. The model's audio
comes back one chunk per step, resampled to the rate the caller asked for, through ``read()`` or
``async for``. The slot, the thread hop and the pairing of outputs with inputs live in
``hertz_agents.loop_slot``; resampling and the recording happen here, on the event loop, so the
engine's thread does no per-session work.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from hertz_agents.audio import rms
from hertz_agents.backend import Backend, PromptSource
from hertz_agents.errors import SessionClosed
from hertz_agents.loop_slot import LoopSlot, StepResult
from hertz_agents.metrics import SessionMetrics
from hertz_agents.recording import CallRecorder
from hertz_agents.resample import StepInput, StreamResampler
from hertz_agents.resolve import ModelSpec, open_backend
from hertz_agents.sampling import SamplingSettings
from hertz_agents.timing import SAMPLE_RATE

__all__ = ["DEFAULT_MAX_EARLY_STEPS", "DuplexSession", "OutputChunk"]

DEFAULT_MAX_EARLY_STEPS = 16
"""Input steps (2 s) a session keeps while its slot opens; older ones are dropped and counted."""

QUIET_RMS = 1e-3
"""Below this a step counts as quiet: the one dropped first when the reader falls behind."""


@dataclass
class OutputChunk:
    """One model step of audio: float32 mono at ``sample_rate``, with the backend's timing of it.

    ``input_seq`` is the number of the caller's step this chunk answers (caller steps are
    numbered 0, 1, 2... in the order ``push_audio`` completes them, early ones included; the
    numbers ``push_audio_nowait`` returns); None for a step the backend fed silence
    (``silence_input``). ``input_complete`` is the ``time.monotonic()`` at which that caller step
    was complete (its last sample pushed), so the chunk's latency so far is
    ``time.monotonic() - input_complete``; for a silence step it is only the backend's reference
    time (when the step was due; for a remote engine, when the step arrived). ``queue_ms`` is the
    wait from the input step being complete to the engine's batched step starting and
    ``compute_ms`` that step's duration (for a remote engine, both as measured on the server).
    """

    audio: np.ndarray
    sample_rate: int
    step: int
    rms: float  # of the 16 kHz step: lets gates tell speech from the model's quiet noise
    silence_input: bool = False
    input_complete: float = 0.0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    input_seq: int | None = None


class DuplexSession:
    """One full-duplex conversation with hertz-dev.

    Create it where an event loop runs, either at once (``DuplexSession(model, ...)``: the slot
    opens in the background, caller audio pushed meanwhile is kept, up to ``max_early_steps``
    steps, and fed once it opens; ``await session.wait_open()`` raises why it could not open),
    or with ``await DuplexSession.open(model, ...)``, which returns once the slot is open.

    Args:
        model: A model name or checkpoint directory (the process's shared engine for it is
            used), ``"hertz://host:port"`` for a hertz server, an engine object, or None for the
            default model.
        prompt: A WAV path, a prompt name known to the server, or stereo audio ``[2, n]``.
        sampling: The sampling settings (default: ``SamplingSettings()``).
        output_sample_rate: Rate of the audio the session yields.
        record_path: Optional stereo WAV of the call: caller | model.
        seed: Seed of the slot's sampler, for repeatable output.
        max_output_backlog: Output steps kept for a slow reader; beyond it quiet steps (else the
            oldest) are dropped and counted in ``metrics.dropped_output_steps``.
        max_early_steps: Input steps kept while the slot opens; older ones are dropped and
            counted in ``metrics.dropped_input_steps``.
        align_steps: Cut the caller's steps on the wall clock's 125 ms boundaries, shared by
            every session (see ``StepInput``), so calls that started apart share the engine's
            batched ticks. Applies to real-time frames shorter than half a step; it adds no
            latency. Off by default: calls that already arrive in step (started together) can
            be split one frame apart by it (see docs/engine.md).
    """

    def __init__(
        self,
        model: ModelSpec = None,
        *,
        prompt: PromptSource | None = None,
        sampling: SamplingSettings | None = None,
        output_sample_rate: int = SAMPLE_RATE,
        record_path: str | os.PathLike[str] | None = None,
        seed: int | None = None,
        max_output_backlog: int = 16,
        max_early_steps: int = DEFAULT_MAX_EARLY_STEPS,
        align_steps: bool = False,
    ) -> None:
        if output_sample_rate <= 0:
            raise ValueError(f"output_sample_rate must be positive, got {output_sample_rate}")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "create a DuplexSession where an event loop runs (in async code); it delivers "
                "its audio on that loop"
            ) from None
        self.output_sample_rate = output_sample_rate
        self._output_resampler = StreamResampler(SAMPLE_RATE, output_sample_rate)
        self._input: StepInput | None = None
        self._align_steps = align_steps
        self._outbox: deque[OutputChunk] = deque()
        self._has_output = asyncio.Event()
        self._max_output_backlog = max_output_backlog
        self._closed = False
        self._error: BaseException | None = None
        self._slot = LoopSlot(
            self._on_step, on_closed=self._backend_closed, max_early_steps=max(1, max_early_steps)
        )
        self._recorder = CallRecorder(record_path) if record_path is not None else None
        self._slot.start(open_backend(model), sampling=sampling, prompt=prompt, seed=seed)

    @classmethod
    async def open(
        cls,
        engine: ModelSpec = None,
        *,
        prompt: PromptSource | None = None,
        sampling: SamplingSettings | None = None,
        output_sample_rate: int = SAMPLE_RATE,
        record_path: str | os.PathLike[str] | None = None,
        seed: int | None = None,
        max_output_backlog: int = 16,
        align_steps: bool = False,
    ) -> DuplexSession:
        """Create a session on ``engine`` (any ``model=`` value) and wait until its slot is open.

        Raises what :meth:`wait_open` raises; cancelling it gives the slot back.
        """
        session = cls(
            engine,
            prompt=prompt,
            sampling=sampling,
            output_sample_rate=output_sample_rate,
            record_path=record_path,
            seed=seed,
            max_output_backlog=max_output_backlog,
            align_steps=align_steps,
        )
        try:
            await session.wait_open()
        except BaseException:
            session._close_now()
            raise
        return session

    async def wait_open(self) -> None:
        """Wait until the slot is open.

        Raises:
            EngineFull: No slot is free. ModelNotFound: the model is not installed.
            ServerUnavailable, AuthenticationFailed: a remote server refused or did not answer.
            SessionClosed: the session was closed before its slot opened.
        """
        await self._slot.wait_open()

    @property
    def is_open(self) -> bool:
        """The slot is open and the session not closed."""
        return self._slot.opened and not self._closed

    @property
    def backend(self) -> Backend | None:
        """The engine or server this session runs on (None until it is known)."""
        return self._slot.backend

    # -- input ------------------------------------------------------------------------------
    def push_audio_nowait(
        self, audio: bytes | np.ndarray, sample_rate: int, channels: int = 1
    ) -> list[int]:
        """Queue caller audio: int16 bytes or an int16/float array, any rate, any frame size.

        Returns:
            The sequence numbers of the steps this audio completed (``OutputChunk.input_seq``
            names them); empty when it completed none.
        """
        if self._closed:
            raise self._error or SessionClosed("this session is closed; open a new one")
        if self._input is None:
            self._input = StepInput(
                sample_rate, channels, clock=time.time if self._align_steps else None
            )
        seqs: list[int] = []
        for step in self._input.push(audio, sample_rate=sample_rate, channels=channels):
            seq = self._slot.submit(step)
            if seq is not None:
                seqs.append(seq)
        return seqs

    async def push_audio(
        self, audio: bytes | np.ndarray, sample_rate: int, channels: int = 1
    ) -> list[int]:
        """Same as :meth:`push_audio_nowait`; never waits on the model."""
        return self.push_audio_nowait(audio, sample_rate, channels)

    @property
    def alignment_samples(self) -> int:
        """16 kHz samples of silence put before the caller's first frame (see ``align_steps``).

        The caller's sample ``i`` is sample ``alignment_samples + i`` of the model's input.
        """
        return 0 if self._input is None else self._input.alignment_samples

    # -- output (on the event loop) -----------------------------------------------------------
    def _on_step(self, result: StepResult) -> None:
        out = self._output_resampler.process(result.audio)
        if self._recorder is not None:
            self._recorder.write(result.input_audio, result.audio)
        self._deliver(
            OutputChunk(
                out,
                self.output_sample_rate,
                result.step,
                rms(result.audio),
                result.silence_input,
                input_complete=result.input_complete,
                queue_ms=result.queue_ms,
                compute_ms=result.compute_ms,
                input_seq=result.seq,
            )
        )

    def _deliver(self, chunk: OutputChunk) -> None:
        if self._closed:
            return
        self._outbox.append(chunk)
        while len(self._outbox) > self._max_output_backlog:
            # The reader fell behind: drop a quiet step if there is one, else the oldest.
            quiet = next((c for c in self._outbox if c.rms < QUIET_RMS), None)
            self._outbox.remove(quiet if quiet is not None else self._outbox[0])
            self.metrics.dropped_output_steps += 1
        self._has_output.set()

    def _backend_closed(self, error: BaseException) -> None:
        """The backend ended this session, or it could not open: wake readers with the reason."""
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
        """The sampling settings in effect."""
        return self._slot.sampling

    def update_sampling(self, **changes: Any) -> SamplingSettings:
        """Change temperatures, top-p or min-p; takes effect from the next step."""
        settings = self._slot.sampling.replace(**changes)
        self._slot.update_sampling(settings)
        return settings

    @property
    def metrics(self) -> SessionMetrics:
        """This session's figures (``snapshot()`` gives a dict)."""
        return self._slot.metrics

    @property
    def closed(self) -> bool:
        """True once the session is closed, by its caller or by the backend."""
        return self._closed

    async def close(self) -> None:
        """Free the slot and finish the recording. Idempotent.

        A slot that is still being opened is given back as soon as it opens; ``close`` returns
        once it has been.
        """
        self._close_now()
        await self._slot.wait_released()

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._slot.close()
        self._close_recording()
        self._has_output.set()

    async def __aenter__(self) -> DuplexSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _close_recording(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
