"""``HertzDuplexService``: hertz-dev, the full-duplex audio model, as a Pipecat service.

The service sits between a transport's input and output::

    Pipeline([transport.input(), HertzDuplexService(), transport.output()])

It feeds every ``InputAudioRawFrame`` (any rate, any size) to a ``DuplexSession`` and pushes the
model's audio downstream as ``SpeechOutputAudioRawFrame``s at the pipeline's output rate, 8 model
steps a second, whether the caller speaks or not: the model listens and talks at once, so there
is no turn taking, no text and no LLM context. Every other frame passes through.

Full duplex also means an ``InterruptionFrame`` does not cut the model: it passes downstream like
any frame, and the model's audio is marked uninterruptible so transports keep playing it. The
model hears the caller all the time and stops talking by itself when it is talked over.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    ServiceUpdateSettingsFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.ai_service import AIService

from hertz_agents.audio import INT16_SCALE
from hertz_agents.engine import Engine, measure_quiet_level
from hertz_agents.errors import AudioInputError, SessionClosed
from hertz_agents.session import DuplexSession, OutputChunk
from pipecat_hertz.engines import is_loadable, start_loading
from pipecat_hertz.gate import AUTO, DEFAULT_THRESHOLD_DB, SpeechGate, threshold_db
from pipecat_hertz.pacing import OutputPacer
from pipecat_hertz.settings import SAMPLING_FIELDS, HertzDuplexSettings

INPUT_ERROR_INTERVAL_S = 1.0  # a stream of bad input frames is reported at most this often


def _model_label(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return type(model).__name__


def _to_pcm16(audio: np.ndarray) -> bytes:
    """float32 [n] in [-1, 1] -> int16 little-endian bytes."""
    return np.clip(audio * INT16_SCALE, -INT16_SCALE, INT16_SCALE - 1).astype("<i2").tobytes()


class HertzDuplexService(AIService):
    """Talk to hertz-dev from a Pipecat pipeline.

    Args:
        model: A model name (``"default"``, ``"hertz-dev"``...) or checkpoint directory, loaded once
            per process and shared by every service that names it (their steps are batched); an
            ``hertz_agents.engine.Engine``; or ``"hertz://host:port"`` for a remote inference server.
        settings: Initial settings (a delta over the defaults); see :class:`HertzDuplexSettings`.
        sample_rate: Rate of the audio the service pushes. Defaults to the pipeline's
            ``audio_out_sample_rate``; 16000, the model's rate, needs no resampling at all.
        frame_ms: Duration of the audio frames pushed downstream (the last frame of a model step
            may be shorter, so no audio waits for the next step).
        max_output_lead_ms: Audio that may stay queued downstream: when steps keep arriving with
            more than this still unplayed (the backlog after a stall), steps are dropped until the
            queue is short again, and a lead that remains is cut from the model's next pause, so a
            stall leaves no lasting delay (see ``pacing``). None plays every step, however late.
        audio_passthrough: Also push the caller's ``InputAudioRawFrame``s downstream (for a
            recorder placed after the service).
        seed: Seed of the session's sampling, for reproducible calls.
        record_path: Write the call (stereo WAV: caller | model, 16 kHz) to this file.
        **kwargs: Passed to ``AIService``.

    Metrics (with ``enable_metrics``): TTFB is the time from the caller's first audio to the
    model's first audio, and after each ``UserStoppedSpeakingFrame`` (when a VAD or turn
    strategy upstream produces them) the time until the model starts speaking. Processing time
    is reported for every model step: from the moment the service had the step's input to the
    moment its audio was pushed.
    """

    Settings = HertzDuplexSettings
    _settings: HertzDuplexSettings

    def __init__(
        self,
        *,
        model: str | os.PathLike[str] | Engine | Any = "default",
        settings: HertzDuplexSettings | None = None,
        sample_rate: int | None = None,
        frame_ms: int = 20,
        max_output_lead_ms: float | None = 100.0,
        audio_passthrough: bool = False,
        seed: int | None = None,
        record_path: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        store = HertzDuplexSettings.defaults(_model_label(model))
        if settings is not None:
            store.apply_update(settings)
        store.check()
        super().__init__(settings=store, **kwargs)
        if frame_ms <= 0:
            raise ValueError(f"frame_ms must be positive, got {frame_ms}")
        self._model = model
        self._init_sample_rate = sample_rate
        self._frame_ms = frame_ms
        self._audio_passthrough = audio_passthrough
        self._seed = seed
        self._record_path = Path(record_path) if record_path is not None else None
        # Start loading now (in a thread): by the time the pipeline is set up it may be done.
        self._engine_future = start_loading(model) if is_loadable(model) else None  # type: ignore[arg-type]
        self._backend: Any = None if self._engine_future is not None else model
        self._load_error: BaseException | None = None
        self._quiet_rms: float | None = None  # the model's quiet level, for the "auto" gate
        self._gate = SpeechGate(threshold_db=threshold_db(store.gate_threshold_db, None))  # type: ignore[arg-type]
        # None turns pacing off: every step is played, however late (for tests and measurements).
        self._pacer = OutputPacer(max_lead=max_output_lead_ms / 1000) if max_output_lead_ms is not None else None
        self._session: DuplexSession | None = None
        self._reader: asyncio.Task | None = None
        self._sessions_opened = 0
        self._sample_rate = 0
        self._reset_call_state()

    def _reset_call_state(self) -> None:
        self._gate.reset()
        if self._pacer is not None:
            self._pacer.reset()
        self._first_input = True
        self._first_output = True
        self._awaiting_reply = False
        self._last_input_error = 0.0

    # -- public ------------------------------------------------------------------------------
    @classmethod
    async def preload(
        cls, model: str | os.PathLike[str] = "default", *, prompt: str | None = None, **engine_options: Any
    ) -> Engine:
        """Load ``model``'s shared engine (once per process) without blocking the event loop.

        Call it when the process starts, before serving calls, so that no pipeline waits for the
        weights (Pipecat gives a pipeline 20 s to set up). ``prompt`` also computes that prompt's
        prefill, which is cached per engine. ``engine_options`` (``device``, ``dtype``,
        ``max_sessions``...) apply if this is the first load of ``model``.
        """
        engine = await asyncio.wrap_future(start_loading(model, **engine_options))
        if prompt is not None:
            session = await DuplexSession.open(engine, prompt=prompt)
            await session.close()
        return engine

    def can_generate_metrics(self) -> bool:
        return True

    @property
    def session(self) -> DuplexSession | None:
        """The live session (None before the pipeline starts or after it ends)."""
        return self._session

    @property
    def dropped_steps(self) -> int:
        """Model steps not played because the output queue was not draining (after a stall)."""
        return self._pacer.dropped_steps if self._pacer is not None else 0

    @property
    def trimmed_seconds(self) -> float:
        """Silence cut from the model's pauses to bring the output queue back to its minimum."""
        return self._pacer.trimmed_s if self._pacer is not None else 0.0

    @property
    def sample_rate(self) -> int:
        """Rate of the audio pushed downstream (known once the pipeline has started)."""
        return self._sample_rate

    # -- lifecycle ---------------------------------------------------------------------------
    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        await super().setup(setup)
        if self._engine_future is not None and self._backend is None:
            try:
                # Shielded: a setup timeout must not cancel a load other pipelines wait for.
                self._backend = await asyncio.shield(asyncio.wrap_future(self._engine_future))
            except Exception as e:  # reported once the pipeline starts and errors can travel
                self._load_error = e
        await self._measure_quiet_level()

    async def _measure_quiet_level(self) -> None:
        """For the "auto" gate: the local engine's quiet level (measured once per engine; a
        remote engine's is unknown and the gate uses its default threshold)."""
        if self._settings.gate_threshold_db == AUTO and isinstance(self._backend, Engine):
            self._quiet_rms = await asyncio.to_thread(measure_quiet_level, self._backend)
            if self._quiet_rms is None:
                logger.warning(
                    f"{self}: could not measure hertz-dev's quiet level; the gate uses {DEFAULT_THRESHOLD_DB} dBFS"
                )
        self._gate.threshold_db = threshold_db(self._settings.gate_threshold_db, self._quiet_rms)  # type: ignore[arg-type]

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        self._sample_rate = self._init_sample_rate or self.processor_setup.audio_out_sample_rate
        if self._load_error is not None:
            await self.push_error(
                f"{self}: could not load hertz-dev model {_model_label(self._model)!r}: {self._load_error}",
                exception=self._load_error if isinstance(self._load_error, Exception) else None,
                force_treat_as_permanent=True,
            )
            return
        await self._open_session()

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._close_session()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._close_session()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close_session()

    async def _open_session(self) -> None:
        record = self._record_path
        if record is not None and self._sessions_opened:  # a prompt change restarts: new file
            record = record.with_name(f"{record.stem}-{self._sessions_opened}{record.suffix}")
        try:
            session = await DuplexSession.open(
                self._backend,
                prompt=self._settings.prompt,  # type: ignore[arg-type]  # a full store: str | None
                sampling=self._settings.sampling(),
                output_sample_rate=self._sample_rate,
                record_path=record,
                seed=self._seed,
            )
        except Exception as e:
            await self.push_error(
                f"{self}: could not open a hertz-dev session: {e}", exception=e, force_treat_as_permanent=True
            )
            return
        old, self._session = self._session, session
        self._sessions_opened += 1
        self._reset_call_state()
        if old is not None:
            await old.close()
        self._reader = self.create_task(self._read_output(session), name="hertz_output")

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        reader, self._reader = self._reader, None
        if session is not None:
            await session.close()
        if reader is not None and reader is not asyncio.current_task():
            await self.cancel_task(reader)

    # -- frames ------------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self._push_input(frame)
            if self._audio_passthrough:
                await self.push_frame(frame, direction)
            await self._maybe_start_ttfb()
        elif isinstance(frame, ServiceUpdateSettingsFrame) and self._is_for_me(frame):
            delta = frame.delta if frame.delta is not None else self.Settings.from_mapping(frame.settings)
            await self._update_settings(delta)
        elif isinstance(frame, (UserStoppedSpeakingFrame, VADUserStoppedSpeakingFrame)):
            if self._session is not None and not self._gate.is_open and not self._awaiting_reply:
                self._awaiting_reply = True
                await self.start_ttfb_metrics()
            await self.push_frame(frame, direction)
        else:  # StartFrame, EndFrame, CancelFrame (handled above), InterruptionFrame, the rest
            await self.push_frame(frame, direction)

    def _is_for_me(self, frame: ServiceUpdateSettingsFrame) -> bool:
        if frame.service is not None:
            return frame.service is self
        return isinstance(frame.delta, HertzDuplexSettings)

    async def _push_input(self, frame: InputAudioRawFrame) -> None:
        session = self._session
        if session is None:
            return
        try:
            session.push_audio_nowait(frame.audio, frame.sample_rate, frame.num_channels)
        except AudioInputError as e:
            now = time.monotonic()
            if now - self._last_input_error >= INPUT_ERROR_INTERVAL_S:
                self._last_input_error = now
                await self.push_error(f"{self}: dropped caller audio: {e}", exception=e)
            return
        except SessionClosed:
            pass  # the reader reports a session that ended on its own

    async def _maybe_start_ttfb(self) -> None:
        if self._first_input and self._session is not None:
            self._first_input = False
            await self.start_ttfb_metrics()

    # -- settings ----------------------------------------------------------------------------
    async def _update_settings(self, delta: HertzDuplexSettings) -> dict[str, Any]:  # type: ignore[override]
        candidate = self._settings.copy()
        candidate.apply_update(delta)
        try:
            candidate.check()
        except ValueError as e:
            await self.push_error(f"{self}: settings not applied: {e}", exception=e)
            return {}
        changed = await super()._update_settings(delta)
        sampling = {name: getattr(self._settings, name) for name in SAMPLING_FIELDS if name in changed}
        if sampling and self._session is not None:
            self._session.update_sampling(**sampling)
        if "gate_threshold_db" in changed:
            await self._measure_quiet_level()
        if "prompt" in changed and self._session is not None:
            await self._open_session()  # the new prompt starts a new conversation
        self._warn_unhandled_updated_settings(set(changed) - {*SAMPLING_FIELDS, "gate_threshold_db", "prompt"})
        return changed

    # -- output ------------------------------------------------------------------------------
    async def _read_output(self, session: DuplexSession) -> None:
        try:
            async for chunk in session:
                await self._emit(chunk)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self.push_error(f"{self}: model output failed: {e}", exception=e)
            return
        if session is self._session:  # closed by the engine, not by us
            self._session = None
            await self.push_error(
                f"{self}: the hertz-dev session ended unexpectedly; the model is silent "
                "from now on (see the log for the engine's error)",
                force_treat_as_permanent=True,
            )

    async def _emit(self, chunk: OutputChunk) -> None:
        if self._session is None:
            return
        was_open = self._gate.is_open
        audio = self._gate.process(chunk.audio, chunk.rms, chunk.sample_rate)
        if len(audio) == 0:
            return
        duration = len(audio) / chunk.sample_rate
        silent_end = 0.0 if self._gate.is_open else duration - (self._gate.fade_ms / 1000 if was_open else 0.0)
        cut = 0.0 if self._pacer is None else self._pacer.admit(duration, time.monotonic(), silent_end=silent_end)
        if cut is None:
            logger.debug(f"{self}: dropped model step {chunk.step}: the output queue is not draining (a stall)")
            return
        audio = audio[: len(audio) - int(round(cut * chunk.sample_rate))]
        if len(audio) == 0:
            return
        pcm = _to_pcm16(audio)
        emitted_at = time.time()
        # Pipecat's metrics take wall times; the engine stamps the input step on the monotonic clock
        ready_at = None if chunk.silence_input else emitted_at - (time.monotonic() - chunk.input_complete)
        frame_bytes = 2 * max(1, chunk.sample_rate * self._frame_ms // 1000)
        for start in range(0, len(pcm), frame_bytes):
            frame = SpeechOutputAudioRawFrame(pcm[start : start + frame_bytes], chunk.sample_rate, 1)
            frame.interruptible = False  # full duplex: the model decides when to stop talking
            await self.push_frame(frame)
        await self._report_metrics(
            ready_at, emitted_at, opened=self._gate.is_open and not was_open, from_input=not chunk.silence_input
        )

    async def _report_metrics(
        self, ready_at: float | None, emitted_at: float, *, opened: bool, from_input: bool
    ) -> None:
        if self._first_output and from_input:
            self._first_output = False
            await self.stop_ttfb_metrics(end_time=emitted_at)
        elif self._awaiting_reply and opened:
            self._awaiting_reply = False
            await self.stop_ttfb_metrics(end_time=emitted_at)
        if ready_at is not None:
            await self.start_processing_metrics(start_time=ready_at)
            await self.stop_processing_metrics(end_time=emitted_at)
