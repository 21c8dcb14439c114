"""Worker load for LiveKit's dispatcher: calls in progress over the calls the engine can hold."""

from __future__ import annotations

from typing import Any


def worker_load(server: Any = None) -> float:
    """Share of this process's engine slots in use, 0..1; pass it as ``AgentServer(load_fnc=...)``.

    With the thread job executor every call of the worker runs in this process on one engine, so
    this is exactly "active calls / capacity". Once it reaches the server's ``load_threshold``,
    LiveKit stops sending this worker calls and dispatches them to other workers and machines.
    Before the model is loaded the worker reports 0 (it has all its capacity).
    """
    from hertz_agents.engine import loaded_engines

    engines = loaded_engines()
    capacity = sum(e.max_sessions for e in engines)
    return sum(e.active_sessions for e in engines) / capacity if capacity else 0.0
