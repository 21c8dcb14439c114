"""One engine per model per process, loaded once in the background and shared by every service.

``load_engine`` already returns the process's shared engine for a model; this module only makes
sure the (blocking) load starts as early as possible, runs once, and never blocks an event loop:
creating a ``HertzDuplexService`` starts it, ``await HertzDuplexService.preload()`` waits for it.
The load also measures the model's quiet level for the speech gate (the core's
``measure_quiet_level``, cached per engine), so that no pipeline waits for it later.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from hertz_agents.backend import is_remote_url
from hertz_agents.engine import Engine, load_engine, measure_quiet_level

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hertz-load")
_loads: dict[str, Future[Engine]] = {}
_lock = threading.Lock()


def _load_and_measure(model: str | os.PathLike[str], **engine_options: Any) -> Engine:
    engine = load_engine(model, **engine_options)
    measure_quiet_level(engine)
    return engine


def is_loadable(model: Any) -> bool:
    """True for a model name or directory (loaded here); False for an engine or a hertz:// URL."""
    if isinstance(model, str):
        return not is_remote_url(model)
    return isinstance(model, os.PathLike)


def start_loading(model: str | os.PathLike[str], **engine_options: Any) -> Future[Engine]:
    """The future of the shared engine for ``model``, starting the load if nobody has yet.

    ``engine_options`` (``device``, ``dtype``, ``max_sessions``...) only count for the first
    caller; later callers get the same engine. A failed load is retried by the next caller.
    """
    key = os.fspath(model)
    with _lock:
        future = _loads.get(key)
        if future is None or (
            future.done() and (future.cancelled() or future.exception() is not None)
        ):
            future = _executor.submit(_load_and_measure, model, **engine_options)
            _loads[key] = future
        return future
