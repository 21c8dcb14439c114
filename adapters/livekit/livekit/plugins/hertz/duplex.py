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
from collections import deque
from collections.abc import AsyncIterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents import llm, utils
from livekit.agents.types import NOT_GIVEN, NotGivenOr
from livekit.agents.utils import is_given

from hertz_agents.errors import AudioInputError, HertzError, SessionClosed
from hertz_agents.sampling import SamplingSettings
from hertz_agents.session import DuplexSession as CoreSession
from hertz_agents.timing import STEP_SECONDS

from .gate import build_gate
from .log import logger
from .models import DEFAULT_MODEL, DEFAULT_SAMPLE_RATE, GateOptions, HertzModels

PromptSource = str | Path | np.ndarray

# caller audio that arrives while the core session is still opening (a slot is being reset or a
# prompt prefilled) is kept, up to this many seconds, and fed in once the session is open
_MAX_PENDING_SECONDS = 2.0

# how long closing waits for a session that is still opening (loading a prompt, say)
_CLOSE_TIMEOUT = 30.0


@dataclass
class _ModelOptions:
    model: Any  # a name, a directory, "hertz://host:port" or an engine object
    sample_rate: int
    sampling: SamplingSettings
    prompt: PromptSource | None
    seed: int | None
    gate: GateOptions
    record_dir: Path | None


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
        sampling: SamplingSettings | None = None,
        prompt: PromptSource | None = None,
        seed: int | None = None,
        gate: GateOptions | None = None,
        record_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """
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
        self._opts = _ModelOptions(
            model=model,
            sample_rate=sample_rate,
            sampling=sampling or SamplingSettings(),
            prompt=prompt,
            seed=seed,
            gate=gate or GateOptions(),
            record_dir=Path(record_dir) if record_dir is not None else None,
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

        engine_options: dict[str, Any] = {"max_sessions": max_sessions} if max_sessions is not None else {}
        engine = load_engine(model, device=device, **engine_options)
        gate: GateOptions = options.pop("gate", None) or GateOptions()
        if gate.silence_rms is None and measure_gate:
            silence_rms = measure_quiet_level(engine)
            if silence_rms is None:
                logger.warning("could not measure hertz-dev's quiet level; the gate will learn it")
            gate = replace(gate, silence_rms=silence_rms)
        return cls(model=engine, gate=gate, **options)

    @property
    def model(self) -> str:
        model = self._opts.model
        if isinstance(model, (str, os.PathLike)):
            return os.fspath(model)
        return "hertz-dev"  # an engine object

    @property
    def provider(self) -> str:
        return "hertz-agents"

    @property
    def engine(self) -> Any:
        """The engine object given or loaded, or None while the model is still a name."""
        return None if isinstance(self._opts.model, (str, os.PathLike)) else self._opts.model

    def audio_gate(self) -> llm.AudioGate:
        """A gate tuned to the model's quiet level (see :class:`GateOptions`)."""
        return build_gate(self._opts.gate)

    def session(self) -> DuplexSession:
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
        """Change options. Sampling also applies to the calls in progress, from their next step;
        the prompt, seed and gate apply to calls that start afterwards."""
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
        pass  # the engine belongs to the process and outlives any one model object


class DuplexSession(llm.DuplexSession):
    """One call: a slot of the engine, fed the caller's frames, yielding every model step.

    Reach it from an agent with ``Agent.duplex_session`` to change sampling or read metrics.
    """

    def __init__(self, duplex_model: DuplexModel) -> None:
        super().__init__(duplex_model)
        self._hertz_model = duplex_model
        self._opts = replace(duplex_model._opts)
        self._core: CoreSession | None = None
        self._open_done = asyncio.Event()
        self._pending: deque[rtc.AudioFrame] = deque()
        self._pending_seconds = 0.0
        self._warned_input = False
        self._audio_ch = utils.aio.Chan[llm.DuplexAudioFrame]()
        self._main_atask = asyncio.create_task(self._main_task(), name="hertz.DuplexSession")

    # -- the model's side ---------------------------------------------------------------------
    async def _main_task(self) -> None:
        started = time.perf_counter()
        try:
            core = await CoreSession.open(
                self._opts.model,
                prompt=self._opts.prompt,
                sampling=self._opts.sampling,
                output_sample_rate=self._opts.sample_rate,
                seed=self._opts.seed,
                record_path=self._record_path(),
            )
        except Exception as e:
            if isinstance(e, HertzError):  # a full engine, a missing model: the message says it all
                logger.error("could not open a hertz-dev session: %s", e)
            else:
                logger.exception("could not open a hertz-dev session")
            self._emit_error(e, recoverable=False)
            self._audio_ch.close()
            self._open_done.set()
            return
        if self._closing:
            await core.close()
            self._audio_ch.close()
            self._open_done.set()
            return
        self._core = core
        while self._pending:
            self._push_frame(self._pending.popleft())
        self._open_done.set()
        self._report_connection_acquired(time.perf_counter() - started)
        try:
            async for chunk in core:
                if chunk.audio.size == 0:
                    continue  # the output resampler's first block can be held back entirely
                pcm = (np.clip(chunk.audio, -1.0, 1.0) * 32767.0).astype(np.int16)
                frame = rtc.AudioFrame(pcm.tobytes(), chunk.sample_rate, 1, pcm.shape[0])
                # stamped with the step, so a dropped step does not shift the adapter's clock
                start_ms = round(chunk.step * STEP_SECONDS * 1000)
                with contextlib.suppress(utils.aio.ChanClosed):
                    self._audio_ch.send_nowait(llm.DuplexAudioFrame(frame=frame, start_ms=start_ms))
        finally:
            self._audio_ch.close()

    def _record_path(self) -> Path | None:
        if self._opts.record_dir is None:
            return None
        self._opts.record_dir.mkdir(parents=True, exist_ok=True)
        return self._opts.record_dir / f"hertz-{time.strftime('%Y%m%d-%H%M%S')}-{id(self):x}.wav"

    def _emit_error(self, error: Exception, *, recoverable: bool) -> None:
        self.emit(
            "error",
            llm.RealtimeModelError(
                timestamp=time.time(), label=self._hertz_model.label, error=error, recoverable=recoverable
            ),
        )

    @property
    def audio_stream(self) -> AsyncIterable[llm.DuplexAudioFrame]:
        """Every model step as a frame at ``sample_rate``, its quiet steps included."""
        return self._audio_ch

    # -- the caller's side --------------------------------------------------------------------
    def push_audio(self, frame: rtc.AudioFrame) -> None:
        """Feed a caller frame of any rate, channel count and length; never waits on the model.

        When no frames come (a muted or missing track), the engine steps the model on silence
        after a short wait, so the model keeps its clock and keeps talking.
        """
        if self._closing:
            return
        if self._core is None:
            self._pending.append(frame)
            self._pending_seconds += frame.duration
            while self._pending_seconds > _MAX_PENDING_SECONDS and self._pending:
                self._pending_seconds -= self._pending.popleft().duration
            return
        self._push_frame(frame)

    def _push_frame(self, frame: rtc.AudioFrame) -> None:
        assert self._core is not None
        pcm = np.frombuffer(frame.data, dtype=np.int16)
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels)
        try:
            self._core.push_audio_nowait(pcm, frame.sample_rate, frame.num_channels)
        except SessionClosed:
            pass
        except AudioInputError as e:
            if not self._warned_input:  # once per call: a broken track would flood the log
                logger.warning("dropping caller audio hertz-dev cannot use: %s", e)
                self._warned_input = True

    # -- control ------------------------------------------------------------------------------
    def update_options(self, *, sampling: NotGivenOr[SamplingSettings] = NOT_GIVEN) -> None:
        """Change this call's sampling from its next step."""
        if not is_given(sampling):
            return
        self._opts.sampling = sampling
        if self._core is not None and not self._core.closed:
            self._core.update_sampling(**dataclasses.asdict(sampling))

    async def wait_open(self) -> bool:
        """Wait until the engine slot is taken; False when opening failed or the call closed first."""
        await self._open_done.wait()
        return self._core is not None

    @property
    def metrics(self) -> dict[str, Any]:
        """The core session's figures (steps, late steps, step and queue times...), or {}."""
        return self._core.metrics.snapshot() if self._core is not None else {}

    @property
    def core_session(self) -> CoreSession | None:
        """The ``hertz_agents.DuplexSession`` underneath, once it is open."""
        return self._core

    async def aclose(self) -> None:
        await super().aclose()
        if self._core is not None:
            await self._core.close()  # ends the output loop of the main task
        # an open in flight is not cancelled (the slot it takes would leak): the main task closes
        # the session as soon as it opens; only a stuck open is abandoned
        done, _ = await asyncio.wait({self._main_atask}, timeout=_CLOSE_TIMEOUT)
        if not done:
            logger.warning("a hertz-dev session did not open or close in %.0f s; abandoning it", _CLOSE_TIMEOUT)
            await utils.aio.cancel_and_wait(self._main_atask)
        self._audio_ch.close()

    # -- the framework's configuration hooks: hertz-dev has no text channel and no tools -------
    @property
    def tools(self) -> llm.ToolContext:
        return llm.ToolContext.empty()

    async def _update_instructions(self, instructions: str) -> None:
        logger.debug("hertz-dev takes no text instructions; shape it with a prompt WAV instead")

    async def _append_items(self, items: list[llm.ChatItem]) -> None:
        pass  # the model hears the conversation; it cannot read a chat context

    async def _update_tools(self, tools: list[llm.Tool]) -> None:
        if tools:
            names = sorted(t.id for t in llm.ToolContext(tools).flatten())
            logger.warning("hertz-dev cannot call tools; these are ignored: %s", names)

    def _update_options(self, *, tool_choice: NotGivenOr[llm.ToolChoice | None] = NOT_GIVEN) -> None:
        pass

    def _generate_reply(
        self,
        *,
        instructions: NotGivenOr[str] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        tools: NotGivenOr[list[llm.Tool]] = NOT_GIVEN,
    ) -> None:
        raise llm.RealtimeError(
            "hertz-dev decides for itself when to speak: it hears the caller and answers in its own "
            "time, and it has no text input, so generate_reply() and say() cannot prompt it. "
            "Shape what it says with a prompt WAV (hertz.DuplexModel(prompt=...))."
        )
