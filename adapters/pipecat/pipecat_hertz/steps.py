"""When each of the caller's steps was complete, for the service's processing-time metric.

The session cuts the caller's audio into 125 ms steps out of sight of the service, so the service
counts the caller's samples itself (in 16 kHz samples, whatever the input rate) and notes the
wall time at which each step's last sample arrived. Output chunks then take those times in order:
the engine answers steps in order, skips none but the ones it drops from a full backlog (oldest
first, counted in the session's metrics), and inserts silence steps that answer no input.
"""

from __future__ import annotations

import time
from collections import deque

from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP


class InputSteps:
    """Wall times at which the caller's steps were complete, oldest first."""

    def __init__(self) -> None:
        self._heard = 0.0  # caller audio received, in 16 kHz samples
        self._next_end = float(SAMPLES_PER_STEP)
        self._ready: deque[float] = deque(maxlen=64)
        self._dropped_seen = 0

    def heard(self, frames: int, sample_rate: int) -> None:
        """``frames`` samples at ``sample_rate`` arrived now."""
        self._heard += frames * SAMPLE_RATE / sample_rate
        while self._heard >= self._next_end:
            self._ready.append(time.time())
            self._next_end += SAMPLES_PER_STEP

    def answered(self, silence_input: bool, dropped_input_steps: int) -> float | None:
        """The completion time of the step an output chunk answers (None for inserted silence);
        ``dropped_input_steps`` is the session's running count of steps the engine dropped."""
        for _ in range(dropped_input_steps - self._dropped_seen):
            if self._ready:
                self._ready.popleft()
        self._dropped_seen = dropped_input_steps
        if silence_input or not self._ready:
            return None
        return self._ready.popleft()
