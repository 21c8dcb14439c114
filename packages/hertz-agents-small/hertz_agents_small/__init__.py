"""hertz-small, the default model of hertz-agents, as package data.

The weights live in ``hertz-small/`` next to this file (``model.safetensors`` + ``config.json``).
In the source tree that folder is a link to ``ckpt/hertz-small``, the one copy of the model.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

MODEL_DIR = Path(__file__).resolve().parent / "hertz-small"
"""The checkpoint directory of hertz-small, as ``hertz_agents.load_model`` takes it."""

__all__ = ["MODEL_DIR", "__version__"]
