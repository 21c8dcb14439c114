"""Transformer building blocks shared by the AR trunk and the resynthesizer.

Parameter names follow the official checkpoints one to one (``attn.attn.proj_qkv``,
``ffnn.ffnn.gateup_proj``...), so loading is a plain ``load_state_dict``.

Every block runs in two modes:

* one pass (``cache=None``): causal attention over the whole sequence, used for training and
  for the parity tests;
* cached (``cache`` given): the new positions' keys and values are written into a preallocated
  :class:`~hertz_agents.model.kv_cache.LayerCache` at each row's own position, and attention reads
  the whole fixed-size cache through a mask. Shapes never depend on how far a call has got, so a
  step can be compiled or CUDA-graphed, and rows (sessions) can sit at different positions.
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
        return F.layer_norm(x, (self.weight.shape[0],), weight=self.weight, bias=None, eps=self.eps)


class GatedFFN(nn.Module):
    """``down(up * silu(gate))`` with one fused ``gateup_proj``, no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gateup_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gateup_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half layout, computed in float32."""

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        # Explicit CPU tensors: real values even when the model is built on the meta device.
        steps = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
        freqs = 1.0 / (theta ** (steps / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device="cpu"), freqs)
        emb = torch.cat((angles, angles), dim=-1)  # [L, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

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

    def forward(self, x: Tensor, positions: Tensor, cache: LayerCache | None = None) -> Tensor:
        """``x`` [B, T, dim] at ``positions`` [B, T] -> [B, T, dim]."""
        b, t, _ = x.shape
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.proj_qkv(x).split((q_width, kv_width, kv_width), dim=-1)
        q = self.norm_q(q).view(b, t, self.heads, self.head_dim)
        k = self.norm_k(k).view(b, t, self.kv_heads, self.head_dim)
        v = v.reshape(b, t, self.kv_heads, self.head_dim)
        rotary = self._rotary[0]
        q, k = rotary(q, positions), rotary(k, positions)

        if cache is None:
            k_all, v_all, mask, causal = k, v, None, True
        else:
            k_all, v_all = cache.write(k, v, positions)
            # Key j is visible to the query at position p when j <= p (and was written).
            key_pos = torch.arange(k_all.shape[1], device=x.device)
            mask = (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, L]
            causal = False
        groups = self.heads // self.kv_heads
        if groups > 1:
            k_all = k_all.repeat_interleave(groups, dim=2)
            v_all = v_all.repeat_interleave(groups, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=mask, is_causal=causal
        )
        return self.attn_out(out.transpose(1, 2).reshape(b, t, q_width))


class PreNormAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, eps: float, rotary: Rotary) -> None:
        super().__init__()
        self.attn_norm = Norm(dim, eps=eps)
        self.attn = Attention(dim, heads, kv_heads, eps, rotary)

    def forward(self, x: Tensor, positions: Tensor, cache: LayerCache | None) -> Tensor:
        return x + self.attn(self.attn_norm(x), positions, cache)


class PreNormFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.ffnn_norm = Norm(dim, eps=eps)
        self.ffnn = GatedFFN(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffnn(self.ffnn_norm(x))


class Block(nn.Module):
    """Pre-norm transformer block: attention then gated FFN, each residual."""

    def __init__(self, dim: int, heads: int, kv_heads: int, ff_dim: int, eps: float, rotary: Rotary) -> None:
        super().__init__()
        self.attn = PreNormAttention(dim, heads, kv_heads, eps, rotary)
        self.ffnn = PreNormFFN(dim, ff_dim, eps)

    def forward(self, x: Tensor, positions: Tensor, cache: LayerCache | None = None) -> Tensor:
        return self.ffnn(self.attn(x, positions, cache))


def default_positions(x: Tensor) -> Tensor:
    """Positions 0..T-1 for every row of ``x`` [B, T, ...] (the one-pass case)."""
    b, t = x.shape[:2]
    return torch.arange(t, device=x.device).unsqueeze(0).expand(b, t)
