"""Transformer building blocks shared by the AR trunk and the resynthesizer.

Parameter names follow the official checkpoints one to one (``attn.attn.proj_qkv``,
``ffnn.ffnn.gateup_proj``...), so loading is a plain ``load_state_dict``.

Every block runs in two modes:

* one pass (``cache=None``): causal attention over the whole sequence, used for training and
  for the parity tests, or attention through a given ``visible`` mask (a window that slides, a
  pinned prefix), which scores in one pass what a cache that drops old keys would see;
* cached (``cache`` given): the new positions' keys and values are written into a preallocated
  :class:`~hertz_agents.model.kv_cache.LayerCache` at each row's own position, and attention reads
  the first ``length`` positions of the cache (the live context, bucketed by the caller so each
  bucket is one static shape) through a mask. Rows (sessions) can sit at different positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hertz_agents.model.kv_cache import LayerCache


class Norm(nn.Module):
    """LayerNorm with a weight and no bias, as in the original."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` over its last dimension and scale it by the weight."""
        return F.layer_norm(x, (self.weight.shape[0],), weight=self.weight, bias=None, eps=self.eps)


class GatedFFN(nn.Module):
    """``down(up * silu(gate))`` with one fused ``gateup_proj``, no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gateup_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gated feed-forward to ``x`` [..., dim]."""
        gate, up = self.gateup_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half layout, computed in float32.

    The table covers the model's ``seq_len`` positions as the original computes them (float32
    angles, for parity). A ring KV cache keeps absolute positions, which run past it:
    :meth:`extend` appends positions whose angles are computed in float64 before the float32
    cosines, so a far position is as exact as position 10, and :meth:`turn` gives the rotation
    that moves a key by a number of positions.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        # Explicit CPU tensors: real values even when the model is built on the meta device.
        steps = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
        freqs = 1.0 / (theta ** (steps / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device="cpu"), freqs)
        emb = torch.cat((angles, angles), dim=-1)  # [L, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    @property
    def positions(self) -> int:
        """Positions the table covers."""
        return self.cos.shape[0]

    def _angles(self, positions: Tensor) -> Tensor:
        """Angles of ``positions`` (float64, [len, head_dim]), rotate-half layout."""
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float64)
        freqs = 1.0 / (self.theta ** (steps / self.head_dim))
        angles = torch.outer(positions.to(torch.float64), freqs)
        return torch.cat((angles, angles), dim=-1)

    def turn(self, offset: int) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` [head_dim] that move a rotated vector by ``offset`` positions."""
        emb = self._angles(torch.tensor([offset]))[0]
        like = {"device": self.cos.device, "dtype": torch.float32}
        return emb.cos().to(**like), emb.sin().to(**like)

    def extend(self, positions: int) -> None:
        """Grow the table to ``positions`` (no-op when it is long enough); old rows are kept."""
        start = self.positions
        if positions <= start:
            return
        emb = self._angles(torch.arange(start, positions))
        like = {"device": self.cos.device, "dtype": self.cos.dtype}
        self.cos = torch.cat((self.cos, emb.cos().to(**like)))
        self.sin = torch.cat((self.sin, emb.sin().to(**like)))

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` [B, T, H, D] at ``positions`` [B, T]."""
        cos = self.cos[positions].unsqueeze(2)  # [B, T, 1, D]
        sin = self.sin[positions].unsqueeze(2)
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x.float() * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with q/k LayerNorm over all heads at once, before rotary."""

    def __init__(self, dim: int, heads: int, kv_heads: int, eps: float, rotary: Rotary) -> None:
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = dim // heads
        self.proj_qkv = nn.Linear(dim, self.head_dim * (heads + 2 * kv_heads), bias=False)
        self.norm_q = Norm(self.head_dim * heads, eps=eps)
        self.norm_k = Norm(self.head_dim * kv_heads, eps=eps)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        # Shared, not a child module: it holds no parameters and must not appear in state_dict.
        self._rotary = [rotary]

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cache: LayerCache | None = None,
        length: int | None = None,
        *,
        visible: Tensor | None = None,
    ) -> Tensor:
        """``x`` [B, T, dim] at ``positions`` [B, T] -> [B, T, dim].

        With a cache, attention reads its first ``length`` positions (all when None); every
        row's positions must be below ``length``. Without one, ``visible`` [T, T] (True: key j
        is visible to query i) replaces the causal mask; only the one-pass path takes it.
        """
        if visible is not None and cache is not None:
            raise ValueError("visible is for the one-pass path (cache=None) only")
        b, t, _ = x.shape
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.proj_qkv(x).split((q_width, kv_width, kv_width), dim=-1)
        q = self.norm_q(q).view(b, t, self.heads, self.head_dim)
        k = self.norm_k(k).view(b, t, self.kv_heads, self.head_dim)
        v = v.reshape(b, t, self.kv_heads, self.head_dim)
        rotary = self._rotary[0]
        q, k = rotary(q, positions), rotary(k, positions)

        q = q.transpose(1, 2)  # [B, H, T, D]: the layout SDPA reads
        if cache is None:
            k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)
            # None keeps SDPA's own causal path, so the default computes exactly what it did.
            mask, causal = (None, True) if visible is None else (visible, False)
        else:
            cache.write(k, v, positions)
            live = cache.max_len if length is None else length
            k_all, v_all = cache.read(live, q.dtype)
            # Key j is visible to the query at position p when j <= p (and was written).
            key_pos = torch.arange(live, device=x.device)
            mask = (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, live]
            causal = False
        out = F.scaled_dot_product_attention(
            q,
            k_all,
            v_all,
            attn_mask=mask,
            is_causal=causal,
            enable_gqa=self.heads != self.kv_heads,
        )
        return self.attn_out(out.transpose(1, 2).reshape(b, t, q_width))


class PreNormAttention(nn.Module):
    """Attention after a norm, added back to the input.

    Args:
        dim: Model width.
        heads: Query heads.
        kv_heads: Key/value heads (fewer for grouped-query attention).
        eps: Epsilon of the norms.
        rotary: The shared rotary embedding.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, eps: float, rotary: Rotary) -> None:
        super().__init__()
        self.attn_norm = Norm(dim, eps=eps)
        self.attn = Attention(dim, heads, kv_heads, eps, rotary)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cache: LayerCache | None,
        length: int | None,
        *,
        visible: Tensor | None = None,
    ) -> Tensor:
        """Return ``x`` plus attention over the normed ``x`` (see :class:`Attention`)."""
        return x + self.attn(self.attn_norm(x), positions, cache, length, visible=visible)


class PreNormFFN(nn.Module):
    """The gated feed-forward after a norm, added back to the input.

    Args:
        dim: Model width.
        hidden: Hidden width of the feed-forward.
        eps: Epsilon of the norm.
    """

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.ffnn_norm = Norm(dim, eps=eps)
        self.ffnn = GatedFFN(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x`` plus the feed-forward of the normed ``x``."""
        return x + self.ffnn(self.ffnn_norm(x))


class Block(nn.Module):
    """Pre-norm transformer block: attention then gated FFN, each residual."""

    def __init__(
        self, dim: int, heads: int, kv_heads: int, ff_dim: int, eps: float, rotary: Rotary
    ) -> None:
        super().__init__()
        self.attn = PreNormAttention(dim, heads, kv_heads, eps, rotary)
        self.ffnn = PreNormFFN(dim, ff_dim, eps)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        cache: LayerCache | None = None,
        length: int | None = None,
        *,
        visible: Tensor | None = None,
    ) -> Tensor:
        """Run the block on ``x`` [B, T, dim] at ``positions`` [B, T], reading/writing ``cache``.

        ``visible`` [T, T]: the one-pass attention mask (see :class:`Attention`).
        """
        return self.ffnn(self.attn(x, positions, cache, length, visible=visible))


def default_positions(x: Tensor) -> Tensor:
    """Positions 0..T-1 for every row of ``x`` [B, T, ...] (the one-pass case)."""
    b, t = x.shape[:2]
    return torch.arange(t, device=x.device).unsqueeze(0).expand(b, t)
