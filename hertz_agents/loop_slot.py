"""One backend slot seen from an event loop: the only place that crosses the thread boundary.

``DuplexSession`` and each of the server's connections hold one :class:`LoopSlot`. It

* opens the slot without blocking the loop (the backend's blocking ``open`` runs in a worker
  thread) and is cancel-safe: a slot that arrives after the open was cancelled or the
  :class:`LoopSlot` closed is given back at once;
* can be used before the slot is open: input steps submitted meanwhile wait in a bounded queue
  (the oldest dropped and counted) and are fed once it opens, a few at a time so the backend's
  own backlog bound does not drop them; steps that arrive in a burst after it opened (audio
  that queued up elsewhere meanwhile) are fed the same way;
* numbers the input steps it accepts 0, 1, 2... (early ones included), hops each output from the
  backend's thread to the loop (``call_soon_threadsafe``) and pairs it with the input step it
  answers by the backend's sequence number (see ``hertz_agents.backend``); input steps skipped
  over were dropped (by the backend, or from the early queue) and are reported with the next
  result;
* optionally refuses input that runs ahead of real time (the server's rate limit).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from hertz_agents.backend import Backend, PromptSource, Slot, StepInfo
from hertz_agents.errors import SessionClosed
from hertz_agents.metrics import SessionMetrics
from hertz_agents.sampling import SamplingSettings
from hertz_agents.timing import STEP_SECONDS

__all__ = ["EARLY_FEED_AHEAD", "LoopSlot", "StepResult"]

log = logging.getLogger(__name__)

EARLY_FEED_AHEAD = 2
"""Early steps handed to the backend at a time while it catches up (below its backlog bound)."""


@dataclass
class StepResult:
    """One output step, on the event loop, paired with the input step it answers."""

    seq: int | None  # the input step it answers; None: the backend fed silence
    step: int
    audio: np.ndarray  # float32 [2000] at 16 kHz
    compute_ms: float
    queue_ms: float
    latency_ms: float  # from the input step being complete to the output reaching the loop
    input_complete: float  # monotonic; for silence, the backend's reference time
    input_audio: np.ndarray | None = None  # the caller's step it answers (for recordings)
    silence_input: bool = False  # the backend fed this step silence (the caller's audio stalled)
    dropped: list[int] = field(default_factory=list)  # input steps the backend dropped before it


class LoopSlot:
    """A backend slot owned by code on one event loop. Create it on that loop.

    Args:
        on_step: Called on the loop with each :class:`StepResult`. If it raises, the slot closes.
        on_closed: Called on the loop when the backend ends the slot (engine closed, server gone).
        max_early_steps: Input steps kept while the slot is opening (0: submitting before the
            slot is open is an error).
        max_ahead_steps: Input may run this many steps ahead of real time (counted from the
            open); beyond it steps are refused and counted in ``rate_dropped``. None: no limit.
    """

    def __init__(
        self,
        on_step: Callable[[StepResult], None],
        *,
        on_closed: Callable[[BaseException], None] | None = None,
        max_early_steps: int = 0,
        max_ahead_steps: int | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_step = on_step
        self._on_closed = on_closed
        self._max_early = max_early_steps
        self._max_ahead = max_ahead_steps
        self._early: deque[tuple[int, np.ndarray, float]] = deque()  # (seq, audio, complete_at)
        self._early_dropped: list[int] = []  # reported with the next result
        # Handed to the backend, not yet answered, oldest first:
        # (backend's seq, ours, audio, when the caller completed it).
        self._pending: deque[tuple[int, int, np.ndarray, float]] = deque()
        self._last_arrival = 0.0  # when the previous input step was submitted (monotonic)
        self._next_seq = 0
        self._opening: asyncio.Task[None] | None = None
        self._open_call: asyncio.Future[Slot] | None = None  # the backend's open, on a thread
        self._source: Backend | Awaitable[Backend] | None = None
        self._released: asyncio.Future[Slot] | None = None  # an open given back when it ends
        self._open_error: BaseException | None = None
        self._sampling = SamplingSettings()
        self._early_metrics = SessionMetrics()  # stands in for the slot's until it opens
        self.backend: Backend | None = None
        self.handle: Slot | None = None
        self.opened_at = 0.0
        self.submitted = 0
        self.rate_dropped = 0
        self.early_dropped = 0
        self.closed = False
        self.error: BaseException | None = None  # why the backend ended the slot, if it did

    # -- opening ----------------------------------------------------------------------------
    def start(
        self,
        backend: Backend | Awaitable[Backend],
        *,
        sampling: SamplingSettings | None = None,
        prompt: PromptSource | None = None,
        seed: int | None = None,
    ) -> None:
        """Begin opening a slot on ``backend`` (or what an awaitable gives); returns at once."""
        if self._opening is not None:
            raise RuntimeError("this slot is already opening or open")
        if sampling is not None:
            self._sampling = sampling
        self._source = backend
        self._opening = self._loop.create_task(self._open(backend, prompt, seed))

    async def wait_open(self) -> None:
        """Wait until the slot is open; raises why it could not open (``EngineFull``...).

        Cancelling the wait does not cancel the open (:meth:`close` does).
        """
        if self._opening is None:
            raise RuntimeError("call start() first")
        try:
            await asyncio.shield(self._opening)
        except asyncio.CancelledError:
            if not self._opening.cancelled():
                raise  # the waiter was cancelled, not the open
        if self._open_error is not None:
            raise self._open_error
        if self.handle is None:
            raise self.error or SessionClosed("the session was closed before its slot opened")

    @property
    def opened(self) -> bool:
        """The slot is open (and not closed)."""
        return self.handle is not None and not self.closed

    async def _open(
        self, source: Backend | Awaitable[Backend], prompt: PromptSource | None, seed: int | None
    ) -> None:
        try:
            backend = await source if inspect.isawaitable(source) else source
            self.backend = backend
            call = self._open_call = asyncio.ensure_future(
                asyncio.to_thread(
                    backend.open,
                    self._backend_output,
                    sampling=self._sampling,
                    prompt=prompt,
                    seed=seed,
                    on_closed=self._backend_closed_threadsafe,
                )
            )
            try:
                handle = await asyncio.shield(call)
            except asyncio.CancelledError:
                self._give_back_when_opened()
                raise
        except asyncio.CancelledError:
            return  # closed while opening: wait_open says so
        except Exception as e:  # handed to wait_open, and to readers through on_closed
            self._open_error = e
            self._backend_closed(e)
            return
        if self.closed:
            handle.close()
            return
        self.handle = handle
        self.opened_at = time.monotonic()
        handle.metrics.dropped_input_steps += self.early_dropped
        if handle.sampling != self._sampling:  # changed while opening
            handle.update_sampling(self._sampling)
        self._feed_early()

    # -- input ------------------------------------------------------------------------------
    def submit(self, audio: np.ndarray, complete_at: float | None = None) -> int | None:
        """Queue one input step (float32 ``[2000]`` at 16 kHz), complete at ``complete_at``.

        Returns:
            Its sequence number (results name it in ``StepResult.seq``), or None when it was
            refused for running ahead of real time.
        """
        if self.closed:
            raise self.error or SessionClosed("this session is closed; open a new one")
        now = time.monotonic()
        complete_at = now if complete_at is None else complete_at
        if self.handle is not None and self._max_ahead is not None:
            allowed = self._max_ahead + int((now - self.opened_at) / STEP_SECONDS) + 1
            if self._next_seq >= allowed:
                self.rate_dropped += 1
                return None
        seq = self._next_seq
        self._next_seq += 1
        # Steps that come faster than real time while the backend already has a few (audio
        # that queued up elsewhere: behind Pipecat's StartFrame while the slot opened, after a
        # network stall) are fed as it answers, like early ones: handed on at once, more than
        # its backlog bound would be dropped. Steps at real-time pace always go straight on, so
        # a backend that falls behind still drops the oldest to bound the latency.
        burst = (
            self.handle is not None
            and now - self._last_arrival < STEP_SECONDS / 2
            and len(self._pending) >= EARLY_FEED_AHEAD
        )
        self._last_arrival = now
        if self.handle is None or self._early or burst:
            if self.handle is None and self._max_early <= 0:
                raise RuntimeError("submit before the slot is open (wait_open first)")
            self._early.append((seq, audio, complete_at))
            while len(self._early) > max(self._max_early, EARLY_FEED_AHEAD):
                self._early_dropped.append(self._early.popleft()[0])
                self.early_dropped += 1
                if self.handle is not None:
                    self.handle.metrics.dropped_input_steps += 1
            self._feed_early()
            return seq
        self._submit_now(seq, audio, complete_at)
        return seq

    def _submit_now(
        self, seq: int, audio: np.ndarray, complete_at: float, handed_at: float | None = None
    ) -> None:
        assert self.handle is not None
        backend_seq = self.handle.submit(audio, complete_at if handed_at is None else handed_at)
        self.submitted += 1
        self._pending.append((backend_seq, seq, audio, complete_at))

    def _feed_early(self) -> None:
        """Hand waiting early steps to the backend, a few ahead of what it has answered.

        The backend is told each is complete now, when it gets it: an engine paces a slot by its
        input's completion times, and seeing steps that were complete long ago (while the slot
        opened) it would take the short waits between them for a stalled caller and step the
        model on silence in between. Results still report when the caller completed them.
        """
        while self._early and len(self._pending) < EARLY_FEED_AHEAD and self.opened:
            self._submit_now(*self._early.popleft(), handed_at=time.monotonic())

    # -- control ----------------------------------------------------------------------------
    @property
    def sampling(self) -> SamplingSettings:
        """The sampling settings in effect (or to be used once open)."""
        return self.handle.sampling if self.handle is not None else self._sampling

    def update_sampling(self, sampling: SamplingSettings) -> None:
        """Use ``sampling`` from the next step on (or from the first, before the slot opens)."""
        self._sampling = sampling
        if self.handle is not None:
            self.handle.update_sampling(sampling)

    @property
    def metrics(self) -> SessionMetrics:
        """The slot's figures (before it opens, a stand-in counting early drops)."""
        if self.handle is not None:
            return self.handle.metrics
        self._early_metrics.dropped_input_steps = self.early_dropped
        return self._early_metrics

    def close(self) -> None:
        """Free the slot, or give it back as soon as it opens. Idempotent, never blocks."""
        if self.closed:
            return
        self.closed = True
        self._early.clear()
        if self.handle is not None:
            self.handle.close()
        elif self._opening is not None and not self._opening.done():
            self._opening.cancel()
            self._give_back_when_opened()
            source = self._source
            if inspect.iscoroutine(source) and inspect.getcoroutinestate(source) == "CORO_CREATED":
                source.close()  # the open never started: no "never awaited" warning

    def _give_back_when_opened(self) -> None:
        """The slot is being taken on another thread: give it back as soon as it arrives."""
        call, self._open_call = self._open_call, None
        if call is not None:
            self._released = call
            call.add_done_callback(_close_when_opened)

    async def wait_released(self) -> None:
        """After :meth:`close`, wait until a slot that was still being opened has been given back.

        Returns at once when no open was in flight. Cancelling the wait changes nothing.
        """
        call = self._released
        if call is not None and not call.done():
            await asyncio.wait({call})

    # -- backend thread ---------------------------------------------------------------------
    def _backend_output(self, audio: np.ndarray, info: StepInfo) -> None:
        ready = time.monotonic()
        try:
            self._loop.call_soon_threadsafe(self._deliver, audio, info, ready)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _backend_closed_threadsafe(self, error: BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._backend_closed, error)
        except RuntimeError:  # the loop is gone
            pass

    # -- loop -------------------------------------------------------------------------------
    def _backend_closed(self, error: BaseException) -> None:
        if self.closed:
            return
        self.closed, self.error = True, error
        self._early.clear()
        if self._on_closed is not None:
            self._on_closed(error)

    def _deliver(self, audio: np.ndarray, info: StepInfo, ready: float) -> None:
        if self.closed:
            return
        dropped, self._early_dropped = self._early_dropped, []
        seq: int | None = None
        input_audio: np.ndarray | None = None
        input_complete = info.input_complete
        if info.input_seq is not None:
            while self._pending and self._pending[0][0] < info.input_seq:
                dropped.append(self._pending.popleft()[1])  # the backend dropped it
            if self._pending and self._pending[0][0] == info.input_seq:
                _, seq, input_audio, input_complete = self._pending.popleft()
        latency_ms = max(0.0, (ready - input_complete) * 1000)
        result = StepResult(
            seq,
            info.step,
            audio,
            info.compute_ms,
            info.queue_ms,
            latency_ms,
            input_complete,
            input_audio,
            info.silence_input,
            sorted(dropped),
        )
        self._feed_early()
        try:
            self._on_step(result)
        except Exception:
            log.exception("handling an output step failed; closing that session")
            self.close()


def _close_when_opened(opening: asyncio.Future[Slot]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()
