"""hertz-dev for LiveKit Agents: a full-duplex speech model as an ``llm.DuplexModel``.

See docs/livekit.md in the hertz-agents repository, and ``examples/livekit_agent.py``.
"""

try:
    import livekit.agents  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("livekit.plugins.hertz needs livekit-agents 1.8: pip install 'hertz-agents[livekit]'") from e

from livekit.agents import Plugin

from hertz_agents.engine import measure_quiet_level
from hertz_agents.sampling import SamplingSettings

from .duplex import DuplexModel, DuplexSession
from .load import worker_load
from .log import logger
from .models import DEFAULT_MODEL, DEFAULT_SAMPLE_RATE, GateOptions, HertzModels
from .version import __version__

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_SAMPLE_RATE",
    "DuplexModel",
    "DuplexSession",
    "GateOptions",
    "HertzModels",
    "SamplingSettings",
    "__version__",
    "measure_quiet_level",
    "worker_load",
]


class HertzPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(HertzPlugin())
