"""Preallocated key/value caches that know their length.

One :class:`KVCache` holds, for every layer, keys and values of shape
``[slots, max_len, kv_heads, head_dim]``, allocated once. Each slot is one conversation. The
length of every slot is kept in ``lengths`` (a device tensor), never found by scanning the
cache. The engine passes ``rows`` (the slots stepped this tick) and per-row positions; writes
go to ``positions`` of those rows only, so sessions at different points of their calls share
one batched forward.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """View of one layer's cache restricted to the rows being stepped."""

    def __init__(self, k: Tensor, v: Tensor, rows: Tensor | None) -> None:
        self.k, self.v, self.rows = k, v, rows

    def write(self, k_new: Tensor, v_new: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k_new``/``v_new`` [B, T, H, D] at ``positions`` [B, T]; return the rows' caches.

        Returns keys and values [B, max_len, H, D] for the stepped rows.
        """
        if self.rows is None:
            batch = torch.arange(self.k.shape[0], device=self.k.device)
        else:
            batch = self.rows
        index = (batch[:, None].expand_as(positions), positions)
        self.k.index_put_(index, k_new.to(self.k.dtype))
        self.v.index_put_(index, v_new.to(self.v.dtype))
        if self.rows is None:
            return self.k, self.v
        return self.k.index_select(0, self.rows), self.v.index_select(0, self.rows)


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
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.max_len = max_len

    def layer(self, index: int, rows: Tensor | None = None) -> LayerCache:
        return LayerCache(self.k[index], self.v[index], rows)

    def reset(self, slot: int) -> None:
        """Forget slot ``slot``'s history (its stale keys are masked out by the length)."""
        self.lengths[slot] = 0

    def nbytes_per_slot(self) -> int:
        per_layer = self.k[0][0].numel() * self.k[0].element_size() * 2
        return per_layer * len(self.k)
