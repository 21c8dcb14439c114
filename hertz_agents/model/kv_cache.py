"""Preallocated key/value caches, laid out so attention reads the live part without copies.

One :class:`KVCache` holds, for every layer, keys and values of shape
``[channels, slots, kv_heads, max_len, head_dim]``, allocated once. Each slot is one
conversation; ``channels`` is 1 except for the resynthesizer's per-channel layers. Channels come
first so that one channel of the stepped rows is a contiguous view (it rounds exactly as when it
runs alone); all channels of all slots are one batch without a copy. Heads come before
positions so that ``k[..., :length, :]`` (the live part of the cache) is a strided view that
attention kernels (SDPA, FlashAttention's kv-cache path) read directly: no transposed copy of
the cache per step.

The networks never see slot numbers: whoever owns the slots hands them a view
(:meth:`KVCache.rows`) of the rows being stepped, and the length of the context that is live
(:class:`LayerCache` ``length``), a static number so each length bucket is one compiled shape.

A cache can be a **ring** (:meth:`KVCache.as_ring`): positions stay absolute (rotary is applied
before keys are stored, so attention stays relative) and position ``p`` is stored at
:func:`ring_index`: the first ``sink`` positions are pinned, the others cycle through the rest.
Once a row has passed the cache's length every stored position is one of its last ones, so the
mask of the cached path (key ``j`` visible when ``j <= p``) holds as it is.

``dtype=torch.int8`` stores keys and values as int8 with one float scale per (head, position)
(symmetric, absmax): a quarter of float32's bytes, half of bfloat16's. The live slice is
dequantized on read (one copy of the live part, not of the whole cache).
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127.0


def ring_index(positions: Tensor, sink: int, length: int) -> Tensor:
    """Where absolute ``positions`` live in a ring of ``length`` slots, the first ``sink`` pinned.

    Below ``length`` a position is its own index, so a ring that has not wrapped is an ordinary
    cache.
    """
    cycling = sink + torch.remainder(positions - sink, length - sink)
    return torch.where(positions < sink, positions, cycling)


class LayerCache:
    """One layer's keys and values for the rows being stepped: ``[B, kv_heads, L, head_dim]``."""

    def __init__(
        self,
        k: Tensor,
        v: Tensor,
        k_scale: Tensor | None = None,
        v_scale: Tensor | None = None,
        ring_sink: int | None = None,
    ) -> None:
        self.k, self.v, self.k_scale, self.v_scale = k, v, k_scale, v_scale
        self.ring_sink = ring_sink  # None: position p is stored at index p

    @property
    def max_len(self) -> int:
        """Positions the cache holds per row."""
        return self.k.shape[2]

    def write(self, k_new: Tensor, v_new: Tensor, positions: Tensor) -> None:
        """Store ``k_new``/``v_new`` [B, T, H, D] at each row's ``positions`` [B, T]."""
        b, t, h, _ = k_new.shape
        if self.ring_sink is not None:
            positions = ring_index(positions, self.ring_sink, self.max_len)
        rows = torch.arange(b, device=positions.device)[:, None, None].expand(b, h, t)
        heads = torch.arange(h, device=positions.device)[None, :, None].expand(b, h, t)
        pos = positions[:, None, :].expand(b, h, t)
        index = (rows, heads, pos)
        for cache, scale, new in ((self.k, self.k_scale, k_new), (self.v, self.v_scale, v_new)):
            new = new.transpose(1, 2)  # [B, H, T, D]
            if scale is None:
                cache.index_put_(index, new.to(cache.dtype))
            else:
                step = new.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / INT8_MAX
                scale.index_put_(index, step)
                cache.index_put_(
                    index, (new.float() / step).round().clamp(-INT8_MAX, INT8_MAX).to(cache.dtype)
                )

    def read(self, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values of positions ``0..length-1``: views of the cache when it is not int8."""
        k, v = self.k[:, :, :length], self.v[:, :, :length]
        if self.k_scale is None:
            return k, v
        return (
            (k.float() * self.k_scale[:, :, :length]).to(dtype),
            (v.float() * self.v_scale[:, :, :length]).to(dtype),
        )


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
        channels: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (channels, slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.k_scale: list[Tensor] | None = None
        self.v_scale: list[Tensor] | None = None
        if dtype == torch.int8:
            scale_shape = shape[:-1] + (1,)
            self.k_scale = [torch.ones(scale_shape, device=device) for _ in range(layers)]
            self.v_scale = [torch.ones(scale_shape, device=device) for _ in range(layers)]
        self.max_len, self.channels = max_len, channels
        self.ring_sink: int | None = None

    def as_ring(self, sink: int) -> None:
        """Store positions past ``max_len`` in a ring, pinning the first ``sink`` (see module)."""
        if not 0 <= sink < self.max_len - 1:
            raise ValueError(
                f"a ring's sink ({sink}) must leave room in its {self.max_len} positions"
            )
        self.ring_sink = sink

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache owns (to copy, mark static for CUDA graphs, or count)."""
        return self.k + self.v + (self.k_scale or []) + (self.v_scale or [])

    def rows(self, count: int, start: int = 0) -> KVCache:
        """A view of ``count`` slots from ``start`` (no copy): what one batched forward is given."""
        view = object.__new__(KVCache)
        end = start + count
        view.k, view.v = [t[:, start:end] for t in self.k], [t[:, start:end] for t in self.v]
        view.k_scale = None if self.k_scale is None else [t[:, start:end] for t in self.k_scale]
        view.v_scale = None if self.v_scale is None else [t[:, start:end] for t in self.v_scale]
        view.max_len, view.channels, view.ring_sink = self.max_len, self.channels, self.ring_sink
        return view

    def layer(self, index: int, channel: int | None = None) -> LayerCache:
        """Return layer ``index``: one ``channel`` of each slot, or all channels.

        Rows are channel-major; a view when the rows are all the slots or there is one channel,
        else a copy.
        """

        def view(t: Tensor) -> Tensor:
            if channel is not None:
                return t[channel]
            return t[0] if t.shape[0] == 1 else t.reshape(-1, *t.shape[2:])

        scales = (None, None)
        if self.k_scale is not None and self.v_scale is not None:
            scales = (view(self.k_scale[index]), view(self.v_scale[index]))
        return LayerCache(view(self.k[index]), view(self.v[index]), *scales, self.ring_sink)

    def turn_keys(self, slot: int, start: int, cos: Tensor, sin: Tensor) -> None:
        """Rotate ``slot``'s keys from position ``start`` on by ``(cos, sin)`` [head_dim].

        A ring's rebase (:class:`~hertz_agents.engine.stepper.Stepper`): keys are stored after
        rotary, so moving them all by the same number of positions leaves attention as it was.
        Int8 keys are dequantized, turned and quantized again.
        """
        for i, cache in enumerate(self.k):
            keys = cache[:, slot, :, start:]  # [channels, kv_heads, positions, head_dim]
            scale = None if self.k_scale is None else self.k_scale[i][:, slot, :, start:]
            x = keys.float() if scale is None else keys.float() * scale
            x1, x2 = x.chunk(2, dim=-1)
            turned = x * cos + torch.cat((-x2, x1), dim=-1) * sin
            if scale is None:
                keys.copy_(turned.to(keys.dtype))
            else:
                step = turned.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / INT8_MAX
                scale.copy_(step)
                keys.copy_((turned / step).round().clamp(-INT8_MAX, INT8_MAX).to(keys.dtype))

    def copy_prefix(self, slot: int, source: KVCache, length: int, source_slot: int = 0) -> None:
        """Copy positions ``0..length-1`` of ``source``'s ``source_slot`` into ``slot``."""
        for dst, src in zip(self.tensors(), source.tensors()):
            dst[:, slot, :, :length].copy_(src[:, source_slot, :, :length])

    def nbytes_per_slot(self) -> int:
        """Return the bytes one slot takes across all layers' keys, values and scales."""
        return sum(t[:, 0].numel() * t.element_size() for t in self.tensors())
