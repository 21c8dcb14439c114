"""hertz-dev for LiveKit Agents: a full-duplex speech model as an ``llm.DuplexModel``.

See docs/livekit.md in the hertz-agents repository, and ``examples/livekit_agent.py``.
"""

import os

try:
    import livekit.agents  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "livekit.plugins.hertz needs livekit-agents 1.8: pip install livekit-plugins-hertz"
    ) from e

from livekit.agents import Plugin

from hertz_agents.engine import measure_quiet_level
from hertz_agents.sampling import SamplingSettings

from .duplex import DuplexModel, DuplexSession
from .errors import api_error
from .load import WorkerLoad, worker_load
from .log import logger
from .models import (
    DEFAULT_MODEL,
    DEFAULT_PREBUFFER,
    DEFAULT_SAMPLE_RATE,
    GateOptions,
    HertzModels,
    download_model,
)
from .output import output_source, play_stream
from .version import __version__

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PREBUFFER",
    "DEFAULT_SAMPLE_RATE",
    "DuplexModel",
    "DuplexSession",
    "GateOptions",
    "HertzModels",
    "SamplingSettings",
    "WorkerLoad",
    "__version__",
    "api_error",
    "download_model",
    "measure_quiet_level",
    "output_source",
    "play_stream",
    "worker_load",
]


class HertzPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)

    def download_files(self) -> None:
        """``python -m livekit.agents download-files``: put the checkpoint in place at build time.

        Fetches the model ``$HERTZ_MODEL`` names (the default model when unset) into the
        checkpoint folder, so an image built with this step starts without downloading.
        """
        download_model(os.environ.get("HERTZ_MODEL") or DEFAULT_MODEL)


Plugin.register_plugin(HertzPlugin())
