"""hertz-agents: hertz-dev, the full-duplex audio model, for real voice agents."""

from typing import Any

from hertz_agents.timing import (
    LATENT_DIM,
    SAMPLE_RATE,
    SAMPLES_PER_STEP,
    STEP_SECONDS,
    STEPS_PER_SECOND,
)

__version__ = "0.1.0"

__all__ = [
    "LATENT_DIM",
    "SAMPLE_RATE",
    "SAMPLES_PER_STEP",
    "STEP_SECONDS",
    "STEPS_PER_SECOND",
    "DuplexSession",
    "OutputChunk",
    "SamplingSettings",
    "load_codec",
    "load_engine",
    "load_model",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Lazy: `import hertz_agents` stays cheap (no torch) for tools that only need constants.
    if name in ("DuplexSession", "OutputChunk"):
        from hertz_agents import session

        return getattr(session, name)
    if name == "SamplingSettings":
        from hertz_agents.sampling import SamplingSettings

        return SamplingSettings
    if name == "load_engine":  # a name, a directory or a hertz:// URL -> a backend
        from hertz_agents.resolve import load_engine

        return load_engine
    if name in ("load_model", "load_codec"):
        from hertz_agents import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'hertz_agents' has no attribute {name!r}")
