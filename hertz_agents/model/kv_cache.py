"""Preallocated key/value caches that know their length.

One :class:`KVCache` holds, for every layer, keys and values of shape
``[slots, max_len, kv_heads, head_dim]``, allocated once. Each slot is one conversation. Its
length is the position the engine keeps for it (a device tensor), never found by scanning the
cache. A forward covers the first ``rows`` slots (a view, never a copy) with per-row
positions, so sessions at different points of their calls share one batched forward; keys
beyond a row's position are masked out, so stale entries of a reused slot are never read.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """View of one layer's cache restricted to the rows being stepped."""

    def __init__(self, k: Tensor, v: Tensor, rows: int | slice | None) -> None:
        view = slice(None) if rows is None else (slice(0, rows) if isinstance(rows, int) else rows)
        self.k, self.v = k[view], v[view]

    def write(self, k_new: Tensor, v_new: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k_new``/``v_new`` [B, T, H, D] at ``positions`` [B, T]; return the rows' caches.

        Returns keys and values [B, max_len, H, D] for the stepped rows.
        """
        batch = torch.arange(self.k.shape[0], device=self.k.device)
        index = (batch[:, None].expand_as(positions), positions)
        self.k.index_put_(index, k_new.to(self.k.dtype))
        self.v.index_put_(index, v_new.to(self.v.dtype))
        return self.k, self.v


class KVCache:
    """Keys and values for ``layers`` attention layers over ``slots`` conversations."""

    def __init__(
        self,
        layers: int,
        slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (slots, max_len, kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.max_len = max_len

    def layer(self, index: int, rows: int | slice | None = None) -> LayerCache:
        """Layer ``index``'s cache for the first ``rows`` slots, a slice of slots, or all (None)."""
        return LayerCache(self.k[index], self.v[index], rows)

    def copy_prefix(self, slot: int, source: KVCache, length: int) -> None:
        """Copy the first ``length`` positions of ``source``'s slot 0 into ``slot`` (prompt reuse)."""
        for dst, src in zip(self.k + self.v, source.k + source.v):
            dst[slot, :length].copy_(src[0, :length])

    def nbytes_per_slot(self) -> int:
        per_layer = self.k[0][0].numel() * self.k[0].element_size() * 2
        return per_layer * len(self.k)
