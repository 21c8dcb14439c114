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
        for name in TEMPERATURE_FIELDS:
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 (0 means greedy), got {value!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")

    def replace(self, **changes: float | None) -> SamplingSettings:
        """Return a copy with the given fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SamplingSettings))
"""Every setting, in order: the one list the wire protocol and the servers use."""

TEMPERATURE_FIELDS: tuple[str, ...] = ("token_temp", "categorical_temp", "gaussian_temp")
"""The temperatures (0 means greedy)."""

OPTIONAL_SAMPLING_FIELDS: tuple[str, ...] = ("top_p", "min_p")
"""The settings that may be None (off)."""


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
        """Build one row per settings object, on ``device``; unset top-p/min-p become 1 and 0."""

        def col(get) -> Tensor:
            return torch.tensor(
                [float(get(s)) for s in settings], dtype=torch.float32, device=device
            )

        return cls(
            col(lambda s: s.token_temp),
            col(lambda s: s.categorical_temp),
            col(lambda s: s.gaussian_temp),
            col(lambda s: 1.0 if s.top_p is None else s.top_p),
            col(lambda s: 0.0 if s.min_p is None else s.min_p),
            filtered=any(_filters(s) for s in settings),
        )

    @classmethod
    def allocate(cls, slots: int, device=None) -> SamplingTensors:
        """A table of ``slots`` rows of default settings, written per slot by :meth:`set_row`."""
        table = cls.from_settings([SamplingSettings()] * slots, device)
        table._filtered_rows = [False] * slots
        return table

    def set_row(self, row: int, settings: SamplingSettings) -> None:
        """Write one slot's settings in place (no tensors built per tick)."""
        values = (
            settings.token_temp,
            settings.categorical_temp,
            settings.gaussian_temp,
            1.0 if settings.top_p is None else settings.top_p,
            0.0 if settings.min_p is None else settings.min_p,
        )
        for tensor, value in zip(self._columns(), values):
            tensor[row] = float(value)
        self._filtered_rows[row] = _filters(settings)

    def rows(self, count: int) -> SamplingTensors:
        """A view of the first ``count`` rows of an allocated table."""
        flags = getattr(self, "_filtered_rows", None)
        filtered = self.filtered if flags is None else any(flags[:count])
        return SamplingTensors(*(t[:count] for t in self._columns()), filtered=filtered)

    def _columns(self) -> tuple[Tensor, ...]:
        return (self.token_temp, self.categorical_temp, self.gaussian_temp, self.top_p, self.min_p)

    def select(self, rows: Tensor) -> SamplingTensors:
        """Return the rows at indices ``rows`` (a device tensor of row indices)."""
        tensors = (
            self.token_temp,
            self.categorical_temp,
            self.gaussian_temp,
            self.top_p,
            self.min_p,
        )
        return SamplingTensors(*(t.index_select(0, rows) for t in tensors), filtered=self.filtered)


def _filters(settings: SamplingSettings) -> bool:
    return (settings.top_p is not None and settings.top_p < 1) or bool(settings.min_p)


@dataclass
class SamplingNoise:
    """The random numbers one step's sampling uses, drawn before the (compilable) math.

    Shapes ``[B, C, ...]`` for C channels. Per row they are drawn from that row's generator in
    the order the samplers always used (each channel's token, then each channel's component and
    noise), so a session's output does not depend on which channels a step computes.
    """

    token_uniform: Tensor  # [B, C, vocab]
    component_uniform: Tensor  # [B, C, components]
    normal: Tensor  # [B, C, latent]

    @classmethod
    def draw(
        cls, generators, rows: int, channels: int, vocab: int, components: int, latent: int, device
    ) -> SamplingNoise:
        """Draw one step's noise for ``rows`` rows, from each row's generator when given.

        Args:
            generators: One ``torch.Generator`` per row, or None to use the global generator.
            rows: Batch rows.
            channels: Channels per row.
            vocab: Token vocabulary size.
            components: Mixture components.
            latent: Latent width.
            device: Where the noise is drawn.
        """
        if generators is None:
            return cls(
                torch.rand(rows, channels, vocab, device=device),
                torch.rand(rows, channels, components, device=device),
                torch.randn(rows, channels, latent, device=device),
            )
        tokens, comps, normals = [], [], []
        for g in generators:
            tokens.append(
                torch.stack(
                    [torch.rand(vocab, generator=g, device=device) for _ in range(channels)]
                )
            )
            row_comps, row_normals = [], []
            for _ in range(channels):
                row_comps.append(torch.rand(components, generator=g, device=device))
                row_normals.append(torch.randn(latent, generator=g, device=device))
            comps.append(torch.stack(row_comps))
            normals.append(torch.stack(row_normals))
        return cls(torch.stack(tokens), torch.stack(comps), torch.stack(normals))


def _noise(kind: str, shape: tuple[int, ...], generators, device) -> Tensor:
    """Uniform or normal noise [B, ...], one generator per row when given."""
    draw = torch.rand if kind == "uniform" else torch.randn
    if generators is None:
        return draw(shape, device=device)
    return torch.stack([draw(shape[1:], generator=g, device=device) for g in generators])


def _gumbel(shape: tuple[int, ...], generators, device, uniform: Tensor | None = None) -> Tensor:
    u = _noise("uniform", shape, generators, device) if uniform is None else uniform
    u = u.clamp(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _pick(logits: Tensor, temp: Tensor, generators, uniform: Tensor | None = None) -> Tensor:
    """Sample an index per row from softmax(logits / temp); temp 0 means argmax. [B, N] -> [B]."""
    temp = temp.to(logits.dtype)[:, None]
    greedy = temp <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temp), temp)
    noise = _gumbel(tuple(logits.shape), generators, logits.device, uniform).to(logits.dtype)
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


def sample_token(
    logits: Tensor, sampling: SamplingTensors, generators=None, uniform: Tensor | None = None
) -> Tensor:
    """Logits [B, V] -> token [B] (``uniform`` [B, V]: pre-drawn noise instead of generators)."""
    # Temperature first, as the original, then the nucleus / min-p filter on the tempered dist.
    temp = sampling.token_temp[:, None].to(logits.dtype)
    tempered = logits.float() / torch.where(temp > 0, temp, torch.ones_like(temp))
    filtered = (
        filter_logits(tempered, sampling.top_p, sampling.min_p) if sampling.filtered else tempered
    )
    ones = torch.ones_like(sampling.token_temp)
    return _pick(
        filtered,
        torch.where(sampling.token_temp > 0, ones, sampling.token_temp),
        generators,
        uniform,
    )


def sample_latent(
    mixture: tuple[Tensor, Tensor, Tensor],
    sampling: SamplingTensors,
    generators=None,
    uniform: Tensor | None = None,
    normal: Tensor | None = None,
) -> Tensor:
    """Mixture (locs [B, K, Z], scales [B, K, Z], weights [B, K]) -> latent [B, Z].

    ``uniform`` [B, K] and ``normal`` [B, Z]: pre-drawn noise instead of generators.
    """
    locs, scales, weights = mixture
    component = _pick(weights.float(), sampling.categorical_temp, generators, uniform)  # [B]
    index = component[:, None, None].expand(-1, 1, locs.shape[-1])
    loc = locs.gather(1, index).squeeze(1)
    scale = scales.gather(1, index).squeeze(1)
    if normal is None:
        normal = _noise("normal", tuple(loc.shape), generators, loc.device)
    noise = normal.to(loc.dtype)
    return loc + scale * sampling.gaussian_temp[:, None].to(loc.dtype) * noise
