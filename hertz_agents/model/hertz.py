"""The whole hertz-dev model: codec, AR trunk and resynthesizer, plus one sampling step.

``HertzModel`` holds the networks. It computes; it does not schedule. The streaming engine
(``hertz_agents.engine``) owns caches, codec states and RNGs per session and calls
:meth:`HertzModel.next_latents` once per 125 ms tick for all its sessions at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hertz_agents.codec.model import WaveCodec
from hertz_agents.config import HertzConfig
from hertz_agents.model.ar import HertzAR
from hertz_agents.model.kv_cache import KVCache
from hertz_agents.model.resynthesizer import Resynthesizer
from hertz_agents.sampling import SamplingTensors, sample_latent, sample_token


@dataclass
class Caches:
    """KV caches of both transformers for a set of session slots."""

    ar: KVCache
    resynthesizer: KVCache

    def nbytes_per_slot(self) -> int:
        return self.ar.nbytes_per_slot() + self.resynthesizer.nbytes_per_slot()


class HertzModel(nn.Module):
    def __init__(self, config: HertzConfig) -> None:
        super().__init__()
        self.config = config
        self.codec = WaveCodec(config.codec)
        self.ar = HertzAR(config.ar, config.split)
        self.resynthesizer = Resynthesizer(config.resynthesizer, config.quantizer, config.split)

    @property
    def channels(self) -> int:
        return self.config.channels

    def new_caches(self, slots: int, max_len: int, device=None, dtype=None) -> Caches:
        param = next(self.ar.parameters())
        device, dtype = device or param.device, dtype or param.dtype
        return Caches(
            self.ar.new_cache(slots, max_len, device, dtype),
            self.resynthesizer.new_cache(slots, max_len, device, dtype),
        )

    @torch.no_grad()
    def next_latents(
        self,
        latents: Tensor,
        positions: Tensor,
        caches: Caches,
        rows: int | slice | None,
        sampling: SamplingTensors,
        generators: list[torch.Generator] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Feed ``latents`` [B, T, C*32] at ``positions`` [B, T]; sample each channel's next latent.

        Returns (next latents [B, C*32], next tokens [B, C]).
        """
        logits = self.ar(latents, positions, caches.ar, rows, last_only=True)
        tokens = torch.stack([sample_token(lg[:, -1], sampling, generators) for lg in logits], dim=1)
        mixtures = self.resynthesizer(latents, tokens, positions, caches.resynthesizer, rows, last_only=True)
        next_latents = [sample_latent(tuple(p[:, -1] for p in m), sampling, generators) for m in mixtures]
        return torch.cat(next_latents, dim=-1), tokens
