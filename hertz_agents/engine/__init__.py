"""The streaming engine: batched, constant-work 125 ms steps for many conversations.

``load_engine`` here loads local weights only; ``hertz_agents.load_engine`` (the resolver in
``hertz_agents.resolve``) also takes ``hertz://`` URLs.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from hertz_agents.backend import StepInfo, is_remote_url
from hertz_agents.engine.engine import Engine, SlotHandle
from hertz_agents.engine.quiet import measure_quiet_level

__all__ = [
    "Engine",
    "SlotHandle",
    "StepInfo",
    "load_engine",
    "loaded_engines",
    "measure_quiet_level",
]

_engines: dict[tuple[str, str, str], Engine] = {}
_engines_lock = threading.Lock()


def load_engine(
    model: str | os.PathLike[str] = "default",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **engine_options: Any,
) -> Engine:
    """The process's engine for ``model``, loading the weights on first use (blocking).

    Every caller in the process that asks for the same model (and device) gets the same engine,
    so several pipelines or calls in one process batch their steps together. ``engine_options``
    (``max_sessions``, ``context``...) apply when the engine is created.
    """
    from hertz_agents.checkpoint import load_model, resolve_device, resolve_model_dir

    if is_remote_url(model):
        raise ValueError(
            f"{model!r} is a hertz server, not local weights; use "
            "hertz_agents.load_engine(url) or pass the URL as model="
        )
    directory, _ = resolve_model_dir(model)
    dev, dt = resolve_device(device, dtype)
    key = (str(directory.resolve()), str(dev), str(dt))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = Engine(load_model(model, device=dev, dtype=dt), **engine_options)
            _engines[key] = engine
        return engine


def loaded_engines() -> list[Engine]:
    """Every engine this process has loaded with :func:`load_engine`."""
    with _engines_lock:
        return list(_engines.values())
