"""Per-call step statistics: processing time aggregated once a second, stalls, a call summary.

A model step arrives eight times a second. Reporting each one (a ``MetricsFrame``, a log line, an
RTVI ``metrics`` message to every client) floods logs and clients, so ``StepStats`` collects the
steps and hands out one mean processing time per second, and a summary when the call ends. It
also decides when a stall is worth a WARNING: once per second at most, however many steps it cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hertz_agents.timing import STEP_SECONDS, STEPS_PER_SECOND

STALL_GAP_S = 3.5 * STEP_SECONDS
"""A gap between two model steps this long means the engine stalled.

When the caller's audio stops, the engine steps on silence ``stall_timeout`` (2 steps) after the
next step was due, so its own policy leaves up to 3 steps between outputs; a stall is longer.
"""

WARNING_INTERVAL_S = 1.0
"""Stall and dropped-step warnings are logged at most this often."""


@dataclass
class StepStats:
    """Statistics of one call's model steps (one session or several, after a prompt change)."""

    report_every: int = STEPS_PER_SECOND
    processing_s: list[float] = field(default_factory=list)
    steps: int = 0
    stalls: int = 0
    longest_gap_s: float = 0.0
    dropped_steps: int = 0
    _pending: list[float] = field(default_factory=list)
    _last_step_at: float | None = None
    _last_warning_at: float = -1e9
    _unreported_drops: int = 0

    def add_step(self, processing_s: float | None) -> float | None:
        """Count a delivered step (its processing time, if it answered caller audio).

        Returns the mean processing time of the last ``report_every`` timed steps when it is time
        to report one, else None.
        """
        self.steps += 1
        if processing_s is None:
            return None
        self.processing_s.append(processing_s)
        self._pending.append(processing_s)
        if len(self._pending) < self.report_every:
            return None
        mean = float(np.mean(self._pending))
        self._pending.clear()
        return mean

    def arrival(self, now: float) -> float | None:
        """Note a step's arrival at ``now`` (monotonic); returns the gap if it was a stall."""
        last, self._last_step_at = self._last_step_at, now
        if last is None or now - last < STALL_GAP_S:
            return None
        gap = now - last
        self.stalls += 1
        self.longest_gap_s = max(self.longest_gap_s, gap)
        return gap

    def drop(self) -> None:
        """Count a step the pacer dropped."""
        self.dropped_steps += 1
        self._unreported_drops += 1

    def warning_due(self, now: float) -> bool:
        """True at most once per ``WARNING_INTERVAL_S``: the caller logs its warning then."""
        if now - self._last_warning_at < WARNING_INTERVAL_S:
            return False
        self._last_warning_at = now
        return True

    def take_unreported_drops(self) -> int:
        """Dropped steps not yet in a warning (and reset the count)."""
        count, self._unreported_drops = self._unreported_drops, 0
        return count

    def summary(self) -> str:
        """One line about the call: steps, processing time percentiles, stalls and drops."""
        parts = [f"{self.steps} model steps"]
        if self.processing_s:
            ms = np.array(self.processing_s) * 1000
            parts.append(
                f"processing median {np.median(ms):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms, "
                f"max {ms.max():.1f} ms"
            )
        parts.append(f"{self.stalls} stalls (longest gap {self.longest_gap_s * 1000:.0f} ms)")
        parts.append(f"{self.dropped_steps} steps dropped")
        return ", ".join(parts)
