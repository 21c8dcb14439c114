"""``HertzDuplexService``: hertz-dev, the full-duplex audio model, as a Pipecat service.

The service sits between a transport's input and output::

    Pipeline([transport.input(), HertzDuplexService(), transport.output()])

It feeds every ``InputAudioRawFrame`` (any rate, any size) to a ``DuplexSession`` and pushes the
model's audio downstream as ``SpeechOutputAudioRawFrame``s at the pipeline's output rate, 8 model
steps a second, whether the caller speaks or not: the model listens and talks at once, so there
is no turn taking, no text and no LLM context. The caller's audio and every other frame pass on,
so a recorder or a speech-to-text after the service hears both sides.

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

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    MetricsFrame,
    ServiceMetadataFrame,
    ServiceUpdateSettingsFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    UserSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import ProcessingMetricsData
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.ai_service import AIService
from pipecat.utils.types import is_given

from hertz_agents.audio import float_to_pcm16
from hertz_agents.engine import Engine, measure_quiet_level
from hertz_agents.errors import AudioInputError, SessionClosed
from hertz_agents.session import DuplexSession, OutputChunk
from pipecat_hertz.engines import is_loadable, start_loading
from pipecat_hertz.gate import AUTO, DEFAULT_THRESHOLD_DB, SpeechGate, threshold_db
from pipecat_hertz.metrics import StepStats
from pipecat_hertz.pacing import OutputPacer
from pipecat_hertz.playout import shape_step
from pipecat_hertz.settings import RUNTIME_FIELDS, SAMPLING_FIELDS, HertzDuplexSettings, delta_for
from pipecat_hertz.turns import caller_speech_level, full_duplex_turn_strategies

INPUT_ERROR_INTERVAL_S = 1.0  # a stream of bad input frames is reported at most this often
MAX_SESSION_REOPENS = 2  # delivery failures in one call that reopen the session; the next ends it
USER_SPEAKING_INTERVAL_S = 0.2  # as Pipecat's VAD: how often the caller's speech is announced


def _model_label(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return type(model).__name__


class HertzDuplexService(AIService):
    """Talk to hertz-dev from a Pipecat pipeline.

    Args:
        model: A model name (``"default"``, ``"hertz-dev"``...) or checkpoint directory, loaded once
            per process and shared by every service that names it (their steps are batched); an
            ``hertz_agents.engine.Engine``; or ``"hertz://host:port"`` for a remote inference
            server. ``settings=HertzDuplexSettings(model=...)`` may name it instead; None (both
            unset) is ``"default"``.
        settings: Initial settings (a delta over the defaults); see :class:`HertzDuplexSettings`.
        sample_rate: Rate of the audio the service pushes. Defaults to the pipeline's
            ``audio_out_sample_rate``; 16000, the model's rate, needs no resampling at all.
        frame_ms: Duration of the audio frames pushed downstream (the last frame of a model step
            may be shorter, so no audio waits for the next step).
        max_output_lead_ms: Audio that may stay queued downstream: when steps keep arriving with
            more than this still unplayed (the backlog after a stall), steps are dropped until the
            queue is short again, and a lead that remains is cut from the model's next pause, so a
            stall leaves no lasting delay (see ``pacing``). None plays every step, however late.
        audio_passthrough: Push the caller's ``InputAudioRawFrame``s on downstream (the default,
            as Pipecat's speech-to-speech services do), so that an ``AudioBufferProcessor`` or a
            speech-to-text after the service hears the caller. False consumes them.
        seed: Shorthand for ``settings=HertzDuplexSettings(seed=...)``.
        record_path: Write the call (stereo WAV: caller | model, 16 kHz) to this file.
        **kwargs: Passed to ``AIService``.

    Metrics (with ``enable_metrics``): TTFB is the time from the caller's first audio to the
    model's first audio, and after each ``UserStoppedSpeakingFrame`` (when a VAD or turn
    strategy upstream produces them) the time until the model starts speaking. Processing time
    (from the moment the service had a step's input to the moment its audio was pushed) is
    reported as its mean once a second, and the call's summary is logged when it ends.
    """

    Settings = HertzDuplexSettings
    _settings: HertzDuplexSettings

    def __init__(
        self,
        *,
        model: str | os.PathLike[str] | Engine | Any = None,
        settings: HertzDuplexSettings | None = None,
        sample_rate: int | None = None,
        frame_ms: int = 20,
        max_output_lead_ms: float | None = 100.0,
        audio_passthrough: bool = True,
        seed: int | None = None,
        record_path: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        model = self._choose_model(model, settings)
        store = HertzDuplexSettings.defaults(_model_label(model))
        if settings is not None:
            store.apply_update(settings)
        store.model = _model_label(model)
        if seed is not None:
            store.seed = seed
        store.check()
        super().__init__(settings=store, **kwargs)
        if frame_ms <= 0:
            raise ValueError(f"frame_ms must be positive, got {frame_ms}")
        self._model = model
        self._init_sample_rate = sample_rate
        self._frame_ms = frame_ms
        self._audio_passthrough = audio_passthrough
        self._record_path = Path(record_path) if record_path is not None else None
        # Start loading now (in a thread): by the time the pipeline is set up it may be done.
        self._engine_future = start_loading(model) if is_loadable(model) else None
        self._backend: Any = None if self._engine_future is not None else model
        self._load_error: BaseException | None = None
        self._quiet_rms: float | None = None  # the model's quiet level, for the "auto" gate
        self._gate = SpeechGate(threshold_db=threshold_db(store.gate_threshold_db, None))  # type: ignore[arg-type]
        # None turns pacing off: every step is played, however late (for tests and measurements).
        self._pacer = (
            OutputPacer(max_lead=max_output_lead_ms / 1000)
            if max_output_lead_ms is not None
            else None
        )
        self._session: DuplexSession | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sessions_opened = 0
        self._delivery_failures = 0
        self._sample_rate = 0
        self._stats = StepStats()
        self._user_speaking_at = 0.0
        self._reset_call_state()

    @staticmethod
    def _choose_model(model: Any, settings: HertzDuplexSettings | None) -> Any:
        """The ``model=`` argument or ``settings.model``; both given and different is an error."""
        named = settings.model if settings is not None and is_given(settings.model) else None
        if named is not None and model is not None and _model_label(model) != named:
            raise ValueError(
                f"model={_model_label(model)!r} and settings.model={named!r} disagree: "
                "give the model once"
            )
        return model if model is not None else (named or "default")

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
        cls,
        model: str | os.PathLike[str] = "default",
        *,
        prompt: str | None = None,
        **engine_options: Any,
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
        """Return True: the service reports TTFB and processing metrics."""
        return True

    def service_metadata_frame(self) -> ServiceMetadataFrame:
        """Tell user aggregators around the service to keep their turns but never interrupt.

        The model hears the caller all the time and decides by itself when to stop talking.
        """
        return ServiceMetadataFrame(
            service_name=self.name, user_turn_strategies=full_duplex_turn_strategies()
        )

    @property
    def session(self) -> DuplexSession | None:
        """The live session (None before the pipeline starts or after it ends)."""
        return self._session

    @property
    def stats(self) -> StepStats:
        """This call's step statistics (processing times, stalls, dropped steps)."""
        return self._stats

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
        """Wait for the engine being loaded (a failure is kept for ``start``); set the gate."""
        await super().setup(setup)
        if self._engine_future is not None and self._backend is None:
            try:
                # Shielded: a setup timeout must not cancel a load other pipelines wait for.
                self._backend = await asyncio.shield(asyncio.wrap_future(self._engine_future))
            except Exception as e:  # reported once the pipeline starts and errors can travel
                self._load_error = e
        await self._measure_quiet_level()

    async def _measure_quiet_level(self) -> None:
        """Set the gate's threshold; for the "auto" gate, from the engine's quiet level.

        The quiet level is measured once per local engine; a remote engine's is unknown and
        the gate uses its default threshold.
        """
        if self._settings.gate_threshold_db == AUTO and isinstance(self._backend, Engine):
            self._quiet_rms = await asyncio.to_thread(measure_quiet_level, self._backend)
            if self._quiet_rms is None:
                logger.warning(
                    f"{self}: could not measure hertz-dev's quiet level; "
                    f"the gate uses {DEFAULT_THRESHOLD_DB} dBFS"
                )
        self._gate.threshold_db = threshold_db(self._settings.gate_threshold_db, self._quiet_rms)  # type: ignore[arg-type]

    async def start(self, frame: StartFrame) -> None:
        """Fix the output sample rate and open the session, or report why it cannot open.

        The first slot is waited for here, as the StartFrame passes: caller audio queues behind
        the StartFrame meanwhile (nothing is lost), and a slot that cannot open is reported while
        the pipeline starts, where Pipecat's unusable-processor policy sees it for certain (an
        error pushed from a background task as the pipeline starts could be missed).
        """
        await super().start(frame)
        self._sample_rate = self._init_sample_rate or self.processor_setup.audio_out_sample_rate
        if self._load_error is not None:
            await self.push_error(
                f"{self}: could not load hertz-dev model {_model_label(self._model)!r}: "
                f"{self._load_error}",
                exception=self._load_error if isinstance(self._load_error, Exception) else None,
                force_treat_as_permanent=True,
            )
            return
        await self._open_session(wait=True)

    async def stop(self, frame: EndFrame) -> None:
        """Close the session at the end of the pipeline."""
        await super().stop(frame)
        await self._close_session()

    async def cancel(self, frame: CancelFrame) -> None:
        """Close the session when the pipeline is cancelled."""
        await super().cancel(frame)
        await self._close_session()

    async def cleanup(self) -> None:
        """Close the session if it is still open."""
        await super().cleanup()  # type: ignore[no-untyped-call]  # Pipecat's, untyped
        await self._close_session()

    def _new_session(self, settings: HertzDuplexSettings) -> DuplexSession:
        """Create a session with ``settings`` (the one place sessions are made).

        It returns at once: the slot opens in the background (``wait_open`` says how that went)
        and the session keeps caller audio pushed meanwhile.
        """
        record = self._record_path
        if record is not None and self._sessions_opened:  # a restarted session: a new file
            record = record.with_name(f"{record.stem}-{self._sessions_opened}{record.suffix}")
        self._sessions_opened += 1
        return DuplexSession(
            self._backend,
            prompt=settings.prompt,  # type: ignore[arg-type]  # a full store: str | None
            sampling=settings.sampling(),
            output_sample_rate=self._sample_rate,
            record_path=record,
            seed=settings.seed,  # type: ignore[arg-type]
        )

    async def _open_session(self, *, wait: bool = False) -> None:
        """Create a session with the current settings and make it the live one at once.

        Caller audio goes to it from now on (kept until its slot opens). A slot that cannot open
        (a full engine, a server that cannot be reached) is reported as permanent, here with
        ``wait`` and else by the session's reader: the call cannot go on.
        """
        try:
            session = self._new_session(self._settings)
        except Exception as e:  # the recording cannot be written, say
            await self.push_error(
                f"{self}: could not open a hertz-dev session: {e}",
                exception=e,
                force_treat_as_permanent=True,
            )
            return
        if wait:
            self._session = session
            if not await self._wait_open(session):
                return
        await self._switch_to(session, opened=wait)

    async def _switch_to(self, session: DuplexSession, *, opened: bool) -> None:
        old, self._session = self._session, session
        self._reset_call_state()
        if old is not None and old is not session:
            await old.close()
        self._reader = self.create_task(
            self._read_output(session, opened=opened), name="hertz_output"
        )

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        reader, self._reader = self._reader, None
        if session is not None:
            await session.close()
            logger.info(f"{self}: call ended: {self._stats.summary()}")
        if reader is not None and reader is not asyncio.current_task():
            await self.cancel_task(reader)

    # -- frames ------------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Feed caller audio to the session and apply settings updates; pass other frames on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self._push_input(frame)
            if self._audio_passthrough:
                await self.push_frame(frame, direction)
            await self._maybe_start_ttfb()
        elif isinstance(frame, ServiceUpdateSettingsFrame):
            delta = delta_for(frame, self)
            if delta is not None:
                await self._update_settings(delta)
            else:
                await self.push_frame(frame, direction)
        elif isinstance(frame, (UserStoppedSpeakingFrame, VADUserStoppedSpeakingFrame)):
            if self._session is not None and not self._gate.is_open and not self._awaiting_reply:
                self._awaiting_reply = True
                await self.start_ttfb_metrics()
            await self.push_frame(frame, direction)
        else:  # StartFrame, EndFrame, CancelFrame (handled above), InterruptionFrame, the rest
            await self.push_frame(frame, direction)

    async def _push_input(self, frame: InputAudioRawFrame) -> None:
        session = self._session
        if session is None or session.closed:
            # A closed session re-raises why it ended (EngineFull...) on every push: its reader
            # reports that once.
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
            return  # the reader reports a session that ended on its own
        await self._announce_caller_speech(frame)

    async def _announce_caller_speech(self, frame: InputAudioRawFrame) -> None:
        """While the caller speaks, push ``UserSpeakingFrame``s as Pipecat's VAD does.

        They keep the pipeline's idle timeout from ending a call in which only the caller talks.
        """
        now = time.monotonic()
        if now - self._user_speaking_at < USER_SPEAKING_INTERVAL_S:
            return
        if caller_speech_level(frame.audio, frame.num_channels):
            self._user_speaking_at = now
            await self.push_frame(UserSpeakingFrame())

    async def _maybe_start_ttfb(self) -> None:
        if self._first_input and self._session is not None:
            self._first_input = False
            await self.start_ttfb_metrics()

    # -- settings ----------------------------------------------------------------------------
    async def _update_settings(self, delta: HertzDuplexSettings) -> dict[str, Any]:  # type: ignore[override]
        """Apply a delta, all of it or none.

        A value that is invalid, a model change or a prompt the engine cannot open is reported
        (an ``ErrorFrame``, not permanent) and changes nothing.

        Unlike ``AIService._update_settings`` this never marks the service usable again: no
        setting here can bring back a model that failed to load or an engine that is full.
        """
        if is_given(delta.model) and delta.model != self._settings.model:
            await self.push_error(
                f"{self}: settings not applied: the model ({self._settings.model!r}) cannot change "
                "while "
                f"the service runs; create a HertzDuplexService with model={delta.model!r} instead"
            )
            return {}
        candidate = self._settings.copy()
        candidate.apply_update(delta)
        try:
            candidate.check()
        except ValueError as e:
            await self.push_error(f"{self}: settings not applied: {e}", exception=e)
            return {}
        restarted = None
        if candidate.prompt != self._settings.prompt and self._session is not None:
            try:  # open the new conversation first: a prompt that fails leaves the call as it was
                restarted = self._new_session(candidate)
                await restarted.wait_open()
            except Exception as e:
                if restarted is not None:
                    await restarted.close()
                await self.push_error(
                    f"{self}: prompt not changed ({candidate.prompt!r} could not be used: {e}); "
                    "the call "
                    "goes on with the previous prompt",
                    exception=e,
                )
                return {}
        changed = self._settings.apply_update(delta)
        if changed:
            logger.info(f"{self}: updated settings {sorted(changed)}")
        sampling = {
            name: getattr(self._settings, name) for name in SAMPLING_FIELDS if name in changed
        }
        if sampling and self._session is not None:
            self._session.update_sampling(**sampling)
        if "gate_threshold_db" in changed:
            await self._measure_quiet_level()
        if restarted is not None:
            # the new prompt starts a new conversation
            await self._switch_to(restarted, opened=True)
        elif "seed" in changed:
            logger.info(f"{self}: the new seed applies from the next session (a prompt change)")
        unhandled = set(changed) - set(RUNTIME_FIELDS)
        self._warn_unhandled_updated_settings(unhandled)  # type: ignore[no-untyped-call]
        return changed

    # -- output ------------------------------------------------------------------------------
    async def _read_output(self, session: DuplexSession, *, opened: bool) -> None:
        if not opened and not await self._wait_open(session):
            return
        while True:
            try:
                chunk = await session.__anext__()
            except StopAsyncIteration:
                break
            except Exception as e:  # the engine or the server ended the session: it cannot go on
                if session is self._session:
                    self._session = None
                    await self.push_error(
                        f"{self}: the hertz-dev session ended: {e}",
                        exception=e,
                        force_treat_as_permanent=True,
                    )
                return
            try:
                await self._emit(chunk)
            except Exception as e:  # CancelledError is not an Exception: cancelling still works
                await self._delivery_failed(session, e)
                return
        if session is self._session:  # closed by the engine, not by us
            self._session = None
            await self.push_error(
                f"{self}: the hertz-dev session ended unexpectedly "
                "(see the log for the engine's error)",
                force_treat_as_permanent=True,
            )

    async def _wait_open(self, session: DuplexSession) -> bool:
        """Wait for the live session's slot; a slot that cannot open ends the call with why."""
        try:
            await session.wait_open()
        except Exception as e:
            if session is self._session:
                self._session = None
                await session.close()
                await self.push_error(
                    f"{self}: could not open a hertz-dev session: {e}",
                    exception=e,
                    force_treat_as_permanent=True,
                )
            return False
        return True

    async def _delivery_failed(self, session: DuplexSession, error: Exception) -> None:
        """Handle a step that could not be delivered: the session's output is lost from here on.

        Open a new session (the model forgets the call so far) a few times per call, then give
        up, so the call ends with a reason instead of going on in silence.
        """
        if session is not self._session:
            return
        self._delivery_failures += 1
        if self._delivery_failures > MAX_SESSION_REOPENS:
            self._session = None
            await session.close()
            await self.push_error(
                f"{self}: delivering the model's audio failed {self._delivery_failures} times "
                f"({error}); "
                "ending the call",
                exception=error,
                force_treat_as_permanent=True,
            )
            return
        logger.opt(exception=error).warning(
            f"{self}: delivering a model step failed; opening a new session"
        )
        await self.push_error(
            f"{self}: model output failed ({error}); reopening the session", exception=error
        )
        await self._open_session()

    async def _emit(self, chunk: OutputChunk) -> None:
        if self._session is None:
            return
        was_open = self._gate.is_open
        audio = shape_step(
            chunk, time.monotonic(), gate=self._gate, pacer=self._pacer, stats=self._stats, who=self
        )
        if audio is None:
            return
        pcm = float_to_pcm16(audio)
        emitted_at = time.time()
        # Pipecat's metrics take wall times; the engine stamps the input step on the monotonic clock
        ready_at = (
            None if chunk.silence_input else emitted_at - (time.monotonic() - chunk.input_complete)
        )
        frame_bytes = 2 * max(1, chunk.sample_rate * self._frame_ms // 1000)
        for start in range(0, len(pcm), frame_bytes):
            frame = SpeechOutputAudioRawFrame(
                pcm[start : start + frame_bytes], chunk.sample_rate, 1
            )
            frame.interruptible = False  # full duplex: the model decides when to stop talking
            await self.push_frame(frame)
        await self._report_metrics(
            ready_at,
            emitted_at,
            opened=self._gate.is_open and not was_open,
            from_input=not chunk.silence_input,
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
        mean = self._stats.add_step(None if ready_at is None else emitted_at - ready_at)
        if mean is not None and self.metrics_enabled:
            model = self._settings.model if is_given(self._settings.model) else None
            data = ProcessingMetricsData(processor=self.name, value=mean, model=model)
            await self.push_frame(MetricsFrame(data=[data]))
