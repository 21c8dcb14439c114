"""hertz-dev for Pipecat: ``HertzDuplexService``, a full-duplex speech-to-speech service.

Install with ``pip install 'hertz-agents[pipecat]'``; see docs/pipecat.md.
"""

try:
    import pipecat  # noqa: F401
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pipecat_hertz needs Pipecat 1.14: install it with `pip install 'hertz-agents[pipecat]'`"
    ) from e

from pipecat_hertz.gate import SpeechGate
from pipecat_hertz.pacing import OutputPacer
from pipecat_hertz.service import HertzDuplexService
from pipecat_hertz.settings import HertzDuplexSettings
from pipecat_hertz.version import __version__

__all__ = ["HertzDuplexService", "HertzDuplexSettings", "OutputPacer", "SpeechGate", "__version__"]
