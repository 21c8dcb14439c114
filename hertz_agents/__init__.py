"""hertz-agents: hertz-dev, the full-duplex audio model, for real voice agents."""

from hertz_agents.timing import LATENT_DIM, SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS, STEPS_PER_SECOND

__version__ = "0.1.0"

__all__ = [
    "LATENT_DIM",
    "SAMPLE_RATE",
    "SAMPLES_PER_STEP",
    "STEP_SECONDS",
    "STEPS_PER_SECOND",
    "__version__",
]
