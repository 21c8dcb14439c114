"""The resynthesizer: next token -> a Gaussian mixture over the next 32-dim latent.

It reads the same latents as the AR trunk. At layer ``layers // 2`` each channel's quantized
code of the *next* latent is added: the quantizer output rolled one step back in time, with the
last position (whose next latent is not known yet) replaced by the code of the token the trunk
just sampled. From there the two channels of the duplex model run the remaining layers
separately, with separate caches, and both use the first channel's mixture head (``io.fc_*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hertz_agents.config import QuantizerConfig, ResynthesizerConfig
from hertz_agents.model.kv_cache import KVCache
from hertz_agents.model.layers import Block, Norm, Rotary, default_positions
from hertz_agents.model.quantizer import LatentQuantizer

GMMParams = tuple[Tensor, Tensor, Tensor]
"""(locs [B, T, K, Z], scales [B, T, K, Z], weight logits [B, T, K])."""


def square_plus(x: Tensor) -> Tensor:
    """Return the softplus-like ``(x + sqrt(x^2 + 4)) / 2``: positive and smooth."""
    return (x + torch.sqrt(x * x + 4)) / 2


class LatentInput(nn.Module):
    """Input projection of one channel's latents (``io2`` has only this)."""

    def __init__(self, latent_dim: int, dim: int) -> None:
        super().__init__()
        self.input_projection = nn.Linear(latent_dim, dim)


class GaussianMixtureIO(LatentInput):
    """Input projection plus the mixture head (``io``)."""

    def __init__(self, latent_dim: int, dim: int, components: int) -> None:
        super().__init__(latent_dim, dim)
        self.latent_dim, self.components = latent_dim, components
        self.fc_loc = nn.Linear(dim, components * latent_dim)
        self.fc_scale = nn.Linear(dim, components * latent_dim)
        self.fc_weight = nn.Linear(dim, components)

    def mixture(self, h: Tensor) -> GMMParams:
        """Return the mixture parameters (locs, scales, weight logits) for hidden states ``h``."""
        b, t, _ = h.shape
        locs = self.fc_loc(h).view(b, t, self.components, self.latent_dim)
        scales = (
            square_plus(self.fc_scale(h))
            .clamp(min=1e-6)
            .view(b, t, self.components, self.latent_dim)
        )
        return locs, scales, self.fc_weight(h)


def gmm_nll(latents: Tensor, params: GMMParams) -> Tensor:
    """Negative log-likelihood of ``latents`` [B, T, Z] under the mixture, per position [B, T]."""
    locs, scales, weights = params
    diff = (latents.unsqueeze(-2) - locs) / scales
    log_probs = -0.5 * (diff.pow(2) + 2 * scales.log() + torch.log(torch.tensor(2 * torch.pi))).sum(
        -1
    )
    return -torch.logsumexp(F.log_softmax(weights, dim=-1) + log_probs, dim=-1)


class Resynthesizer(nn.Module):
    """Latents [B, T, C*32] and next tokens [B, C] -> one mixture per channel."""

    def __init__(
        self, config: ResynthesizerConfig, quantizer: QuantizerConfig, split: bool
    ) -> None:
        super().__init__()
        self.config, self.split = config, split
        c = config
        self.channels = 2 if split else 1
        self.injection_layer = c.injection_layer
        self.plex_roll = c.plex_roll
        self.rotary = Rotary(c.head_dim, c.seq_len, c.theta)
        self.io = GaussianMixtureIO(c.latent_size, c.dim, c.gmm_components)
        self.stack = _Stack(c, self.rotary)
        self.plex_projection = nn.Linear(quantizer.dim, c.dim)
        self.out_norm = Norm(c.dim, eps=c.eps)
        self.quantizer = LatentQuantizer(quantizer)
        if split:
            self.io2 = LatentInput(c.latent_size, c.dim)
            self.plex_projection2 = nn.Linear(quantizer.dim, c.dim)

    def new_cache(
        self, slots: int, max_len: int, device, dtype, channels: tuple[int, ...] | None = None
    ) -> ResynthesizerCache:
        """Caches of the shared layers and of the per-channel layers of ``channels`` (default all).

        A live engine caches only the model's channel: the caller's per-channel layers feed only
        the caller's prediction, which a live step does not use.
        """
        c = self.config
        channels = tuple(range(self.channels)) if channels is None else tuple(channels)
        after = c.layers - self.injection_layer
        shape = (max_len, c.n_kv_heads, c.head_dim)
        return ResynthesizerCache(
            KVCache(self.injection_layer, slots, *shape, device=device, dtype=dtype),
            KVCache(after, slots, *shape, channels=len(channels), device=device, dtype=dtype),
            channels,
        )

    def next_codes(self, channel_latents: Tensor, next_token: Tensor | None) -> Tensor:
        """Quantized code of each position's next latent [B, T, qdim]."""
        if next_token is not None and channel_latents.shape[1] == 1:
            # One position (a step): its only code is the next token's; nothing to quantize.
            return self.quantizer.embed_tokens(next_token.view(-1, 1)).to(channel_latents.dtype)
        codes, _ = self.quantizer(channel_latents)
        codes = torch.roll(codes, -self.plex_roll, dims=1)
        if next_token is not None:
            codes = codes.clone()
            codes[:, -1:] = self.quantizer.embed_tokens(next_token.view(-1, 1)).to(codes.dtype)
        return codes

    def forward(
        self,
        latents: Tensor,
        next_tokens: Tensor | None,
        positions: Tensor | None = None,
        cache: ResynthesizerCache | None = None,
        last_only: bool = False,
        *,
        channels: tuple[int, ...] | None = None,
        codes: Tensor | None = None,
        length: int | None = None,
        batch_channels: bool = True,
        visible: Tensor | None = None,
    ) -> list[GMMParams]:
        """``next_tokens`` [B, channels] (or None) -> a mixture per channel in ``channels``.

        ``channels`` defaults to the cache's channels (all without a cache). ``codes``
        [len(channels), B, T, qdim], when given, replaces the codes computed from the latents and
        next tokens. The per-channel layers share their weights, so the channels asked for run
        as one batch of ``B * len(channels)`` rows (``batch_channels=False``: one after the
        other, as the original does, which rounds each channel exactly as when it runs alone).
        Without a cache, ``visible`` [T, T] (True: key j visible to query i) replaces the causal
        mask in every layer.
        """
        if channels is None:
            channels = cache.channels if cache is not None else tuple(range(self.channels))
        if cache is not None and tuple(channels) != cache.channels:
            raise ValueError(f"this cache holds channels {cache.channels}, not {tuple(channels)}")
        channel_latents = latents.chunk(self.channels, dim=-1)
        x = self.io.input_projection(channel_latents[0])
        if self.split:
            x = x + self.io2.input_projection(channel_latents[1])
        if positions is None:
            positions = default_positions(x)
        for i in range(self.injection_layer):
            x = self.stack.layers[i](
                x,
                positions,
                None if cache is None else cache.shared.layer(i),
                length,
                visible=visible,
            )

        projections = (
            (self.plex_projection, self.plex_projection2) if self.split else (self.plex_projection,)
        )
        per_channel = []
        for n, ch in enumerate(channels):
            if codes is not None:
                code = codes[n]
            else:
                code = self.next_codes(
                    channel_latents[ch], None if next_tokens is None else next_tokens[:, ch]
                )
            per_channel.append(x + projections[ch](code))
        if not batch_channels:
            return [
                self._channel_tail(
                    [h], positions, cache, length, last_only, channel=n, visible=visible
                )[0]
                for n, h in enumerate(per_channel)
            ]
        return self._channel_tail(per_channel, positions, cache, length, last_only, visible=visible)

    def _channel_tail(
        self,
        per_channel: list[Tensor],
        positions: Tensor,
        cache: ResynthesizerCache | None,
        length: int | None,
        last_only: bool,
        channel: int | None = None,
        visible: Tensor | None = None,
    ) -> list[GMMParams]:
        """Run the per-channel layers and the mixture head for ``per_channel`` inputs as one batch.

        ``channel`` is the cache channel of a single input run alone.
        """
        b, t, dim = per_channel[0].shape
        count = len(per_channel)
        h = torch.stack(per_channel).view(count * b, t, dim)  # channel-major, as the cache
        rows_positions = positions.repeat(count, 1) if count > 1 else positions
        for j in range(self.config.layers - self.injection_layer):
            layer_cache = None if cache is None else cache.split.layer(j, channel)
            h = self.stack.layers[self.injection_layer + j](
                h, rows_positions, layer_cache, length, visible=visible
            )
        if last_only:
            h = h[:, -1:]
        locs, scales, weights = self.io.mixture(self.out_norm(h))
        t_out = h.shape[1]
        return [
            (
                locs.view(count, b, t_out, *locs.shape[2:])[n],
                scales.view(count, b, t_out, *scales.shape[2:])[n],
                weights.view(count, b, t_out, -1)[n],
            )
            for n in range(count)
        ]


@dataclass
class ResynthesizerCache:
    """KV caches of the shared layers and of the per-channel layers of ``channels``."""

    shared: KVCache
    split: KVCache
    channels: tuple[int, ...]

    def rows(self, count: int, start: int = 0) -> ResynthesizerCache:
        """Return a view of ``count`` slots from ``start`` of both caches (no copy)."""
        return ResynthesizerCache(
            self.shared.rows(count, start), self.split.rows(count, start), self.channels
        )

    def tensors(self) -> list[Tensor]:
        """Return every tensor of both caches, shared layers first."""
        return self.shared.tensors() + self.split.tensors()

    def copy_prefix(
        self, slot: int, source: ResynthesizerCache, length: int, source_slot: int = 0
    ) -> None:
        """Copy positions ``0..length-1`` of ``source_slot`` in ``source`` into ``slot``."""
        self.shared.copy_prefix(slot, source.shared, length, source_slot)
        self.split.copy_prefix(slot, source.split, length, source_slot)

    def as_ring(self, sink: int) -> None:
        """Make both caches rings (see :meth:`KVCache.as_ring`)."""
        self.shared.as_ring(sink)
        self.split.as_ring(sink)

    def nbytes_per_slot(self) -> int:
        """Return the bytes one slot takes in both caches."""
        return self.shared.nbytes_per_slot() + self.split.nbytes_per_slot()


class _Stack(nn.Module):
    """Holds the layers under the official ``stack.layers.N`` names."""

    def __init__(self, c: ResynthesizerConfig, rotary: Rotary) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Block(c.dim, c.heads, c.n_kv_heads, c.ffn_dim, c.eps, rotary) for _ in range(c.layers)
        )
