"""hertz-dev as a LiveKit ``llm.DuplexModel``: it listens and speaks at once, every 125 ms.

``AgentSession(llm=hertz.DuplexModel(...))`` wraps the model in LiveKit's
``DuplexRealtimeAdapter``, which knows that the model speaks over the caller
(``supports_overlapping_speech``): the caller's speech never cuts the model, and the model's
continuous output is split into audible bursts by the gate from :meth:`DuplexModel.audio_gate`.

Everything heavy lives in the core: each :class:`DuplexSession` here is one
``hertz_agents.DuplexSession`` (one slot of a shared, batched engine) plus the conversion between
LiveKit frames and numpy arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
import weakref
from collections.abc import AsyncIterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents import APIError, llm, utils
from livekit.agents.types import NOT_GIVEN, NotGivenOr
from livekit.agents.utils import is_given

from hertz_agents.audio import float_to_int16
from hertz_agents.errors import AudioInputError, HertzError, SessionClosed
from hertz_agents.sampling import SamplingSettings
from hertz_agents.session import DuplexSession as CoreSession
from hertz_agents.timing import STEP_SECONDS

from .caller_speech import CallerSpeech
from .errors import api_error
from .gate import build_gate
from .log import logger
from .models import (
    DEFAULT_MODEL,
    DEFAULT_PREBUFFER,
    DEFAULT_SAMPLE_RATE,
    GateOptions,
    HertzModels,
)
from .prebuffer import BurstPrebuffer

PromptSource = str | Path | np.ndarray


@dataclass
class _ModelOptions:
    model: Any  # a name, a directory, "hertz://host:port" or an engine object
    sample_rate: int
    sampling: SamplingSettings
    prompt: PromptSource | None
    seed: int | None
    gate: GateOptions
    record_dir: Path | None
    prebuffer: float


class DuplexModel(llm.DuplexModel):
    """hertz-dev for ``AgentSession``: full duplex, audio only, no text and no tools.

    Build it once per worker with :meth:`load` (blocking, in prewarm) and share it: every call
    opens a cheap :class:`DuplexSession` on the same engine, and the engine steps all of them in
    one batched forward every 125 ms.
    """

    def __init__(
        self,
        *,
        model: HertzModels | str | os.PathLike[str] | Any = DEFAULT_MODEL,
        sample_rate: int = DEFAULT_SAMPLE_RATE,
        sampling: NotGivenOr[SamplingSettings] = NOT_GIVEN,
        prompt: NotGivenOr[PromptSource | None] = NOT_GIVEN,
        seed: NotGivenOr[int | None] = NOT_GIVEN,
        gate: NotGivenOr[GateOptions] = NOT_GIVEN,
        record_dir: NotGivenOr[str | os.PathLike[str] | None] = NOT_GIVEN,
        prebuffer: NotGivenOr[float] = NOT_GIVEN,
    ) -> None:
        """Keep the options; a model name or directory is not loaded until it is needed.

        Args:
            model: A model name (``"default"``, ``"hertz-dev"``), a checkpoint directory, a loaded
                ``hertz_agents.engine.Engine``, or ``"hertz://host:port"`` for a remote inference
                server. A name or directory is loaded on the first call if :meth:`load` was not
                used (the first caller then waits for the weights).
            sample_rate: Rate of the audio handed to LiveKit, in Hz (the model runs at 16 kHz).
            sampling: Temperatures and top-p/min-p (``hertz_agents.SamplingSettings``).
            prompt: A WAV file or array the model hears before the call (a voice and a style);
                prefilled once per engine and shared by every call.
            seed: Seed for each session's sampler (None: a fresh one per session).
            gate: How the model's continuous output is split into audible bursts.
            record_dir: Directory for a stereo WAV of each call (caller | model), for debugging.
            prebuffer: Seconds of each burst held before it is handed to ``AgentSession``
                (default ``DEFAULT_PREBUFFER``, 0.3; 0: none), so late steps do not leave gaps
                in playback. Each burst starts that much later. Set 0 when you play
                ``audio_stream`` yourself with :func:`play_stream`, which holds its own.
        """
        super().__init__(
            capabilities=llm.DuplexCapabilities(
                user_transcription=False,
                auto_tool_reply_generation=False,
                # nothing is sent to the model, so every update is as good as any other: a
                # handoff to another Agent keeps the running session and the model's memory
                mutable_chat_context=True,
                mutable_instructions=True,
                mutable_tools=True,
            )
        )
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        record_dir = record_dir if is_given(record_dir) else None
        prebuffer = prebuffer if is_given(prebuffer) else DEFAULT_PREBUFFER
        if prebuffer < 0:
            raise ValueError(f"prebuffer must be 0 or more seconds, got {prebuffer}")
        self._opts = _ModelOptions(
            model=model,
            sample_rate=sample_rate,
            sampling=sampling if is_given(sampling) else SamplingSettings(),
            prompt=prompt if is_given(prompt) else None,
            seed=seed if is_given(seed) else None,
            gate=gate if is_given(gate) else GateOptions(),
            record_dir=Path(record_dir) if record_dir is not None else None,
            prebuffer=prebuffer,
        )
        self._sessions: weakref.WeakSet[DuplexSession] = weakref.WeakSet()
        self._sessions_lock = threading.Lock()  # a worker's job threads share one model

    @classmethod
    def load(
        cls,
        model: HertzModels | str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        device: str | None = None,
        max_sessions: int | None = None,
        measure_gate: bool = True,
        **options: Any,
    ) -> DuplexModel:
        """Load the weights into this process's shared engine (blocking; call it in prewarm).

        Every ``load`` of the same model in a process returns a model on the same engine, so with
        LiveKit's thread job executor all of a worker's calls are batched together.

        Args:
            model: A model name or a checkpoint directory.
            device: ``"cuda"``, ``"cpu"``... (default: CUDA when available).
            max_sessions: Calls one engine serves at once (the engine's default when None); only
                applies when this call creates the engine.
            measure_gate: Measure the model's quiet level for the gate (a couple of seconds of
                model steps, once per engine) unless ``gate.silence_rms`` is given.
            **options: Keyword options of :class:`DuplexModel`.
        """
        from hertz_agents.engine import load_engine, measure_quiet_level

        engine_options: dict[str, Any] = (
            {"max_sessions": max_sessions} if max_sessions is not None else {}
        )
        engine = load_engine(model, device=device, **engine_options)
        gate = options.pop("gate", NOT_GIVEN)
        gate = gate if is_given(gate) and gate is not None else GateOptions()
        if gate.silence_rms is None and measure_gate:
            silence_rms = measure_quiet_level(engine)
            if silence_rms is None:
                logger.warning("could not measure hertz-dev's quiet level; the gate will learn it")
            gate = replace(gate, silence_rms=silence_rms)
        return cls(model=engine, gate=gate, **options)

    @property
    def model(self) -> str:
        """The model's name or directory, or ``"hertz-dev"`` when given an engine object."""
        model = self._opts.model
        if isinstance(model, (str, os.PathLike)):
            return os.fspath(model)
        return "hertz-dev"  # an engine object

    @property
    def provider(self) -> str:
        """The provider's name: ``"hertz-agents"``."""
        return "hertz-agents"

    @property
    def engine(self) -> Any:
        """The engine object given or loaded, or None while the model is still a name."""
        return None if isinstance(self._opts.model, (str, os.PathLike)) else self._opts.model

    def audio_gate(self) -> llm.AudioGate:
        """A gate tuned to the model's quiet level (see :class:`GateOptions`)."""
        return build_gate(self._opts.gate)

    def session(self) -> DuplexSession:
        """Open a session for one call and track it so option updates reach it."""
        sess = DuplexSession(self)
        with self._sessions_lock:
            self._sessions.add(sess)
        return sess

    def update_options(
        self,
        *,
        sampling: NotGivenOr[SamplingSettings] = NOT_GIVEN,
        prompt: NotGivenOr[PromptSource | None] = NOT_GIVEN,
        seed: NotGivenOr[int | None] = NOT_GIVEN,
        gate: NotGivenOr[GateOptions] = NOT_GIVEN,
    ) -> None:
        """Change options.

        Sampling also applies to the calls in progress, from their next step; the prompt, seed
        and gate apply to calls that start afterwards.
        """
        if is_given(sampling):
            self._opts.sampling = sampling
            with self._sessions_lock:
                sessions = list(self._sessions)
            for sess in sessions:
                sess.update_options(sampling=sampling)
        if is_given(prompt):
            self._opts.prompt = prompt
        if is_given(seed):
            self._opts.seed = seed
        if is_given(gate):
            self._opts.gate = gate

    async def aclose(self) -> None:
        """Do nothing: the engine belongs to the process and outlives any one model object."""
        pass  # the engine belongs to the process and outlives any one model object


class DuplexSession(llm.DuplexSession[Any]):
    """One call: a slot of the engine, fed the caller's frames, yielding every model step.

    The core session is created at once and its slot opens in the background; caller frames
    pushed meanwhile are kept by the core (up to two seconds) and fed once it is open, as the
    Pipecat service does. Reach it from an agent with ``Agent.duplex_session`` to change
    sampling or read metrics.
    """

    def __init__(self, duplex_model: DuplexModel) -> None:
        super().__init__(duplex_model)
        self._hertz_model = duplex_model
        self._opts = replace(duplex_model._opts)
        self._warned_input = False
        # the user's state in AgentSession ("speaking", "away") comes from these events only
        self._caller_speech = CallerSpeech(self._caller_started, self._caller_stopped)
        self._failed: APIError | None = None
        self._audio_ch = utils.aio.Chan[llm.DuplexAudioFrame]()
        self._prebuffer = BurstPrebuffer(build_gate(self._opts.gate), self._opts.prebuffer)
        self._core = CoreSession(
            self._opts.model,
            prompt=self._opts.prompt,
            sampling=self._opts.sampling,
            output_sample_rate=self._opts.sample_rate,
            seed=self._opts.seed,
            record_path=self._record_path(),
        )
        self._main_atask = asyncio.create_task(self._main_task(), name="hertz.DuplexSession")

    # -- the model's side ---------------------------------------------------------------------
    async def _main_task(self) -> None:
        started = time.perf_counter()
        core = self._core
        try:
            try:
                await core.wait_open()
            except Exception as e:  # a full engine, a missing model, a server that is not there
                if not self._closing:
                    self._fail(e, "could not open a hertz-dev session")
                return
            self._report_connection_acquired(time.perf_counter() - started)
            async for chunk in core:
                if chunk.audio.size == 0:
                    continue  # the output resampler's first block can be held back entirely
                pcm = float_to_int16(chunk.audio)
                frame = rtc.AudioFrame(pcm.tobytes(), chunk.sample_rate, 1, pcm.shape[0])
                # stamped with the step, so a dropped step does not shift the adapter's clock
                start_ms = round(chunk.step * STEP_SECONDS * 1000)
                self._send(self._prebuffer.push(llm.DuplexAudioFrame(frame, start_ms=start_ms)))
        except Exception as e:  # the engine or the server ended the call: a restart, a fault
            if not self._closing:
                self._fail(e, "the hertz-dev session ended")
        finally:
            self._send(self._prebuffer.flush())
            self._audio_ch.close()

    def _send(self, frames: list[llm.DuplexAudioFrame]) -> None:
        for frame in frames:
            with contextlib.suppress(utils.aio.ChanClosed):
                self._audio_ch.send_nowait(frame)

    def _fail(self, error: Exception, what: str) -> None:
        """The session cannot go on: say so once, as an error that ends the call.

        The framework closes an ``AgentSession`` on a ``RealtimeModelError`` that is not
        recoverable; the example (and any 1:1 call) then ends the call, so the caller is not left
        in silence. Caller audio pushed afterwards is dropped at once.
        """
        if self._failed is not None:
            return
        self._failed = api_error(error)
        if isinstance(error, HertzError):  # a full engine, a missing model: the message says it all
            logger.error("%s: %s", what, error)
        else:
            logger.error("%s", what, exc_info=error)
        self._emit_error(self._failed, recoverable=False)
        self._audio_ch.close()

    @property
    def failed(self) -> APIError | None:
        """Why this session ended on its own (an ``APIError``), or None while it is fine."""
        return self._failed

    def _record_path(self) -> Path | None:
        if self._opts.record_dir is None:
            return None
        self._opts.record_dir.mkdir(parents=True, exist_ok=True)
        return self._opts.record_dir / f"hertz-{time.strftime('%Y%m%d-%H%M%S')}-{id(self):x}.wav"

    def _emit_error(self, error: Exception, *, recoverable: bool) -> None:
        self.emit(
            "error",
            llm.RealtimeModelError(
                timestamp=time.time(),
                label=self._hertz_model.label,
                error=error,
                recoverable=recoverable,
            ),
        )

    @property
    def audio_stream(self) -> AsyncIterable[llm.DuplexAudioFrame]:
        """Every model step as a frame at ``sample_rate``, its quiet steps included."""
        return self._audio_ch

    # -- the caller's side --------------------------------------------------------------------
    def push_audio(self, frame: rtc.AudioFrame) -> None:
        """Feed a caller frame of any rate, channel count and length; never waits on the model.

        Frames pushed while the slot opens are kept (up to two seconds) and fed once it is open.
        When no frames come (a muted or missing track), the engine steps the model on silence
        after a short wait, so the model keeps its clock and keeps talking.
        """
        if self._closing or self._failed is not None or self._core.closed:
            # never call into a closed core: it re-raises the one stored error each time, and
            # every raise grows that error's traceback, which keeps each frame's audio alive
            return
        pcm = np.frombuffer(frame.data, dtype=np.int16)
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels)
        try:
            self._core.push_audio_nowait(pcm, frame.sample_rate, frame.num_channels)
        except AudioInputError as e:
            if not self._warned_input:  # once per call: a broken track would flood the log
                logger.warning("dropping caller audio hertz-dev cannot use: %s", e)
                self._warned_input = True
            return
        except SessionClosed:
            return  # closed on another thread since the check above; the main task reports why
        self._caller_speech.update(pcm)

    def _caller_started(self) -> None:
        self.emit("input_speech_started", llm.InputSpeechStartedEvent())

    def _caller_stopped(self) -> None:
        self.emit("input_speech_stopped", llm.InputSpeechStoppedEvent(False))

    # -- control ------------------------------------------------------------------------------
    def update_options(self, *, sampling: NotGivenOr[SamplingSettings] = NOT_GIVEN) -> None:
        """Change this call's sampling from its next step (or its first, while it opens)."""
        if not is_given(sampling):
            return
        self._opts.sampling = sampling
        if not self._core.closed:
            self._core.update_sampling(**dataclasses.asdict(sampling))

    async def wait_open(self) -> bool:
        """Wait until the engine slot is taken; False when opening failed or the call closed."""
        try:
            await self._core.wait_open()
        except Exception:  # the main task reports why
            return False
        return not self._core.closed

    @property
    def metrics(self) -> dict[str, Any]:
        """The core session's figures (steps, late steps, step and queue times...)."""
        return self._core.metrics.snapshot()

    @property
    def core_session(self) -> CoreSession:
        """The ``hertz_agents.DuplexSession`` underneath (created with this session)."""
        return self._core

    async def aclose(self) -> None:
        """Close the session: end the core session, then wait for the main task to finish.

        A slot still opening is given back by the core as soon as it opens.
        """
        await super().aclose()
        self._caller_speech.close()
        await self._core.close()  # ends the main task's wait or output loop
        await asyncio.gather(self._main_atask, return_exceptions=True)
        self._audio_ch.close()

    # -- the framework's configuration hooks: hertz-dev has no text channel and no tools -------
    @property
    def tools(self) -> llm.ToolContext:
        """An empty tool context: hertz-dev calls no tools."""
        return llm.ToolContext.empty()

    async def _update_instructions(self, instructions: str) -> None:
        logger.debug("hertz-dev takes no text instructions; shape it with a prompt WAV instead")

    async def _append_items(self, items: list[llm.ChatItem]) -> None:
        pass  # the model hears the conversation; it cannot read a chat context

    async def _update_tools(self, tools: list[llm.Tool]) -> None:
        if tools:
            names = sorted(t.id for t in llm.ToolContext(tools).flatten())
            logger.warning("hertz-dev cannot call tools; these are ignored: %s", names)

    def _update_options(
        self, *, tool_choice: NotGivenOr[llm.ToolChoice | None] = NOT_GIVEN
    ) -> None:
        pass

    def _generate_reply(
        self,
        *,
        instructions: NotGivenOr[str] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        tools: NotGivenOr[list[llm.Tool]] = NOT_GIVEN,
    ) -> None:
        raise llm.RealtimeError(
            "hertz-dev decides for itself when to speak: it hears the caller and answers in its "
            "own time, and it has no text input, so generate_reply() and say() cannot prompt it. "
            "Shape what it says with a prompt WAV (hertz.DuplexModel(prompt=...))."
        )
