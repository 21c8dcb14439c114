"""The audio gate for hertz-dev's output, and the one-off measurement of the model's quiet level."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import numpy as np
from livekit.agents import llm

from hertz_agents.audio import rms
from hertz_agents.errors import HertzError
from hertz_agents.timing import SAMPLES_PER_STEP, STEPS_PER_SECOND

from .log import logger
from .models import GateOptions

_quiet_levels: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
_quiet_lock = threading.Lock()


def build_gate(options: GateOptions) -> llm.AudioGate:
    """A fixed gate when the model's quiet level is known, else LiveKit's adaptive one."""
    if options.silence_rms is not None:
        return llm.FixedGate(
            options.silence_rms,
            activation_ratio=options.activation_ratio,
            deactivation_ratio=options.deactivation_ratio,
            min_silence_duration=options.min_silence_duration,
        )
    return llm.AdaptiveNoiseGate(
        activation_ratio=options.activation_ratio,
        deactivation_ratio=options.deactivation_ratio,
        min_silence_duration=options.min_silence_duration,
        window=options.window,
    )


def measure_quiet_level(engine: Any, *, seconds: float = 2.0, seed: int = 0, timeout: float = 60.0) -> float | None:
    """The model's output level while it hears silence: the quietest half second of ``seconds``.

    Blocking (call it where the weights are loaded, e.g. in prewarm); the result is cached per
    engine, so every job of a worker shares one measurement. It takes one engine slot for
    ``seconds`` of model steps, run as fast as the engine computes them. Returns None when no
    slot is free or the engine does not answer in ``timeout`` seconds.
    """
    with _quiet_lock:
        if engine in _quiet_levels:
            return _quiet_levels[engine]
        steps = max(STEPS_PER_SECOND, round(seconds * STEPS_PER_SECOND))
        levels: list[float] = []
        done = threading.Event()
        silence = np.zeros(SAMPLES_PER_STEP, dtype=np.float32)
        handle: Any = None

        def on_output(audio: np.ndarray, info: Any) -> None:
            levels.append(rms(audio))
            if len(levels) >= steps:
                done.set()
            elif handle is not None and not handle.closed:
                handle.submit(silence, time.monotonic())  # the next step as soon as this one is out

        try:
            handle = engine.open(on_output, seed=seed)
        except HertzError as e:
            logger.warning("could not measure hertz-dev's quiet level (%s); the gate will learn it", e)
            return None
        try:
            handle.submit(silence, time.monotonic())
            if not done.wait(timeout):
                logger.warning("hertz-dev's quiet level: no answer in %.0f s; the gate will learn it", timeout)
                return None
        finally:
            handle.close()
        half_second = STEPS_PER_SECOND // 2
        # the quietest stretch, not one quiet step: a single step can dip below the real floor
        windows = np.lib.stride_tricks.sliding_window_view(np.asarray(levels[:steps]), half_second)
        level = float(windows.mean(axis=1).min())
        _quiet_levels[engine] = level
        logger.info("hertz-dev's quiet level: %.5f RMS", level)
        return level
