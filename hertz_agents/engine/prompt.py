"""Conversation prompts: a stereo recording (caller | model) that a session starts from.

The prefill of a prompt (its latents through both transformers, and the codec states after it)
is computed once per engine and copied into every session that uses the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hertz_agents.audio import read_audio
from hertz_agents.engine.slots import SlotTable
from hertz_agents.engine.stepper import feed
from hertz_agents.errors import AudioInputError
from hertz_agents.model.hertz import Caches, HertzModel
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

MIN_PROMPT_STEPS = 2


@dataclass
class PromptPrefill:
    """Everything a slot needs to continue a prompt of ``steps`` steps."""

    steps: int
    history: Tensor  # [steps - 1, C*latent]: the prefilled latents
    next_tokens: Tensor  # [C]
    model_latent: Tensor  # [latent]: the model's latent at the last prompt step
    encoder_state: list[Tensor]
    decoder_state: list[Tensor]
    caches: Caches  # one slot, steps - 1 positions

    def apply(self, table: SlotTable, slot: int) -> None:
        """Continue this prompt in ``slot`` (its caches must hold the same channels)."""
        filled = self.steps - 1
        table.caches.copy_prefix(slot, self.caches, filled)
        table.history[slot, :filled] = self.history
        table.set_position(slot, filled)
        table.shadow_filled[slot] = 0
        table.model_latent[slot] = self.model_latent
        table.last_tokens[slot] = self.next_tokens[list(self.caches.channels)]
        for dst, src in zip(table.encoder_state, self.encoder_state):
            dst[slot] = src[0]
        for dst, src in zip(table.decoder_state, self.decoder_state):
            dst[slot] = src[0]


def load_prompt_audio(source: str | Path | np.ndarray, max_steps: int) -> np.ndarray:
    """A WAV path or array -> float32 [2, steps * 2000] (mono prompts are used on both channels).

    Prompts longer than ``max_steps`` keep their end (the part closest to the live call).
    """
    if isinstance(source, (str, Path)):
        audio = read_audio(
            source, channels=2, min_seconds=MIN_PROMPT_STEPS * SAMPLES_PER_STEP / SAMPLE_RATE
        )
    else:
        audio = np.asarray(source, dtype=np.float32)
        if audio.ndim == 1:
            audio = audio[None]
        if audio.shape[0] == 1:
            audio = np.repeat(audio, 2, axis=0)
        if audio.ndim != 2 or audio.shape[0] != 2:
            raise AudioInputError(
                f"a prompt array must be [samples] or [channels<=2, samples], got {audio.shape}"
            )
    steps = min(audio.shape[1] // SAMPLES_PER_STEP, max_steps)
    if steps < MIN_PROMPT_STEPS:
        raise AudioInputError(
            f"a prompt needs at least {MIN_PROMPT_STEPS} steps of 125 ms; this one is shorter"
        )
    return audio[:, audio.shape[1] - steps * SAMPLES_PER_STEP :]


@torch.no_grad()
def build_prefill(
    model: HertzModel,
    audio: np.ndarray,
    device,
    dtype,
    channels: tuple[int, ...] = (1,),
    kv_dtype: torch.dtype | None = None,
) -> PromptPrefill:
    """Encode a stereo prompt [2, steps*2000] and prefill a one-slot cache with it.

    ``channels`` and ``kv_dtype`` must be those of the caches the prefill is copied into.
    """
    steps = audio.shape[1] // SAMPLES_PER_STEP
    wave = torch.from_numpy(audio).to(device=device, dtype=dtype)[:, None, :]  # [2, 1, n]
    codec = model.codec
    caller_latents, encoder_state = codec.encode_step(
        wave[:1], codec.initial_encoder_state(1, device, dtype)
    )
    model_latents, _ = codec.encode_step(wave[1:], codec.initial_encoder_state(1, device, dtype))
    latents = torch.cat((caller_latents[0], model_latents[0]), dim=-1)  # [steps, 2*latent]
    _, decoder_state = codec.decode_step(
        model_latents, codec.initial_decoder_state(1, device, dtype)
    )
    _, last_tokens = model.resynthesizer.quantizer(latents[-1].view(2, -1))
    caches = model.new_caches(1, steps - 1, device, dtype, channels=channels, kv_dtype=kv_dtype)
    positions = torch.arange(steps - 1, device=device)[None]
    feed(model, caches, latents[None, :-1], positions, last_tokens[None])
    return PromptPrefill(
        steps=steps,
        history=latents[:-1].clone(),
        next_tokens=last_tokens,
        model_latent=model_latents[0, -1].clone(),
        # Clones: the states are views into the codec's activations for the whole prompt.
        encoder_state=[s.clone() for s in encoder_state],
        decoder_state=[s.clone() for s in decoder_state],
        caches=caches,
    )


@torch.no_grad()
def silence_latent(model: HertzModel, device, dtype, steps: int = 4) -> Tensor:
    """The codec's latent for steady silence: what the model 'said' before a call without prompt."""
    zeros = torch.zeros(1, 1, steps * SAMPLES_PER_STEP, device=device, dtype=dtype)
    return model.codec.encode(zeros)[0, -1]
