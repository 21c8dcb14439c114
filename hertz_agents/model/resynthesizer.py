"""The resynthesizer: next token -> a Gaussian mixture over the next 32-dim latent.

It reads the same latents as the AR trunk. At layer ``layers // 2`` each channel's quantized
code of the *next* latent is added: the quantizer output rolled one step back in time, with the
last position (whose next latent is not known yet) replaced by the code of the token the trunk
just sampled. From there the two channels of the duplex model run the remaining layers
separately, with separate caches, and both use the first channel's mixture head (``io.fc_*``).
"""

from __future__ import annotations

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
        b, t, _ = h.shape
        locs = self.fc_loc(h).view(b, t, self.components, self.latent_dim)
        scales = square_plus(self.fc_scale(h)).clamp(min=1e-6).view(b, t, self.components, self.latent_dim)
        return locs, scales, self.fc_weight(h)


def gmm_nll(latents: Tensor, params: GMMParams) -> Tensor:
    """Negative log-likelihood of ``latents`` [B, T, Z] under the mixture, per position [B, T]."""
    locs, scales, weights = params
    diff = (latents.unsqueeze(-2) - locs) / scales
    log_probs = -0.5 * (diff.pow(2) + 2 * scales.log() + torch.log(torch.tensor(2 * torch.pi))).sum(-1)
    return -torch.logsumexp(F.log_softmax(weights, dim=-1) + log_probs, dim=-1)


class Resynthesizer(nn.Module):
    """Latents [B, T, C*32] and next tokens [B, C] -> one mixture per channel."""

    def __init__(self, config: ResynthesizerConfig, quantizer: QuantizerConfig, split: bool) -> None:
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

    @property
    def cache_layers(self) -> int:
        """Shared layers once, the layers after injection once per channel."""
        return self.injection_layer + self.channels * (self.config.layers - self.injection_layer)

    def new_cache(self, slots: int, max_len: int, device, dtype) -> KVCache:
        c = self.config
        return KVCache(self.cache_layers, slots, max_len, c.n_kv_heads, c.head_dim, device=device, dtype=dtype)

    def next_codes(self, channel_latents: Tensor, next_token: Tensor | None) -> Tensor:
        """Quantized code of each position's next latent [B, T, qdim]."""
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
        cache: KVCache | None = None,
        rows: int | slice | None = None,
        last_only: bool = False,
    ) -> list[GMMParams]:
        """``next_tokens`` [B, channels] (or None) -> a mixture per channel."""
        channel_latents = latents.chunk(self.channels, dim=-1)
        x = self.io.input_projection(channel_latents[0])
        if self.split:
            x = x + self.io2.input_projection(channel_latents[1])
        if positions is None:
            positions = default_positions(x)

        def layer_cache(index: int):
            return None if cache is None else cache.layer(index, rows)

        for i in range(self.injection_layer):
            x = self.stack.layers[i](x, positions, layer_cache(i))

        projections = (self.plex_projection, self.plex_projection2) if self.split else (self.plex_projection,)
        outputs = []
        after = self.config.layers - self.injection_layer
        for ch in range(self.channels):
            token = None if next_tokens is None else next_tokens[:, ch]
            h = x + projections[ch](self.next_codes(channel_latents[ch], token))
            for j in range(after):
                h = self.stack.layers[self.injection_layer + j](
                    h, positions, layer_cache(self.injection_layer + ch * after + j)
                )
            if last_only:
                h = h[:, -1:]
            outputs.append(self.io.mixture(self.out_norm(h)))
        return outputs


class _Stack(nn.Module):
    """Holds the layers under the official ``stack.layers.N`` names."""

    def __init__(self, c: ResynthesizerConfig, rotary: Rotary) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Block(c.dim, c.heads, c.n_kv_heads, c.ffn_dim, c.eps, rotary) for _ in range(c.layers)
        )
