"""Sampling settings and the batched, sync-free samplers for tokens and latents.

The original samples a token with ``softmax(logits / t).multinomial`` and a latent from the
mixture with a categorical temperature (for the component) and a gaussian temperature (for the
noise). Output is very temperature-sensitive, so we also offer top-p and min-p on the token.
Everything is computed with Gumbel-max on tensors: no ``.item()``, no host sync, per-row
settings, and an optional per-row ``torch.Generator`` for reproducible sessions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingSettings:
    """How a session samples. The defaults are the original's ``(0.8, (0.5, 0.1))``."""

    token_temp: float = 0.8
    categorical_temp: float = 0.5
    gaussian_temp: float = 0.1
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        for name in ("token_temp", "categorical_temp", "gaussian_temp"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 (0 means greedy), got {value!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")

    def replace(self, **changes: float | None) -> SamplingSettings:
        return dataclasses.replace(self, **changes)


@dataclass
class SamplingTensors:
    """Per-row sampling settings as tensors [B] (top_p 1.0 and min_p 0.0 mean off)."""

    token_temp: Tensor
    categorical_temp: Tensor
    gaussian_temp: Tensor
    top_p: Tensor
    min_p: Tensor
    # Decided on the host from the settings: the top-p/min-p filter sorts the whole vocabulary,
    # the costliest part of sampling, so it only runs when some row asks for it.
    filtered: bool = False

    @classmethod
    def from_settings(cls, settings: list[SamplingSettings], device=None) -> SamplingTensors:
        def col(get) -> Tensor:
            return torch.tensor([float(get(s)) for s in settings], dtype=torch.float32, device=device)

        return cls(
            col(lambda s: s.token_temp),
            col(lambda s: s.categorical_temp),
            col(lambda s: s.gaussian_temp),
            col(lambda s: 1.0 if s.top_p is None else s.top_p),
            col(lambda s: 0.0 if s.min_p is None else s.min_p),
            filtered=any((s.top_p is not None and s.top_p < 1) or bool(s.min_p) for s in settings),
        )

    def select(self, rows: Tensor) -> SamplingTensors:
        tensors = (self.token_temp, self.categorical_temp, self.gaussian_temp, self.top_p, self.min_p)
        return SamplingTensors(*(t.index_select(0, rows) for t in tensors), filtered=self.filtered)


def _noise(kind: str, shape: tuple[int, ...], generators, device) -> Tensor:
    """Uniform or normal noise [B, ...], one generator per row when given."""
    draw = torch.rand if kind == "uniform" else torch.randn
    if generators is None:
        return draw(shape, device=device)
    return torch.stack([draw(shape[1:], generator=g, device=device) for g in generators])


def _gumbel(shape: tuple[int, ...], generators, device) -> Tensor:
    u = _noise("uniform", shape, generators, device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _pick(logits: Tensor, temp: Tensor, generators) -> Tensor:
    """Sample an index per row from softmax(logits / temp); temp 0 means argmax. [B, N] -> [B]."""
    temp = temp.to(logits.dtype)[:, None]
    greedy = temp <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temp), temp)
    noise = _gumbel(tuple(logits.shape), generators, logits.device).to(logits.dtype)
    return torch.where(greedy, scaled, scaled + noise).argmax(dim=-1)


def filter_logits(logits: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Mask logits [B, V] outside the top-p nucleus or below min_p * max probability."""
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    keep_min = probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each entry
    keep_sorted = before < top_p[:, None]
    keep_top = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~(keep_min & keep_top), float("-inf"))


def sample_token(logits: Tensor, sampling: SamplingTensors, generators=None) -> Tensor:
    """Logits [B, V] -> token [B]."""
    # Temperature first, as the original, then the nucleus / min-p filter on the tempered dist.
    temp = sampling.token_temp[:, None].to(logits.dtype)
    tempered = logits.float() / torch.where(temp > 0, temp, torch.ones_like(temp))
    filtered = filter_logits(tempered, sampling.top_p, sampling.min_p) if sampling.filtered else tempered
    ones = torch.ones_like(sampling.token_temp)
    return _pick(filtered, torch.where(sampling.token_temp > 0, ones, sampling.token_temp), generators)


def sample_latent(mixture: tuple[Tensor, Tensor, Tensor], sampling: SamplingTensors, generators=None) -> Tensor:
    """Mixture (locs [B, K, Z], scales [B, K, Z], weights [B, K]) -> latent [B, Z]."""
    locs, scales, weights = mixture
    component = _pick(weights.float(), sampling.categorical_temp, generators)  # [B]
    index = component[:, None, None].expand(-1, 1, locs.shape[-1])
    loc = locs.gather(1, index).squeeze(1)
    scale = scales.gather(1, index).squeeze(1)
    noise = _noise("normal", tuple(loc.shape), generators, loc.device).to(loc.dtype)
    return loc + scale * sampling.gaussian_temp[:, None].to(loc.dtype) * noise
