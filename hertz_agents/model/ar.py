"""hertz-ar: the decoder-only trunk that predicts the next FSQ token of each channel.

The two-channel ("split", duplex) variant sums two input projections of the two channels'
latents and has one output head per channel; the one-channel variant has one of each.
Channel 1 is the other speaker (the caller), channel 2 the model's own voice.
"""

from __future__ import annotations

from torch import Tensor, nn

from hertz_agents.config import TransformerConfig
from hertz_agents.model.kv_cache import KVCache
from hertz_agents.model.layers import Block, Norm, Rotary, default_positions


class OutputHead(nn.Module):
    """A norm and a linear projection from the trunk's width to one channel's logits.

    Args:
        dim: The trunk's width.
        vocab_size: Number of FSQ tokens.
        eps: Epsilon of the norm.
    """

    def __init__(self, dim: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.norm = Norm(dim, eps=eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Project hidden states ``x`` [B, T, dim] to logits [B, T, vocab]."""
        return self.output(self.norm(x))


class HertzAR(nn.Module):
    """Latents [B, T, channels*32] -> logits per channel, each [B, T, vocab]."""

    def __init__(self, config: TransformerConfig, split: bool) -> None:
        super().__init__()
        self.config, self.split = config, split
        c = config
        self.rotary = Rotary(c.head_dim, c.seq_len, c.theta)
        self.input = nn.Linear(c.latent_size, c.dim)
        self.layers = nn.ModuleList(
            Block(c.dim, c.heads, c.n_kv_heads, c.ffn_dim, c.eps, self.rotary)
            for _ in range(c.layers)
        )
        self.output = OutputHead(c.dim, c.vocab_size, c.eps)
        if split:
            self.input2 = nn.Linear(c.latent_size, c.dim)
            self.output2 = OutputHead(c.dim, c.vocab_size, c.eps)

    def new_cache(self, slots: int, max_len: int, device, dtype) -> KVCache:
        """Allocate a KV cache for ``slots`` conversations of up to ``max_len`` positions."""
        c = self.config
        return KVCache(
            c.layers, slots, max_len, c.n_kv_heads, c.head_dim, device=device, dtype=dtype
        )

    def forward(
        self,
        latents: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        *,
        heads: tuple[int, ...] | None = None,
        length: int | None = None,
        visible: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """Logits of the channels in ``heads`` (all when None; ``()`` for none: a prefill).

        ``last_only`` projects only the last position (the step case). ``cache`` is a view of
        the rows being stepped; attention reads its first ``length`` positions. Without a
        cache, ``visible`` [T, T] (True: key j visible to query i) replaces the causal mask.
        """
        if self.split:
            first, second = latents.chunk(2, dim=-1)
            x = self.input(first) + self.input2(second)
        else:
            x = self.input(latents)
        if positions is None:
            positions = default_positions(x)
        for i, layer in enumerate(self.layers):
            x = layer(
                x, positions, None if cache is None else cache.layer(i), length, visible=visible
            )
        if last_only:
            x = x[:, -1:]
        all_heads = (self.output, self.output2) if self.split else (self.output,)
        wanted = range(len(all_heads)) if heads is None else heads
        return tuple(all_heads[h](x) for h in wanted)
