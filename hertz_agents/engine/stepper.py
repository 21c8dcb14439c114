"""One batched 125 ms tick of many conversations, plus prefill and context rollover.

Per conversation a tick does constant work: encode the caller's new 2000 samples with the
streaming encoder, feed (caller latent, model's own last latent) at the conversation's position
through the cached AR trunk and resynthesizer, sample the next latents and decode only the
model's channel with the streaming decoder.

The model's own channel is fed from the latent it generated, not by decoding and re-encoding
its audio (the original notebook's way; the original live server re-encoded a 6 s window
every step). It is exact for the model, costs one encoder pass less and loses nothing: the
generated latent is what the decoder turned into sound.

A tick covers the first ``rows`` slots as views (no copies); rows that are not stepping this
tick are computed but their state is left unchanged by masked updates. Their KV write lands at
their current position, which their next real step overwrites before anyone reads it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hertz_agents.engine.slots import SlotTable, masked_assign
from hertz_agents.model.hertz import HertzModel
from hertz_agents.sampling import SamplingTensors


class Stepper:
    def __init__(self, model: HertzModel, table: SlotTable, keep: int) -> None:
        if not model.config.split:
            raise ValueError("live duplex sessions need the two-channel model (split=True)")
        if not 1 < keep < table.context:
            raise ValueError(f"keep ({keep}) must be between 2 and the context ({table.context})")
        self.model, self.table, self.keep = model, table, keep
        self.latent_dim = model.config.codec.latent_dim

    @torch.no_grad()
    def tick(
        self, rows: int, active: Tensor, audio: Tensor, sampling: SamplingTensors, generators: list[torch.Generator]
    ) -> Tensor:
        """Step the first ``rows`` slots where ``active`` [rows]; caller audio [rows, hop] -> model audio."""
        t, codec = self.table, self.model.codec
        wave = audio[:, None, :].to(t.history.dtype)
        mu, encoder_state = codec.encode_step(wave, [s[:rows] for s in t.encoder_state])
        for state, new in zip(t.encoder_state, encoder_state):
            masked_assign(state[:rows], new, active)
        x = torch.cat((mu[:, 0], t.model_latent[:rows]), dim=-1)  # [rows, 2 * latent]
        positions = t.positions[:rows]
        t.history[torch.arange(rows, device=x.device), positions] = x
        next_latents, tokens = self.model.next_latents(
            x[:, None], positions[:, None], t.caches, rows, sampling, generators
        )
        model_next = next_latents[:, self.latent_dim :]
        masked_assign(t.model_latent[:rows], model_next, active)
        masked_assign(t.last_tokens[:rows], tokens, active)
        positions.add_(active.long())
        out, decoder_state = codec.decode_step(model_next[:, None], [s[:rows] for s in t.decoder_state])
        for state, new in zip(t.decoder_state, decoder_state):
            masked_assign(state[:rows], new, active)
        return out[:, 0]

    @torch.no_grad()
    def prefill(self, slot: int, latents: Tensor, next_tokens: Tensor) -> None:
        """Write ``latents`` [T, C*latent] at positions 0..T-1 of ``slot``; the last one's next
        tokens [C] are given (they were sampled, or come from the prompt's next latent)."""
        t, rows = self.table, slice(slot, slot + 1)
        positions = torch.arange(latents.shape[0], device=latents.device)[None]
        self.model.ar(latents[None], positions, t.caches.ar, rows, last_only=True)
        resynth_cache = t.caches.resynthesizer
        self.model.resynthesizer(latents[None], next_tokens[None], positions, resynth_cache, rows, last_only=True)
        t.history[slot, : latents.shape[0]] = latents
        t.positions[slot] = latents.shape[0]
        t.last_tokens[slot] = next_tokens

    @torch.no_grad()
    def rollover(self, slot: int) -> None:
        """The context is full: keep the last ``keep`` latents and re-prefill them at 0..keep-1.

        Rotary positions are absolute, so keys cannot be shifted; recomputing them costs one
        forward of ``keep`` positions, once every ``context - keep`` steps.
        """
        t = self.table
        pos = int(t.positions[slot])
        window = t.history[slot, pos - self.keep : pos].clone()
        self.prefill(slot, window, t.last_tokens[slot].clone())
