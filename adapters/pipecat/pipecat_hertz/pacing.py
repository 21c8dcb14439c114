"""Keeps the audio queued downstream of the service short, so a stall leaves no lasting delay.

Pipecat's output transports play audio in real time and never skip: every frame pushed to them
is played, in order. When the engine stalls for a moment (a slow step, a garbage collection), the
caller's input keeps arriving, the engine's input backlog fills, and once it recovers it runs the
queued steps back to back. Their audio reaches the service as a burst; pushed as is, it would sit
in the transport's queue and every later word would be late by the length of the stall, for the
rest of the call.

``OutputPacer`` keeps an estimate of when the audio pushed so far will have finished playing (the
transport starts playing a frame at once if its queue is empty, and plays in real time), and
acts on the "lead", the audio still queued when the next step arrives:

* When steps keep arriving with more than ``max_lead`` queued, the queue is not draining: whole
  steps are dropped until it is short again. A single early step (the jitter of step times, or of
  a resampler upstream) drains by itself and costs nothing: only ``patience`` arrivals in a row
  over the bound count.
* What remains under ``max_lead`` is removed in silence: when the lead has not fallen below
  ``slack`` for a second, the next step that ends in silence (the gate closed) loses the excess
  from its silent end. Nobody hears a pause get shorter, and the latency returns to what the
  jitter needs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hertz_agents.timing import STEPS_PER_SECOND


@dataclass
class OutputPacer:
    """Admits model steps for playout while the downstream queue is short.

    Args:
        max_lead: Seconds of earlier audio that may stay queued downstream. Below one step
            (0.125 s), so that no step of a stall's backlog stays in the queue.
        patience: Arrivals in a row over ``max_lead`` before steps are dropped.
        slack: Lead kept when a silent step is shortened (a margin for jitter).
        window: Arrivals whose smallest lead is the excess a silent step may lose.
    """

    max_lead: float = 0.1
    patience: int = 3
    slack: float = 0.02
    window: int = STEPS_PER_SECOND
    dropped_steps: int = field(default=0, init=False)
    trimmed_s: float = field(default=0.0, init=False)
    _play_end: float = field(default=0.0, init=False)
    _over: int = field(default=0, init=False)
    _leads: deque[float] = field(default_factory=deque, init=False)

    def lead(self, now: float) -> float:
        """Seconds of admitted audio not yet played at ``now`` (monotonic seconds)."""
        return max(0.0, self._play_end - now)

    def admit(self, duration: float, now: float, *, silent_end: float = 0.0) -> float | None:
        """Plan the playout of a step of ``duration`` seconds that is ready at ``now``.

        The step's last ``silent_end`` seconds are silence.

        Returns None to drop the step, else the seconds to cut from its end (0.0 to play it
        whole; never more than its silent end).
        """
        lead = self.lead(now)
        self._leads.append(lead)
        while len(self._leads) > self.window:
            self._leads.popleft()
        if lead <= self.max_lead:
            self._over = 0
        else:
            self._over += 1
            if self._over >= self.patience:
                self.dropped_steps += 1
                return None
        cut = 0.0
        if silent_end > 0 and len(self._leads) == self.window:
            cut = min(silent_end, duration, max(0.0, min(self._leads) - self.slack))
            if cut > 0:
                self.trimmed_s += cut
                self._leads.clear()  # judge the next cut on leads measured after this one
        self._play_end = max(self._play_end, now) + duration - cut
        return cut

    def reset(self) -> None:
        """Forget the planned playout, the over-lead count and the measured leads (a new call)."""
        self._play_end, self._over = 0.0, 0
        self._leads.clear()
