"""The model's clock, defined once.

hertz-dev's codec turns 2000 samples of 16 kHz mono audio (125 ms) into one
32-dim latent; the transformer takes one step per latent, 8 steps a second.
Everything that needs these numbers imports them from here.
"""

SAMPLE_RATE = 16_000
"""Audio sample rate the codec works at, in Hz."""

SAMPLES_PER_STEP = 2_000
"""Samples in one codec frame, one model step (125 ms at 16 kHz)."""

STEPS_PER_SECOND = SAMPLE_RATE // SAMPLES_PER_STEP
"""Model steps per second of audio (8)."""

STEP_SECONDS = SAMPLES_PER_STEP / SAMPLE_RATE
"""Duration of one step in seconds (0.125)."""

LATENT_DIM = 32
"""Width of one codec latent."""

MIN_PROMPT_STEPS = 2
"""The shortest prompt, in steps: the engine's prefill needs two latents."""

MIN_PROMPT_SECONDS = MIN_PROMPT_STEPS * STEP_SECONDS
"""The shortest prompt, in seconds (0.25)."""


def samples_to_step_boundary(now: float) -> int:
    """16 kHz samples from wall-clock time ``now`` to the next shared step boundary.

    Steps of every live session are cut on one clock: the multiples of 125 ms since the Unix
    epoch. Callers whose steps end together share the engine's batched tick (one forward for
    all of them instead of one each), and any process that knows the time, a remote client
    included, finds the same boundaries.
    """
    into_step = round((now % STEP_SECONDS) * SAMPLE_RATE) % SAMPLES_PER_STEP
    return (SAMPLES_PER_STEP - into_step) % SAMPLES_PER_STEP
