"""hertz-agents: hertz-dev, the full-duplex audio model, for real voice agents."""

from hertz_agents.timing import LATENT_DIM, SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS, STEPS_PER_SECOND

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
    "load_engine",
    "load_model",
    "__version__",
]


def __getattr__(name: str):
    # Lazy: `import hertz_agents` stays cheap (no torch) for tools that only need constants.
    if name in ("DuplexSession", "OutputChunk"):
        from hertz_agents import session

        return getattr(session, name)
    if name == "SamplingSettings":
        from hertz_agents.sampling import SamplingSettings

        return SamplingSettings
    if name == "load_engine":
        from hertz_agents.engine import load_engine

        return load_engine
    if name == "load_model":
        from hertz_agents.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'hertz_agents' has no attribute {name!r}")
