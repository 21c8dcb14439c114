"""Latent quantizer: a 32-dim codec latent -> one of 32768 FSQ tokens and its code.

Linear(32 -> dim) with bias, a gated FFN (no residual, no norm), then finite scalar quantization
(FSQ) with levels 8,8,8,8,8: project to 5 dims, bound with tanh, round, project back to ``dim``.
The token index is the mixed-radix number of the five rounded levels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hertz_agents.config import QuantizerConfig
from hertz_agents.model.layers import GatedFFN


class FSQ(nn.Module):
    """Finite scalar quantization with learned input/output projections."""

    def __init__(self, dim: int, levels: tuple[int, ...]) -> None:
        super().__init__()
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)
        # Explicit CPU tensors: real values even when the model is built on the meta device.
        self.register_buffer(
            "levels", torch.tensor(levels, dtype=torch.int64, device="cpu"), persistent=False
        )
        basis = torch.cumprod(
            torch.tensor((1,) + tuple(levels[:-1]), dtype=torch.int64, device="cpu"), dim=0
        )
        self.register_buffer("basis", basis, persistent=False)

    def bound(self, z: Tensor, eps: float = 1e-3) -> Tensor:
        """Squash ``z`` with tanh into each level range, shifted half a step for even levels."""
        levels = self.levels.to(z.dtype)
        half = (levels - 1) * (1 + eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = (offset / half).atanh()
        return (z + shift).tanh() * half - offset

    def quantize(self, z: Tensor) -> Tensor:
        """Normalised codes in [-1, 1] with a straight-through gradient."""
        bounded = self.bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / (self.levels // 2).to(z.dtype)

    def codes_to_tokens(self, codes: Tensor) -> Tensor:
        """Return each code vector's token: its level indices combined in mixed radix."""
        half = (self.levels // 2).to(codes.dtype)
        level_index = (codes * half + half).round().long()
        return (level_index * self.basis).sum(dim=-1)

    def tokens_to_codes(self, tokens: Tensor) -> Tensor:
        """Return the normalised codes in [-1, 1] of ``tokens``: :meth:`codes_to_tokens` undone."""
        level_index = (tokens.unsqueeze(-1) // self.basis) % self.levels
        half = self.levels // 2
        return (level_index - half).float() / half

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` [..., dim] -> (projected code [..., dim], token [...])."""
        # Quantization runs in float32 whatever the model's dtype, as the original forces.
        codes = self.quantize(self.project_in(x).float())
        tokens = self.codes_to_tokens(codes)
        return self.project_out(codes.to(x.dtype)), tokens


class LatentQuantizer(nn.Module):
    """Codec latent -> (quantized representation [.., dim], token)."""

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        self.input = nn.Linear(config.input_dim, config.dim)
        self.ffnn = GatedFFN(config.dim, config.ffn_dim)
        self.compressor = FSQ(config.dim, config.fsq_levels)

    def forward(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """``latents`` [..., input_dim] -> (projected code [..., dim], token [...])."""
        return self.compressor(self.ffnn(self.input(latents)))

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Token [...] -> its projected code [..., dim] (the original's ``untokenize``)."""
        codes = self.compressor.tokens_to_codes(tokens)
        weight = self.compressor.project_out.weight
        return self.compressor.project_out(codes.to(weight.dtype))
