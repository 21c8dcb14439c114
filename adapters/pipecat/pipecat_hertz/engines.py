"""One engine per model per process, loaded once in the background and shared by every service.

``load_engine`` already returns the process's shared engine for a model; this module only makes
sure the (blocking) load starts as early as possible, runs once, and never blocks an event loop:
creating a ``HertzDuplexService`` starts it, ``await HertzDuplexService.preload()`` waits for it.
The load also measures the model's quiet level for the speech gate (``quiet_level``).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from loguru import logger

from hertz_agents.audio import rms
from hertz_agents.engine import Engine, load_engine
from hertz_agents.errors import HertzError
from hertz_agents.session import REMOTE_SCHEME
from hertz_agents.timing import SAMPLES_PER_STEP, STEPS_PER_SECOND

QUIET_MEASURE_STEPS = 2 * STEPS_PER_SECOND  # model steps on silence
QUIET_WINDOW_STEPS = STEPS_PER_SECOND // 2  # the quietest half second of them is the quiet level

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hertz-load")
_loads: dict[str, Future[Engine]] = {}
_lock = threading.Lock()
_quiet: weakref.WeakKeyDictionary[Any, float | None] = weakref.WeakKeyDictionary()
_quiet_lock = threading.Lock()


def quiet_level(engine: Any, *, timeout: float = 60.0) -> float | None:
    """RMS of the model's output while it hears silence, measured once per engine (blocking).

    Runs ``QUIET_MEASURE_STEPS`` steps of silence through one slot, as fast as the engine computes
    them, and takes the quietest half second (a conversational model may also say something).
    None if the engine has no free slot or does not answer in ``timeout`` seconds.
    """
    with _quiet_lock:
        if engine in _quiet:
            return _quiet[engine]
        levels: list[float] = []
        done = threading.Event()
        silence = np.zeros(SAMPLES_PER_STEP, dtype=np.float32)
        handle: Any = None

        def on_output(audio: np.ndarray, info: Any) -> None:
            levels.append(rms(audio))
            if len(levels) >= QUIET_MEASURE_STEPS:
                done.set()
            elif handle is not None and not handle.closed:
                handle.submit(silence, time.monotonic())

        try:
            handle = engine.open(on_output, seed=0)
        except HertzError as e:
            logger.warning(f"could not measure hertz-dev's quiet level ({e}); the gate uses its default threshold")
            return None
        try:
            handle.submit(silence, time.monotonic())
            if not done.wait(timeout):
                logger.warning("hertz-dev's quiet level: no answer; the gate uses its default threshold")
                return None
        finally:
            handle.close()
        windows = np.lib.stride_tricks.sliding_window_view(np.asarray(levels), QUIET_WINDOW_STEPS)
        level = float(windows.mean(axis=1).min())
        _quiet[engine] = level
        logger.info(f"hertz-dev's quiet level: {level:.5f} RMS")
        return level


def _load_and_measure(model: str | os.PathLike[str], **engine_options: Any) -> Engine:
    engine = load_engine(model, **engine_options)
    quiet_level(engine)
    return engine


def is_loadable(model: Any) -> bool:
    """True for a model name or directory (loaded here); False for an engine or a hertz:// URL."""
    if isinstance(model, str):
        return not model.startswith(REMOTE_SCHEME)
    return isinstance(model, os.PathLike)


def start_loading(model: str | os.PathLike[str], **engine_options: Any) -> Future[Engine]:
    """The future of the shared engine for ``model``, starting the load if nobody has yet.

    ``engine_options`` (``device``, ``dtype``, ``max_sessions``...) only count for the first
    caller; later callers get the same engine. A failed load is retried by the next caller.
    """
    key = os.fspath(model)
    with _lock:
        future = _loads.get(key)
        if future is None or (future.done() and (future.cancelled() or future.exception() is not None)):
            future = _executor.submit(_load_and_measure, model, **engine_options)
            _loads[key] = future
        return future
