"""The seam between a session and what runs the model: a backend hands out slots.

A *backend* is a local :class:`hertz_agents.engine.Engine` or a
:class:`hertz_agents.remote.RemoteEngine` (a hertz server). Both satisfy :class:`Backend`; the
slots they open satisfy :class:`Slot`. Everything above the seam (``DuplexSession``, the
server's connections, the adapters) uses only what is declared here, so either backend can be
swapped in without changing a line above it. ``hertz_agents.resolve`` turns a ``model=`` value
into a backend.

The contract in prose:

* ``Backend.open`` is blocking (a new prompt is prefilled there, or a round trip to a server
  is made): call it from a worker thread, never an event loop.
* ``Slot.submit`` is thread-safe and never blocks. It numbers the steps it is given 0, 1, 2...
  (the *input sequence number*); each output step names the input step it answers by that
  number (:attr:`StepInfo.input_seq`), or None when the backend fed silence because the caller's
  audio stalled. Inputs are consumed in order; a backend that falls behind drops the oldest
  (counted in ``metrics.dropped_input_steps``), which shows as a gap in the numbers.
* ``on_output`` is called from the backend's own thread, once per model step, with float32
  ``[SAMPLES_PER_STEP]`` audio at 16 kHz; it must not block. ``on_closed`` is called (from any
  thread) when the backend, not the caller, ends the slot.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # types only: importing the seam stays cheap (no torch)
    from hertz_agents.metrics import SessionMetrics
    from hertz_agents.sampling import SamplingSettings

__all__ = [
    "REMOTE_SCHEME",
    "Backend",
    "BackendStats",
    "ClosedCallback",
    "OutputCallback",
    "PromptSource",
    "Slot",
    "StepInfo",
    "is_remote_url",
]

REMOTE_SCHEME = "hertz://"
"""A ``model=`` value starting with this names a hertz server: ``hertz://HOST:PORT[?...]``."""


def is_remote_url(model: object) -> bool:
    """True when ``model`` is a ``hertz://`` URL (a remote backend), not a name or directory."""
    return isinstance(model, str) and model.startswith(REMOTE_SCHEME)


@dataclass
class StepInfo:
    """What the backend knows about one output step, passed with its audio.

    Attributes:
        step: The slot's model step index, 0, 1, 2...
        silence_input: The backend fed this step silence (the caller's audio stalled).
        input_seq: The input sequence number (from ``Slot.submit``) of the step this one
            answers; None when silence was fed.
        queue_ms: From the input step being complete to the batched step starting.
        compute_ms: That batched step's duration (a remote backend: as measured on the server).
        input_complete: ``time.monotonic()`` when the input step was complete (for silence, the
            backend's reference time: when the step was due, or when it arrived).
    """

    step: int
    silence_input: bool
    input_seq: int | None
    queue_ms: float
    compute_ms: float
    input_complete: float


OutputCallback = Callable[[np.ndarray, StepInfo], None]
"""``on_output(audio, info)``: one model step, float32 ``[2000]`` at 16 kHz, on the backend's
thread."""

ClosedCallback = Callable[[BaseException], None]
"""``on_closed(error)``: the backend ended the slot (engine closed, server gone), any thread."""

PromptSource = str | Path | np.ndarray
"""A prompt: a WAV path, a prompt name known to a server, or stereo audio ``[2, n]`` at 16 kHz."""


@runtime_checkable
class Slot(Protocol):
    """One conversation's place in a backend. ``submit`` and ``close`` are thread-safe."""

    @property
    def sampling(self) -> SamplingSettings:
        """The sampling settings in effect."""
        ...

    @property
    def metrics(self) -> SessionMetrics:
        """This slot's figures (steps, latency, drops)."""
        ...

    @property
    def closed(self) -> bool:
        """True once the slot is closed, by its caller or by the backend."""
        ...

    def submit(self, audio: np.ndarray, complete_at: float | None = None) -> int:
        """Queue one input step (float32 ``[2000]`` at 16 kHz); returns its sequence number.

        ``complete_at`` is the ``time.monotonic()`` at which the step was complete (default:
        now). Raises ``SessionClosed`` once the slot is closed.
        """
        ...

    def update_sampling(self, sampling: SamplingSettings) -> None:
        """Use ``sampling`` from the next step on."""
        ...

    def close(self) -> None:
        """Free the slot. Idempotent, never blocks."""
        ...


@runtime_checkable
class Backend(Protocol):
    """Something that runs the model for many slots: a local engine or a remote server."""

    @property
    def max_sessions(self) -> int:
        """Slots this backend holds in all (its capacity)."""
        ...

    @property
    def active_sessions(self) -> int:
        """Slots in use now (for a remote backend, when last heard)."""
        ...

    @property
    def occupancy(self) -> float:
        """Share of slots in use, 0..1 (LiveKit's ``load_fnc``, the server's readiness)."""
        ...

    def open(
        self,
        on_output: OutputCallback,
        *,
        sampling: SamplingSettings | None = None,
        prompt: PromptSource | None = None,
        seed: int | None = None,
        on_closed: ClosedCallback | None = None,
    ) -> Slot:
        """Take a slot (blocking). Raises ``EngineFull`` when none is free."""
        ...


@runtime_checkable
class BackendStats(Protocol):
    """The figures a local engine reports besides the :class:`Backend` ones (for ``/metrics``)."""

    @property
    def alive(self) -> bool:
        """The worker thread runs."""
        ...

    @property
    def ticks(self) -> int:
        """Batched steps run so far."""
        ...

    @property
    def tick_sizes(self) -> Collection[int]:
        """Sessions per tick, over recent ticks."""
        ...

    def bytes_per_session(self) -> int:
        """Device memory one slot holds (KV caches, states)."""
        ...
