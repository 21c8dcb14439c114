"""Per-session state of the streaming engine, one row per slot, allocated once.

Everything a conversation carries from one 125 ms step to the next lives here, indexed by slot:
its position, the model's last latent, the latents fed so far (to re-prefill when the context
fills), the last sampled tokens, the codec's convolution histories and the KV caches. Nothing
lives in module attributes or globals, so one model serves many conversations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hertz_agents.model.hertz import Caches, HertzModel


def masked_assign(target: Tensor, new: Tensor, mask: Tensor) -> None:
    """``target[i] = new[i]`` where ``mask[i]``, in place, without a host sync."""
    shape = (-1,) + (1,) * (target.dim() - 1)
    target.copy_(torch.where(mask.view(shape), new.to(target.dtype), target))


class SlotTable:
    """State tensors for ``slots`` conversations on one model."""

    def __init__(self, model: HertzModel, slots: int, context: int, device, dtype) -> None:
        latent = model.config.codec.latent_dim
        channels = model.channels
        self.slots, self.context = slots, context
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.model_latent = torch.zeros(slots, latent, device=device, dtype=dtype)
        self.last_tokens = torch.zeros(slots, channels, dtype=torch.long, device=device)
        self.history = torch.zeros(slots, context, channels * latent, device=device, dtype=dtype)
        self.encoder_state = model.codec.initial_encoder_state(slots, device, dtype)
        self.decoder_state = model.codec.initial_decoder_state(slots, device, dtype)
        self.caches: Caches = model.new_caches(slots, context, device, dtype)
        self._fresh_encoder = [s[:1].clone() for s in self.encoder_state]
        self._fresh_decoder = [s[:1].clone() for s in self.decoder_state]

    def reset(self, slot: int, model_latent: Tensor) -> None:
        """Make ``slot`` a fresh conversation whose model last said ``model_latent``."""
        self.positions[slot] = 0
        self.model_latent[slot] = model_latent
        self.last_tokens[slot] = 0
        for state, fresh in zip(self.encoder_state, self._fresh_encoder):
            state[slot] = fresh[0]
        for state, fresh in zip(self.decoder_state, self._fresh_decoder):
            state[slot] = fresh[0]

    def bytes_per_slot(self) -> int:
        """Memory one conversation holds: KV caches, latent history and codec state."""
        per = self.caches.nbytes_per_slot()
        per += self.history[0].numel() * self.history.element_size()
        for s in self.encoder_state + self.decoder_state:
            per += s[0].numel() * s.element_size()
        return per
