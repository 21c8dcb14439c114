"""One engine slot seen from the server's event loop: numbered input steps in, results out.

The engine calls back on its own thread; the bridge hands each output to the event loop with
``call_soon_threadsafe`` and pairs it with the input step it answers. Inputs are numbered 0, 1,
2... in the order they are submitted; the engine consumes them in that order, may drop the
oldest when compute falls behind (reported in ``dropped``), and may insert silence when the
client's audio stalls (``seq`` None). The pairing uses the completion time each step is
submitted with, which the engine hands back in ``StepInfo.input_complete``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hertz_agents.metrics import SessionMetrics
from hertz_agents.sampling import SamplingSettings
from hertz_agents.timing import STEP_SECONDS

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """One output step, on the event loop."""

    seq: int | None  # the input step it answers; None: the engine inserted silence
    step: int
    audio: np.ndarray  # float32 [2000] at 16 kHz
    compute_ms: float
    queue_ms: float
    latency_ms: float  # from the input step being complete to the output being ready
    dropped: list[int] = field(default_factory=list)  # input steps the engine dropped before this one


class SlotBridge:
    """Owns one engine slot for a connection. Everything but the engine callback runs on the loop.

    Args:
        engine: The server's engine (the ``Engine`` backend seam).
        on_step: Called on the loop with each :class:`StepResult`.
        max_ahead_steps: Audio may run this many steps ahead of real time; beyond it steps are
            dropped here (``rate_dropped``), so a client cannot make the engine tick faster.
    """

    def __init__(self, engine: Any, on_step: Callable[[StepResult], None], *, max_ahead_steps: int) -> None:
        self.engine = engine
        self._loop = asyncio.get_running_loop()
        self._on_step = on_step
        self._max_ahead = max_ahead_steps
        self._pending: deque[tuple[float, int]] = deque()  # (complete_at, seq), oldest first
        self._last_complete = 0.0
        self.handle: Any = None
        self.next_seq = 0
        self.rate_dropped = 0
        self.opened_at = 0.0
        self.closed = False

    async def open(
        self, *, sampling: SamplingSettings, prompt: str | Path | np.ndarray | None, seed: int | None
    ) -> None:
        """Take a slot (the engine's blocking ``open`` runs in a worker thread)."""
        call = asyncio.ensure_future(asyncio.to_thread(
            self.engine.open, self._engine_output, sampling=sampling, prompt=prompt, seed=seed))
        try:
            self.handle = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The connection went away while the slot was being set up: free it once it exists.
            call.add_done_callback(lambda f: f.result().close() if not f.cancelled() and not f.exception() else None)
            raise
        self.opened_at = time.monotonic()
        if self.closed:  # closed while opening
            self.handle.close()

    @property
    def metrics(self) -> SessionMetrics:
        return self.handle.metrics

    @property
    def sampling(self) -> SamplingSettings:
        return self.handle.sampling

    def update_sampling(self, settings: SamplingSettings) -> None:
        self.handle.update_sampling(settings)

    def submit(self, audio: np.ndarray) -> int | None:
        """Queue one input step (float32 [2000]); its number, or None if it ran ahead of real time."""
        now = time.monotonic()
        allowed = self._max_ahead + int((now - self.opened_at) / STEP_SECONDS) + 1
        if self.next_seq >= allowed:
            self.rate_dropped += 1
            return None
        complete_at = max(now, self._last_complete + 1e-6)  # unique: it names this step on the way back
        self._last_complete = complete_at
        seq = self.next_seq
        self.next_seq += 1
        self._pending.append((complete_at, seq))
        self.handle.submit(audio, complete_at)
        return seq

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.handle is not None:
                self.handle.close()

    # -- engine thread --------------------------------------------------------------------
    def _engine_output(self, audio: np.ndarray, info: Any) -> None:
        ready = time.monotonic()
        try:
            self._loop.call_soon_threadsafe(self._deliver, audio, info, ready)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    # -- loop -----------------------------------------------------------------------------
    def _deliver(self, audio: np.ndarray, info: Any, ready: float) -> None:
        if self.closed:
            return
        seq: int | None = None
        dropped: list[int] = []
        if not info.silence_input:
            while self._pending:
                complete_at, pending_seq = self._pending.popleft()
                if complete_at == info.input_complete:
                    seq = pending_seq
                    break
                dropped.append(pending_seq)  # older than the one consumed: the engine dropped it
        latency_ms = max(0.0, (ready - info.input_complete) * 1000)
        result = StepResult(seq, info.step, audio, info.compute_ms, info.queue_ms, latency_ms, dropped)
        try:
            self._on_step(result)
        except Exception:
            log.exception("handling an output step failed; closing that session")
            self.close()
