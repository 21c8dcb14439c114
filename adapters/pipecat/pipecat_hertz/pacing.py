"""Keeps the audio queued downstream of the service bounded, so a stall leaves no lasting delay.

Pipecat's output transports play audio in real time and never skip: every frame pushed to them
is played, in order. When the engine stalls for a moment (a slow step, a garbage collection), the
caller's input keeps arriving, the engine's input backlog fills, and once it recovers it runs the
queued steps back to back. Their audio reaches the service as a burst; pushed as is, it would sit
in the transport's queue and every later word would be late by the length of the stall, for the
rest of the call.

``OutputPacer`` keeps an estimate of when the audio pushed so far will have finished playing (the
transport starts playing a frame at once if its queue is empty, and plays in real time). When
steps keep arriving while more than ``max_lead`` seconds of earlier audio are still queued, the
queue is not draining: steps are dropped until it is short again, so the latency returns to
normal within a few steps. A single early step (the jitter of step times, or of a resampler
upstream) drains by itself and costs nothing: only ``patience`` arrivals in a row over the
bound count.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OutputPacer:
    """Admits model steps for playout while the downstream queue is short.

    Args:
        max_lead: Seconds of earlier audio that may stay queued downstream. Below one step
            (0.125 s), so that no step of a stall's backlog stays in the queue.
        patience: Arrivals in a row over ``max_lead`` before steps are dropped.
    """

    max_lead: float = 0.1
    patience: int = 3
    dropped_steps: int = field(default=0, init=False)
    _play_end: float = field(default=0.0, init=False)
    _over: int = field(default=0, init=False)

    def lead(self, now: float) -> float:
        """Seconds of admitted audio not yet played at ``now`` (monotonic seconds)."""
        return max(0.0, self._play_end - now)

    def admit(self, duration: float, now: float) -> bool:
        """Whether to push a step of ``duration`` seconds that is ready at ``now``; counts drops."""
        if self.lead(now) <= self.max_lead:
            self._over = 0
        else:
            self._over += 1
            if self._over >= self.patience:
                self.dropped_steps += 1
                return False
        self._play_end = max(self._play_end, now) + duration
        return True

    def reset(self) -> None:
        self._play_end, self._over = 0.0, 0
