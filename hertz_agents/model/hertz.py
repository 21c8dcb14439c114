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
from hertz_agents.model.resynthesizer import Resynthesizer, ResynthesizerCache
from hertz_agents.sampling import SamplingNoise, SamplingTensors, sample_latent, sample_token


@dataclass
class Caches:
    """KV caches of both transformers for a set of session slots."""

    ar: KVCache
    resynthesizer: ResynthesizerCache

    @property
    def channels(self) -> tuple[int, ...]:
        """The channels whose per-channel resynthesizer layers these caches hold."""
        return self.resynthesizer.channels

    def rows(self, count: int, start: int = 0) -> Caches:
        """A view of ``count`` slots from ``start``: what a batched forward is given."""
        return Caches(self.ar.rows(count, start), self.resynthesizer.rows(count, start))

    def tensors(self) -> list[Tensor]:
        """Return the cache tensors of both transformers, AR first."""
        return self.ar.tensors() + self.resynthesizer.tensors()

    def copy_prefix(self, slot: int, source: Caches, length: int, source_slot: int = 0) -> None:
        """Copy positions ``0..length-1`` of ``source_slot`` in ``source`` into ``slot``."""
        self.ar.copy_prefix(slot, source.ar, length, source_slot)
        self.resynthesizer.copy_prefix(slot, source.resynthesizer, length, source_slot)

    def as_ring(self, sink: int) -> None:
        """Make both transformers' caches rings (see :meth:`KVCache.as_ring`)."""
        self.ar.as_ring(sink)
        self.resynthesizer.as_ring(sink)

    def nbytes_per_slot(self) -> int:
        """Return the bytes one slot takes in both transformers' caches."""
        return self.ar.nbytes_per_slot() + self.resynthesizer.nbytes_per_slot()


class HertzModel(nn.Module):
    """The whole model: the codec, the AR trunk and the resynthesizer.

    Args:
        config: The sizes of every part.
    """

    def __init__(self, config: HertzConfig) -> None:
        super().__init__()
        self.config = config
        self.codec = WaveCodec(config.codec)
        self.ar = HertzAR(config.ar, config.split)
        self.resynthesizer = Resynthesizer(config.resynthesizer, config.quantizer, config.split)

    @property
    def channels(self) -> int:
        """Audio channels the AR models: 2 for the duplex ("split") model, else 1."""
        return self.config.channels

    def new_caches(
        self,
        slots: int,
        max_len: int,
        device=None,
        dtype=None,
        *,
        channels: tuple[int, ...] | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> Caches:
        """Caches for ``slots`` conversations; ``channels``: whose predictions are computed.

        ``kv_dtype`` stores keys and values in another dtype (``torch.int8``: quantized).
        """
        param = next(self.ar.parameters())
        device, dtype = device or param.device, kv_dtype or dtype or param.dtype
        return Caches(
            self.ar.new_cache(slots, max_len, device, dtype),
            self.resynthesizer.new_cache(slots, max_len, device, dtype, channels),
        )

    @torch.no_grad()
    def next_latents(
        self,
        latents: Tensor,
        positions: Tensor,
        caches: Caches,
        rows: int | None,
        sampling: SamplingTensors,
        generators: list[torch.Generator] | None = None,
        *,
        noise: SamplingNoise | None = None,
        length: int | None = None,
        batch_channels: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Feed ``latents`` [B, T, C*32] at ``positions`` [B, T]; sample the next latents.

        Only the channels the caches hold (``caches.channels``) are predicted: their heads,
        sampling and per-channel layers run, the others' do not. Returns (next latents
        [B, len(channels)*32], next tokens [B, len(channels)]). ``rows`` (None: all) takes a view
        of the caches' first rows; ``noise`` replaces the generators (see :class:`SamplingNoise`);
        ``batch_channels`` runs the channels' resynthesizer layers as one batch.
        """
        if rows is not None:
            caches = caches.rows(rows)
        channels = caches.channels
        if noise is None:
            b, c = latents.shape[0], self.channels
            vocab, mix = self.config.ar.vocab_size, self.config.resynthesizer.gmm_components
            noise = SamplingNoise.draw(
                generators, b, c, vocab, mix, self.config.codec.latent_dim, latents.device
            )
        logits = self.ar(
            latents, positions, caches.ar, last_only=True, heads=channels, length=length
        )
        tokens = torch.stack(
            [
                sample_token(lg[:, -1], sampling, None, noise.token_uniform[:, ch])
                for lg, ch in zip(logits, channels)
            ],
            dim=1,
        )
        all_tokens = tokens
        if len(channels) != self.channels:  # the resynthesizer indexes tokens by channel
            all_tokens = torch.zeros(
                tokens.shape[0], self.channels, dtype=tokens.dtype, device=tokens.device
            )
            all_tokens[:, list(channels)] = tokens
        mixtures = self.resynthesizer(
            latents,
            all_tokens,
            positions,
            caches.resynthesizer,
            last_only=True,
            length=length,
            batch_channels=batch_channels,
        )
        next_latents = [
            sample_latent(
                tuple(p[:, -1] for p in m),
                sampling,
                None,
                noise.component_uniform[:, ch],
                noise.normal[:, ch],
            )
            for m, ch in zip(mixtures, channels)
        ]
        return torch.cat(next_latents, dim=-1), tokens
