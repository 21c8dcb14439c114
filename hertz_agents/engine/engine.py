"""The engine: one model, a fixed number of session slots, and a worker thread that steps them.

Sessions hand the engine complete 125 ms input steps (``SlotHandle.submit``) from any thread.
The worker thread steps every session that has input in one batched tick, so asyncio code
never waits on the model. Timing policy (see docs/engine.md):

* a session steps as soon as it has a complete input step; a tick waits (at most
  ``batch_window``) for other sessions whose next step is due within that window, so sessions
  close in phase share a tick;
* if a session's input stalls for ``stall_timeout`` past the time its next step was due, the
  engine steps it on silence so the model keeps its clock (a muted caller still hears the model);
* if compute falls behind, the input backlog of a session is bounded (``max_input_backlog``
  steps, the oldest dropped and counted), and queued steps run back to back until it is drained,
  so a single slow tick adds latency only until the backlog is gone.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hertz_agents.backend import ClosedCallback, OutputCallback, StepInfo
from hertz_agents.engine.prompt import (
    PromptPrefill,
    build_prefill,
    load_prompt_audio,
    silence_latent,
)
from hertz_agents.engine.stepper import Stepper
from hertz_agents.errors import EngineFull, SessionClosed
from hertz_agents.metrics import SessionMetrics
from hertz_agents.model.hertz import HertzModel
from hertz_agents.model.quantize import quantize_weights
from hertz_agents.sampling import SamplingSettings
from hertz_agents.timing import SAMPLES_PER_STEP, STEP_SECONDS

log = logging.getLogger(__name__)

PROMPT_CACHE_SIZE = 16
"""Prompt prefills kept per engine (least recently used dropped first)."""


@dataclass
class SlotHandle:
    """The engine side of one conversation. ``submit`` and ``close`` are thread-safe."""

    engine: Engine
    slot: int
    on_output: OutputCallback
    sampling: SamplingSettings
    generator: torch.Generator
    on_closed: ClosedCallback | None = None  # told when the engine, not the session, ends it
    metrics: SessionMetrics = field(default_factory=SessionMetrics)
    inbox: deque = field(default_factory=deque)
    next_due: float = field(default_factory=time.monotonic)
    steps: int = 0
    position: int = 0  # host mirror of the slot's position, so the tick needs no device sync
    closed: bool = False
    opened_at: float = field(default_factory=time.monotonic)
    input_seq: int | None = None  # the sequence number of the step being fed (None: silence)
    _seqs: itertools.count = field(default_factory=itertools.count)  # next() is atomic

    def submit(self, audio: np.ndarray, complete_at: float | None = None) -> int:
        """Queue one input step (float32 [2000] at 16 kHz); returns its sequence number."""
        if self.closed:
            raise SessionClosed("this session is closed; open a new one")
        if audio.shape != (SAMPLES_PER_STEP,):
            raise ValueError(
                f"an input step is {SAMPLES_PER_STEP} samples, got shape {audio.shape}"
            )
        seq = next(self._seqs)
        self.inbox.append((audio, time.monotonic() if complete_at is None else complete_at, seq))
        while len(self.inbox) > self.engine.max_input_backlog:
            self.inbox.popleft()
            self.metrics.dropped_input_steps += 1
        self.engine._wake()
        return seq

    def update_sampling(self, sampling: SamplingSettings) -> None:
        """Set the sampling settings used for this session's next steps."""
        self.sampling = sampling

    def close(self) -> None:
        """Close the session (once) and give its slot back to the engine."""
        if not self.closed:
            self.closed = True
            self.engine._release(self)


class Engine:
    """Owns a two-channel model and steps up to ``max_sessions`` conversations in batches.

    Inference options: ``compile`` compiles the whole tick (``fullgraph=True``; CUDA graphs on
    CUDA; a string picks the ``torch.compile`` backend); ``weights="int8"`` or ``"fp8"``
    quantizes the transformers' weights in place; ``kv_dtype=torch.int8`` quantizes the KV caches.
    ``rollover="ring"`` keeps each call's last ``context`` positions in a ring cache (the first
    ``sink`` pinned) instead of re-prefilling the kept window (see
    :mod:`hertz_agents.engine.stepper`); by default the model's own choice
    (``config.serving.rollover``).
    """

    def __init__(
        self,
        model: HertzModel,
        *,
        max_sessions: int = 8,
        context: int | None = None,
        keep: int | None = None,
        batch_window: float = 0.010,
        stall_timeout: float = 2 * STEP_SECONDS,
        max_input_backlog: int = 4,
        compile: bool | str = False,
        weights: str | None = None,
        kv_dtype: torch.dtype | None = None,
        rollover: str | None = None,
        sink: int = 0,
    ) -> None:
        if model.config.codec.hop != SAMPLES_PER_STEP:
            raise ValueError(
                f"the codec's hop is {model.config.codec.hop}, the engine needs {SAMPLES_PER_STEP}"
            )
        if not model.config.split:
            raise ValueError("live duplex sessions need the two-channel model (split=True)")
        self.model = model
        if weights is not None:  # the engine owns its model: quantized in place, from outside
            quantize_weights(model, weights)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # The stepper owns the step, positions and rollover; ``compile`` compiles its whole tick.
        self.stepper = Stepper(
            model,
            max_sessions,
            context,
            keep,
            kv_dtype=kv_dtype,
            compile=compile,
            rollover=rollover,
            sink=sink,
        )
        self.table = self.stepper.table
        self.context, self.keep = self.stepper.context, self.stepper.keep
        self.rollover = self.stepper.rollover
        self.max_sessions = max_sessions
        self.batch_window, self.stall_timeout = batch_window, stall_timeout
        self.max_input_backlog = max_input_backlog
        self.silence = silence_latent(model, self.device, self.dtype)
        self._scratch_generator = torch.Generator(device=self.device)
        self._handles: list[SlotHandle | None] = [None] * max_sessions
        self._prompts: OrderedDict[tuple, PromptPrefill] = OrderedDict()
        self._lock = threading.Lock()
        self._commands: deque[tuple[Callable[[], None], Future]] = deque()
        self._wakeup = threading.Event()
        self._stall_next_tick = 0.0
        self.ticks = 0
        self.rollovers = 0
        self.tick_sizes: deque[int] = deque(maxlen=4096)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="hertz-engine", daemon=True)
        self._thread.start()
        # Stop the worker before interpreter teardown: a daemon thread still inside torch at exit
        # can abort the process ("terminate called without an active exception").
        atexit.register(self.close)

    # -- sessions ---------------------------------------------------------------------------
    @property
    def active_sessions(self) -> int:
        """Number of slots with an open session."""
        return sum(h is not None for h in self._handles)

    @property
    def occupancy(self) -> float:
        """Share of slots in use, 0..1 (for LiveKit's ``load_fnc`` and the server)."""
        return self.active_sessions / self.max_sessions

    @property
    def alive(self) -> bool:
        """The worker thread is running (for health checks)."""
        return self._running and self._thread.is_alive()

    def bytes_per_session(self) -> int:
        """Return the memory one session holds (KV caches, history, codec state), in bytes."""
        return self.table.bytes_per_slot()

    def open(
        self,
        on_output: OutputCallback,
        *,
        sampling: SamplingSettings | None = None,
        prompt: str | Path | np.ndarray | None = None,
        seed: int | None = None,
        on_closed: ClosedCallback | None = None,
    ) -> SlotHandle:
        """Take a free slot (blocking: a new prompt is prefilled here, once per engine)."""
        if not self._running:
            raise SessionClosed("the engine is closed")
        prefill = self.prefill_prompt(prompt) if prompt is not None else None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        with self._lock:
            free = [i for i, h in enumerate(self._handles) if h is None]
            if not free:
                raise EngineFull(
                    f"all {self.max_sessions} session slots are in use; close a session, "
                    f"start the engine with more max_sessions, "
                    f"or send this call to another worker or server"
                )
            handle = SlotHandle(
                self, free[0], on_output, sampling or SamplingSettings(), generator, on_closed
            )
            self._handles[free[0]] = handle  # reserved; the worker resets the slot before use
        self._call(lambda: self._reset_slot(handle, prefill))
        return handle

    def prefill_prompt(self, prompt: str | Path | np.ndarray) -> PromptPrefill:
        """The prefill of ``prompt``, computed on first use and cached (blocking)."""
        if isinstance(prompt, (str, Path)):
            stat = Path(prompt).stat()
            key: tuple = ("file", str(Path(prompt).resolve()), stat.st_mtime_ns, stat.st_size)
        else:
            arr = np.ascontiguousarray(prompt, dtype=np.float32)
            key = ("array", arr.shape, hash(arr.tobytes()))
        with self._lock:
            cached = self._prompts.get(key)
            if cached is not None:
                self._prompts.move_to_end(key)
        if cached is None:
            audio = load_prompt_audio(prompt, max_steps=self.keep)
            cached = build_prefill(
                self.model,
                audio,
                self.device,
                self.dtype,
                self.stepper.channels,
                self.table.caches.ar.k[0].dtype,
            )
            with self._lock:
                self._prompts[key] = cached
                while len(self._prompts) > PROMPT_CACHE_SIZE:
                    self._prompts.popitem(last=False)
        return cached

    def _reset_slot(self, handle: SlotHandle, prefill: PromptPrefill | None) -> None:
        self.stepper.reset(handle.slot, self.silence, prefill)
        handle.position = self.stepper.position(handle.slot)
        handle.next_due = time.monotonic() + STEP_SECONDS

    def _release(self, handle: SlotHandle) -> None:
        with self._lock:
            if self._handles[handle.slot] is handle:
                self._handles[handle.slot] = None
        self._wake()

    # -- worker thread ----------------------------------------------------------------------
    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker thread between ticks and wait for it."""
        if threading.current_thread() is self._thread:
            fn()
            return
        future: Future = Future()
        self._commands.append((fn, future))
        self._wake()
        future.result()

    def _wake(self) -> None:
        self._wakeup.set()

    def inject_stall(self, seconds: float) -> None:
        """Fault injection for tests and drills: the next tick takes ``seconds`` longer."""
        self._stall_next_tick = seconds

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while self._running:
            while self._commands:
                fn, future = self._commands.popleft()
                try:
                    fn()
                    future.set_result(None)
                except BaseException as e:  # handed to the caller's thread
                    future.set_exception(e)
            ready, timeout = self._ready_handles()
            if not ready:
                self._wakeup.wait(timeout)
                self._wakeup.clear()
                continue
            ready = self._wait_for_due(ready)
            if not ready:  # they closed meanwhile
                continue
            try:
                self._tick(self._take_inputs(ready))
            except Exception:  # never let one bad tick kill the engine thread
                log.exception("engine tick failed; the sessions in it get no output for this step")

    def _ready_handles(self) -> tuple[list[SlotHandle], float]:
        """Sessions with a complete input step or a stalled input; and how long to sleep if none."""
        now = time.monotonic()
        ready = []
        timeout = 0.05
        for h in list(self._handles):
            if h is None or h.closed:
                continue
            if h.inbox:
                ready.append(h)
            else:
                deadline = h.next_due + self.stall_timeout
                if now >= deadline:
                    ready.append(h)
                else:
                    timeout = min(timeout, deadline - now)
        return ready, max(timeout, 0.001)

    def _wait_for_due(self, ready: list[SlotHandle]) -> list[SlotHandle]:
        """Hold a tick (at most ``batch_window``) for sessions due within that window to join it.

        A session's next step is due one step after its last one was complete; real-time callers
        deliver close to that, a few ms either side (their frames, the event loop). The tick
        waits until every session due within the window has its step or the window is over,
        whichever comes first, woken by each step that arrives: near-aligned sessions batch at
        a bounded cost (at most ``batch_window`` of latency), and a step that comes a little
        after its due time still joins. Sessions far out of phase are not waited for (they get
        their own tick, which is cheap when the engine is not busy, and under load ticks take
        long enough that everyone ready meanwhile shares the next one). Returns who is ready.
        """
        if self.batch_window <= 0:
            return ready
        now = time.monotonic()
        deadline = now + self.batch_window
        waiting = {id(h) for h in ready}
        # a step more than a window past its due time is not about to come (a muted caller)
        due = [
            h
            for h in self._handles
            if h is not None
            and not h.closed
            and id(h) not in waiting
            and now - self.batch_window <= h.next_due <= deadline
        ]
        if not due:
            return ready
        while (now := time.monotonic()) < deadline and not all(h.inbox or h.closed for h in due):
            self._wakeup.wait(deadline - now)
            self._wakeup.clear()
        ready, _ = self._ready_handles()
        return ready

    @staticmethod
    def _take_inputs(ready: list[SlotHandle]) -> list[tuple[SlotHandle, np.ndarray | None, float]]:
        picked = []
        for h in ready:
            if h.inbox:
                audio, complete, h.input_seq = h.inbox.popleft()
                picked.append((h, audio, complete))
            else:
                h.input_seq = None
                picked.append((h, None, h.next_due))
        return picked

    def _tick(self, ready: list[tuple[SlotHandle, np.ndarray | None, float]]) -> None:
        start = time.monotonic()
        if self._stall_next_tick:
            time.sleep(self._stall_next_tick)
            self._stall_next_tick = 0.0
        rows = max(h.slot for h, _, _ in ready) + 1
        audio = np.zeros((rows, SAMPLES_PER_STEP), dtype=np.float32)
        active = torch.zeros(rows, dtype=torch.bool)
        generators = [self._scratch_generator] * rows
        for h, samples, _ in ready:
            if samples is not None:
                audio[h.slot] = samples
            active[h.slot] = True
            generators[h.slot] = h.generator
            self.stepper.set_sampling(h.slot, h.sampling)  # writes only when they changed
        out = self.stepper.tick(
            rows, active, torch.from_numpy(audio).to(self.device), None, generators
        )
        self.rollovers = self.stepper.rollovers
        out_np = out.float().cpu().numpy()
        done = time.monotonic()
        compute_ms = (done - start) * 1000
        self.ticks += 1
        self.tick_sizes.append(len(ready))
        for h, samples, complete in ready:
            silence = samples is None
            # The next step is due one step after this one: after the caller's real step, or on
            # the engine's own clock after an inserted silence.
            h.next_due = (h.next_due if silence else complete) + STEP_SECONDS
            queue_ms = max(0.0, (start - complete) * 1000)
            info = StepInfo(h.steps, silence, h.input_seq, queue_ms, compute_ms, complete)
            h.steps += 1
            h.position = self.stepper.position(h.slot)  # a read-only mirror of the stepper's
            latency_ms = (time.monotonic() - complete) * 1000
            h.metrics.record_step(compute_ms, info.queue_ms, latency_ms, silence)
            if h.metrics.ttfa_ms is None:
                h.metrics.ttfa_ms = (done - h.opened_at) * 1000
            try:
                h.on_output(out_np[h.slot].copy(), info)
            except Exception:
                log.exception("a session's output callback failed; closing that session")
                h.close()

    def close(self) -> None:
        """Stop the worker thread; every open session is closed and told so. Safe to call twice."""
        atexit.unregister(self.close)
        for h in list(self._handles):
            if h is not None:
                h.close()
                if h.on_closed is not None:
                    try:
                        h.on_closed(SessionClosed("the engine was closed"))
                    except Exception:
                        log.exception("a session's on_closed callback failed")
        self._running = False
        self._wake()
        self._thread.join(timeout=5)
