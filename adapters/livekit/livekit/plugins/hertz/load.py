"""Worker load for LiveKit's dispatcher: how full this worker's engine is, 0..1.

The one place that asks an engine how busy it is (a local engine's slots, or a ``hertz://``
server's own figures).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from hertz_agents.backend import is_remote_url

# a remote server is asked at most this often; LiveKit polls the load every 0.5 s
_REMOTE_REFRESH_SECONDS = 1.0
_REMOTE_TIMEOUT = 2.0


class WorkerLoad:
    """``AgentServer(load_fnc=...)``: the larger of the engine's occupancy and the worker's jobs.

    Jobs count from the moment the worker accepts them, before their session takes a slot, so two
    calls that arrive together cannot both be accepted for the last slot. With a ``hertz://``
    engine the server tells its own load (it may serve other workers too); an unreachable server
    reports the worker full, so LiveKit sends calls to workers that can take them.
    """

    def __init__(self, model: Any = None, *, max_sessions: int | None = None) -> None:
        """Set up the load function for one worker.

        Args:
            model: ``"hertz://host:port"`` for a remote engine; anything else (or None) means the
                engines loaded in this process.
            max_sessions: Calls this worker takes at once (default: the engine's capacity).
        """
        self._remote = model if is_remote_url(model) else None
        self._max_sessions = max_sessions
        self._lock = threading.Lock()
        self._remote_checked = 0.0
        self._remote_figures = (0, 0)

    def __call__(self, server: Any = None) -> float:
        """The worker's load, 0..1 (LiveKit calls it every 0.5 s and before taking a job)."""
        active, capacity = self._engine_figures()
        if capacity:
            engine_load = active / capacity  # the whole engine: a server may serve other workers
        else:
            engine_load = 1.0 if self._remote else 0.0  # a silent server takes no calls
        limit = self._max_sessions or capacity  # this worker's own share
        jobs = len(getattr(server, "active_jobs", ()) or ())
        return min(1.0, max(engine_load, jobs / limit if limit else 0.0))

    def _engine_figures(self) -> tuple[int, int]:
        """(sessions in use, sessions the engine can hold)."""
        if self._remote is None:
            from hertz_agents.engine import loaded_engines

            engines = loaded_engines()
            return sum(e.active_sessions for e in engines), sum(e.max_sessions for e in engines)
        with self._lock:  # LiveKit calls this from an executor thread
            if time.monotonic() - self._remote_checked >= _REMOTE_REFRESH_SECONDS:
                self._remote_checked = time.monotonic()
                self._remote_figures = self._ask_remote()
            return self._remote_figures

    def _ask_remote(self) -> tuple[int, int]:
        from hertz_agents.errors import HertzError
        from hertz_agents.remote.transport import ServerAddress, fetch_info, io_thread

        address, _ = ServerAddress.parse(str(self._remote))
        try:
            info = io_thread().run(fetch_info(address, _REMOTE_TIMEOUT), _REMOTE_TIMEOUT + 1)
        except (HertzError, OSError, TimeoutError) as e:
            from .log import logger

            logger.warning("cannot read the load of the hertz server at %s: %s", address, e)
            return (0, 0)
        return int(info.get("active_sessions", 0)), int(info.get("max_sessions", 0))


_local = WorkerLoad()


def worker_load(server: Any = None) -> float:
    """Share of this process's engine slots in use (or of its accepted jobs), 0..1.

    For ``AgentServer(load_fnc=hertz.worker_load)`` with engines loaded in this process (the
    thread job executor). For a ``hertz://`` engine or a per-worker call limit, use
    :class:`WorkerLoad`. Before the model is loaded the worker reports 0 (it has all its capacity).
    """
    return _local(server)
