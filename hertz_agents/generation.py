"""Offline continuation of a prompt, as the original notebook does, with cached steps.

The prompt (mono for a one-channel model, stereo caller | model for the duplex model) is encoded,
prefilled through both transformers at once, and then each step samples every channel's next
latent and feeds it back, through the same :class:`~hertz_agents.engine.stepper.Stepper` as
live sessions (so a continuation longer than the context rolls over as a live call does).
The streaming decoder, primed with the prompt's latents, turns only the new latents into audio.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from hertz_agents.engine.stepper import Stepper
from hertz_agents.errors import AudioInputError
from hertz_agents.model.hertz import HertzModel
from hertz_agents.sampling import SamplingSettings, SamplingTensors
from hertz_agents.timing import SAMPLES_PER_STEP


@torch.no_grad()
def continue_prompt(
    model: HertzModel,
    prompt: np.ndarray,
    steps: int,
    sampling: SamplingSettings | None = None,
    seed: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Prompt float32 [channels, n] at 16 kHz -> continuation [channels, steps * 2000]."""
    channels = model.channels
    if prompt.ndim != 2 or prompt.shape[0] != channels:
        raise AudioInputError(
            f"this model continues {channels}-channel prompts; got shape {prompt.shape}"
        )
    prompt_steps = prompt.shape[1] // SAMPLES_PER_STEP
    if prompt_steps < 1:
        raise AudioInputError("the prompt is shorter than one step (125 ms); give a longer prompt")
    stepper = Stepper(model, 1, channels=tuple(range(channels)))
    if prompt_steps >= stepper.context:
        raise AudioInputError(
            f"the prompt ({prompt_steps} steps) must be shorter than the model's context "
            f"({stepper.context} steps of 125 ms); shorten the prompt"
        )
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**62))
    wave = torch.from_numpy(prompt[:, : prompt_steps * SAMPLES_PER_STEP]).to(
        device=device, dtype=dtype
    )
    latents = model.codec.encode(wave[:, None, :])  # [channels, steps, latent]
    feed = latents.transpose(0, 1).reshape(1, prompt_steps, -1)  # [1, steps, channels*latent]
    _, decoder_state = model.codec.decode_step(
        latents, model.codec.initial_decoder_state(channels, device, dtype)
    )
    tensors = SamplingTensors.from_settings([sampling or SamplingSettings()], device)
    active = torch.ones(1, dtype=torch.bool)
    audio = []
    for i in range(steps):
        # The stepper rolls the context over when the call outgrows it, as in a live session.
        next_latents, _ = stepper.advance(feed, active, tensors, [generator])
        per_channel = next_latents.view(channels, 1, -1)
        out, decoder_state = model.codec.decode_step(per_channel, decoder_state)
        audio.append(out[:, 0].float().cpu().numpy())
        feed = next_latents[:, None]
        if on_step is not None:
            on_step(i)
    return np.concatenate(audio, axis=1)
