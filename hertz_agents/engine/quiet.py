"""The model's quiet level: how loud its output is while it hears only silence.

hertz-dev never outputs exact zeros: while it listens it makes a low noise floor, and its level
differs from model to model. Gates that split the continuous output into speech (the Pipecat and
LiveKit adapters each have one) set their threshold from this level. It is measured once per
engine by stepping one slot on silence, and cached.

One name everywhere for this quantity: the *quiet level* (``quiet_level``: linear RMS of the
16 kHz output, full scale 1.0). Code that takes it as a setting calls it ``quiet_level`` too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref

import numpy as np

from hertz_agents.audio import rms
from hertz_agents.backend import Slot, StepInfo
from hertz_agents.engine.engine import Engine
from hertz_agents.errors import HertzError
from hertz_agents.timing import SAMPLES_PER_STEP, STEPS_PER_SECOND

__all__ = ["QUIET_MEASURE_STEPS", "QUIET_WINDOW_STEPS", "measure_quiet_level"]

log = logging.getLogger(__name__)

QUIET_MEASURE_STEPS = 2 * STEPS_PER_SECOND
"""Model steps stepped on silence for one measurement."""

QUIET_WINDOW_STEPS = STEPS_PER_SECOND // 2
"""The quietest run of this many steps is the quiet level: a single step can dip below the real
floor, and a conversational model may also say something while it hears silence."""

_levels: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()
_locks: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_locks_lock = threading.Lock()


def _lock_for(engine: Engine) -> threading.Lock:
    with _locks_lock:
        lock = _locks.get(engine)
        if lock is None:
            lock = _locks[engine] = threading.Lock()
        return lock


def measure_quiet_level(
    engine: object, *, steps: int = QUIET_MEASURE_STEPS, seed: int = 0, timeout: float = 60.0
) -> float | None:
    """RMS of the model's output while it hears silence, measured once per engine (blocking).

    Steps one slot of ``engine`` on ``steps`` steps of silence, as fast as the engine computes
    them, and returns the mean RMS of the quietest ``QUIET_WINDOW_STEPS`` consecutive steps. The
    first successful measurement is cached for the engine's lifetime and returned by every later
    call (whatever its arguments); concurrent first calls measure once. Call it where blocking
    is fine (a loader thread, a worker's prewarm), never on an event loop.

    Args:
        engine: A local :class:`Engine`. Anything else (a ``RemoteEngine``: measuring would take
            a slot of a shared server) is not measured and gives None.
        steps: Steps of silence to run; at least ``QUIET_WINDOW_STEPS``.
        seed: Seed of the measuring slot's sampler, so a measurement is repeatable.
        timeout: Seconds to wait for the engine's answers.

    Returns:
        The level (linear RMS of the 16 kHz output, full scale 1.0), or None when the engine is
        not a local one, has no free slot, is closed, or does not answer in ``timeout`` seconds;
        callers then fall back to a default threshold. A failure is not cached.
    """
    if not isinstance(engine, Engine):
        return None
    steps = max(steps, QUIET_WINDOW_STEPS)
    with _lock_for(engine):
        level = _levels.get(engine)
        if level is None:
            level = _measure(engine, steps, seed, timeout)
            if level is not None:
                _levels[engine] = level
                log.info("the model's quiet level: %.5f RMS", level)
        return level


def _measure(engine: Engine, steps: int, seed: int, timeout: float) -> float | None:
    levels: list[float] = []
    done = threading.Event()
    silence = np.zeros(SAMPLES_PER_STEP, dtype=np.float32)
    handle: Slot | None = None

    def on_output(audio: np.ndarray, info: StepInfo) -> None:
        levels.append(rms(audio))
        if len(levels) >= steps:
            done.set()
        elif handle is not None and not handle.closed:
            with contextlib.suppress(HertzError):  # closed meanwhile (a timeout)
                handle.submit(silence)  # the next step as soon as this one is out

    def on_closed(error: BaseException) -> None:
        done.set()  # the engine ended the slot: stop waiting

    try:
        handle = engine.open(on_output, seed=seed, on_closed=on_closed)
    except HertzError as e:
        log.warning("could not measure the model's quiet level (%s)", e)
        return None
    try:
        handle.submit(silence)
        answered = done.wait(timeout)
    finally:
        handle.close()
    heard = levels[:steps]  # the engine may have stepped once more before the close
    if not answered or len(heard) < steps:
        log.warning(
            "could not measure the model's quiet level: %d of %d steps in %.0f s",
            len(heard),
            steps,
            timeout,
        )
        return None
    windows = np.lib.stride_tricks.sliding_window_view(
        np.asarray(heard), QUIET_WINDOW_STEPS
    )  # [steps - w + 1, w]
    return float(windows.mean(axis=1).min())
