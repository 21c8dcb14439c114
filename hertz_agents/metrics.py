"""Latency and throughput figures for sessions and the engine, kept in bounded windows."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

from hertz_agents.timing import STEP_SECONDS

WINDOW = 2048  # steps kept for percentiles (about 4 minutes)


def percentiles(values: Iterable[float], qs: Sequence[int] = (50, 90, 99)) -> dict[int, float]:
    """The ``qs`` percentiles of ``values`` (NaN for each when there are none)."""
    data = list(values)
    if not data:
        return {q: float("nan") for q in qs}
    arr = np.asarray(data, dtype=np.float64)
    return {q: float(np.percentile(arr, q)) for q in qs}


class SessionMetrics:
    """Per-session figures. Written by the engine thread, read from anywhere."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.steps = 0
        self.late_steps = 0
        self.silence_steps = 0
        self.dropped_input_steps = 0
        self.dropped_output_steps = 0
        self.step_ms: deque[float] = deque(maxlen=WINDOW)
        self.queue_ms: deque[float] = deque(maxlen=WINDOW)
        self.latency_ms: deque[float] = deque(maxlen=WINDOW)
        self.ttfa_ms: float | None = None
        self.compute_s = 0.0

    def record_step(
        self, step_ms: float, queue_ms: float, latency_ms: float, silence: bool
    ) -> None:
        """Count one output step with its compute, queueing and end-to-end latency."""
        with self._lock:
            self.steps += 1
            self.step_ms.append(step_ms)
            self.queue_ms.append(queue_ms)
            self.latency_ms.append(latency_ms)
            self.compute_s += step_ms / 1000
            self.silence_steps += int(silence)
            # A step is late when its audio comes out more than a step after its input was complete.
            self.late_steps += int(latency_ms > STEP_SECONDS * 1000)

    def snapshot(self) -> dict[str, float | int | None]:
        """The figures as a plain dict (percentiles over the recent window)."""
        with self._lock:
            step, queue, latency = (
                percentiles(self.step_ms),
                percentiles(self.queue_ms),
                percentiles(self.latency_ms),
            )
            audio_s = self.steps * STEP_SECONDS
            return {
                "steps": self.steps,
                "late_steps": self.late_steps,
                "silence_steps": self.silence_steps,
                "dropped_input_steps": self.dropped_input_steps,
                "dropped_output_steps": self.dropped_output_steps,
                "step_ms_median": step[50],
                "step_ms_p90": step[90],
                "step_ms_p99": step[99],
                "queue_ms_median": queue[50],
                "latency_ms_median": latency[50],
                "latency_ms_p90": latency[90],
                "rtf": self.compute_s / audio_s if audio_s else float("nan"),
                "ttfa_ms": self.ttfa_ms,
            }

    def recent_latency_ms(self, n: int) -> list[float]:
        """The latencies of the last ``n`` steps, oldest first."""
        with self._lock:
            return list(self.latency_ms)[-n:]
