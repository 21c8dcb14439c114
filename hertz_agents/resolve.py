"""One place that turns a ``model=`` value into a backend (see ``hertz_agents.backend``).

A ``model=`` value is, everywhere in hertz-agents (``DuplexSession``, the Pipecat service, the
LiveKit plugin, the server): a model name (``"default"``, ``"hertz-dev"``), a checkpoint
directory, ``"hertz://HOST:PORT[?token=...]"`` for a hertz server, a backend object (an
``Engine``, a ``RemoteEngine``), or None for the default model.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from hertz_agents.backend import Backend, is_remote_url

__all__ = ["ModelSpec", "load_engine", "open_backend", "wants_local_load"]

ModelSpec = str | os.PathLike[str] | Backend | None
"""What ``model=`` accepts: a name, a directory, a ``hertz://`` URL, a backend, or None."""


def wants_local_load(model: object) -> bool:
    """True when ``model`` names local weights to load (a name, a directory, None)."""
    return model is None or (isinstance(model, (str, os.PathLike)) and not is_remote_url(model))


def load_engine(model: ModelSpec = "default", **engine_options: Any) -> Backend:
    """The backend for ``model`` (blocking: loads weights once per process, or asks the server).

    A name or directory gives the process's shared local engine for it (``engine_options`` such
    as ``device``, ``max_sessions``, ``context`` apply when it is created); a ``hertz://`` URL a
    connected :class:`~hertz_agents.remote.RemoteEngine` (raising ``ServerUnavailable`` or
    ``AuthenticationFailed`` now, not at the first step); a backend is returned as it is.
    Call it where blocking is fine (start-up, a worker thread), never on an event loop.
    """
    if is_remote_url(model):
        from hertz_agents.remote import RemoteEngine

        assert isinstance(model, str)
        if engine_options:
            raise ValueError(
                f"engine options ({', '.join(sorted(engine_options))}) apply to local weights; "
                "a hertz server is configured where it runs (hertz-agents serve --help)"
            )
        return RemoteEngine.connect_blocking(model)
    if wants_local_load(model):
        from hertz_agents.engine import load_engine as load_local

        return load_local(model or "default", **engine_options)  # type: ignore[arg-type]
    if isinstance(model, Backend):
        return model
    raise TypeError(
        f"model must be a model name, a checkpoint directory, a hertz://HOST:PORT URL or "
        f"an engine, got {type(model).__name__}"
    )


async def open_backend(model: ModelSpec = "default") -> Backend:
    """:func:`load_engine` for an event loop: the blocking parts run off it."""
    if is_remote_url(model):
        from hertz_agents.remote import RemoteEngine

        assert isinstance(model, str)
        return await RemoteEngine.connect(model)
    if wants_local_load(model):
        return await asyncio.to_thread(load_engine, model)
    return load_engine(model)
