"""The streaming engine: batched, constant-work 125 ms steps for many conversations."""

from __future__ import annotations

import os
import threading

import torch

from hertz_agents.engine.engine import Engine, SlotHandle, StepInfo
from hertz_agents.engine.quiet import measure_quiet_level

__all__ = ["Engine", "SlotHandle", "StepInfo", "load_engine", "loaded_engines", "measure_quiet_level"]

_engines: dict[tuple, Engine] = {}
_engines_lock = threading.Lock()


def load_engine(
    model: str | os.PathLike[str] = "default",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **engine_options,
) -> Engine:
    """The process's engine for ``model``, loading the weights on first use (blocking).

    Every caller in the process that asks for the same model (and device) gets the same engine,
    so several pipelines or calls in one process batch their steps together. ``engine_options``
    (``max_sessions``, ``context``...) apply when the engine is created.
    """
    from hertz_agents.checkpoint import load_model, resolve_device, resolve_model_dir

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
    with _engines_lock:
        return list(_engines.values())
