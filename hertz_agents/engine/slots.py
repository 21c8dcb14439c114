"""Per-session state of the streaming engine, one row per slot, allocated once.

Everything a conversation carries from one 125 ms step to the next lives here, indexed by slot:
its position (on the device, and a host mirror the stepper alone writes, so scheduling needs no
device sync), the model's last latent, the latents fed so far (to re-prefill when the context
fills), the last sampled tokens, the codec's convolution histories, the KV caches, the shadow
caches that the next rollover's window is prefilled into, and the sampling settings. Nothing
lives in module attributes or globals, so one model serves many conversations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hertz_agents.model.hertz import Caches, HertzModel
from hertz_agents.sampling import SamplingSettings, SamplingTensors


def masked_assign(target: Tensor, new: Tensor, mask: Tensor) -> None:
    """``target[i] = new[i]`` where ``mask[i]``, in place, without a host sync."""
    shape = (-1,) + (1,) * (target.dim() - 1)
    target.copy_(torch.where(mask.view(shape), new.to(target.dtype), target))


class SlotTable:
    """State tensors for ``slots`` conversations on one model.

    Args:
        model: the model the slots run on.
        slots: conversations held at once.
        context: positions of each slot's KV caches.
        channels: the channels whose predictions are computed (the live engine: the model's).
        shadow_len: positions of the shadow caches (0: none).
        kv_dtype: storage dtype of the KV caches (``torch.int8``: quantized), default ``dtype``.
    """

    def __init__(
        self,
        model: HertzModel,
        slots: int,
        context: int,
        device,
        dtype,
        *,
        channels: tuple[int, ...],
        shadow_len: int = 0,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        latent = model.config.codec.latent_dim
        self.slots, self.context, self.channels = slots, context, channels
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.host_positions = [0] * slots  # mirror of ``positions``; written by the stepper only
        self.model_latent = torch.zeros(slots, latent, device=device, dtype=dtype)
        self.last_tokens = torch.zeros(slots, len(channels), dtype=torch.long, device=device)
        self.history = torch.zeros(
            slots, context, model.channels * latent, device=device, dtype=dtype
        )
        self.encoder_state = model.codec.initial_encoder_state(slots, device, dtype)
        self.decoder_state = model.codec.initial_decoder_state(slots, device, dtype)
        self.caches: Caches = model.new_caches(
            slots, context, device, dtype, channels=channels, kv_dtype=kv_dtype
        )
        self.shadow: Caches | None = None
        if shadow_len:
            self.shadow = model.new_caches(
                slots, shadow_len, device, dtype, channels=channels, kv_dtype=kv_dtype
            )
        self.shadow_filled = [0] * slots  # host: shadow positions prefilled for the next rollover
        self.sampling = SamplingTensors.allocate(slots, device)
        self.sampling_source: list[SamplingSettings | None] = [None] * slots
        self._fresh_encoder = [s[:1].clone() for s in self.encoder_state]
        self._fresh_decoder = [s[:1].clone() for s in self.decoder_state]

    def state_tensors(self) -> list[Tensor]:
        """Every tensor a tick reads or writes (CUDA graphs need their addresses fixed)."""
        tensors = [self.positions, self.model_latent, self.last_tokens, self.history]
        tensors += self.encoder_state + self.decoder_state + self.caches.tensors()
        if self.shadow is not None:
            tensors += self.shadow.tensors()
        s = self.sampling
        return tensors + [s.token_temp, s.categorical_temp, s.gaussian_temp, s.top_p, s.min_p]

    def set_position(self, slot: int, position: int) -> None:
        """Set a slot's position on the device and in the host mirror together."""
        self.positions[slot] = position
        self.host_positions[slot] = position

    def set_sampling(self, slot: int, settings: SamplingSettings) -> None:
        """Write a slot's sampling settings into the preallocated table (only when they change)."""
        if self.sampling_source[slot] is not settings:
            self.sampling.set_row(slot, settings)
            self.sampling_source[slot] = settings

    def reset(self, slot: int, model_latent: Tensor) -> None:
        """Make ``slot`` a fresh conversation whose model last said ``model_latent``."""
        self.set_position(slot, 0)
        self.shadow_filled[slot] = 0
        self.model_latent[slot] = model_latent
        self.last_tokens[slot] = 0
        for state, fresh in zip(self.encoder_state, self._fresh_encoder):
            state[slot] = fresh[0]
        for state, fresh in zip(self.decoder_state, self._fresh_decoder):
            state[slot] = fresh[0]

    def bytes_per_slot(self) -> int:
        """Memory one conversation holds: KV (and shadow) caches, latent history, codec state."""
        per = self.caches.nbytes_per_slot()
        if self.shadow is not None:
            per += self.shadow.nbytes_per_slot()
        per += self.history[0].numel() * self.history.element_size()
        for s in self.encoder_state + self.decoder_state:
            per += s[0].numel() * s.element_size()
        return per
