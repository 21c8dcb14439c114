"""Configuration of every component, with the official sizes as defaults.

A checkpoint directory may hold a ``config.json`` that overrides sizes:
``{"split": bool, "codec": {...}, "ar": {...}, "resynthesizer": {...}, "quantizer": {...},
"serving": {...}}``. Each block takes the fields of the matching dataclass below; a missing block
means the official size (and, for ``serving``, the original's way of serving it). The field
names are those of the parity files in ``shared/reference``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hertz_agents.timing import LATENT_DIM, SAMPLE_RATE


def default_ff_dim(dim: int) -> int:
    """FFN width used when none is given: 8/3 of ``dim`` rounded up to 256 (4096 -> 11008)."""
    return 256 * ((int(2 * 4 * dim / 3) + 256 - 1) // 256)


@dataclass(frozen=True)
class CodecConfig:
    """hertz-codec: causal convolutional VAE, 16 kHz mono <-> one latent per 2000 samples."""

    sample_rate: int = SAMPLE_RATE
    latent_dim: int = LATENT_DIM
    encode_channels: int = 16
    decode_channel_multiplier: int = 4
    channel_ratios: tuple[int, ...] = (4, 8, 16, 16, 16, 16)
    strides: tuple[int, ...] = (2, 2, 4, 5, 5, 5)
    kernel_size: int = 7
    norm_stddev: float = 0.05

    @property
    def hop(self) -> int:
        """Samples per latent (the product of the strides)."""
        hop = 1
        for s in self.strides:
            hop *= s
        return hop


class _TransformerShape:
    """Derived sizes shared by both transformer configs (they have the same fields)."""

    dim: int
    heads: int
    kv_heads: int | None
    ff_dim: int | None

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def ffn_dim(self) -> int:
        return self.ff_dim or default_ff_dim(self.dim)


@dataclass(frozen=True)
class TransformerConfig(_TransformerShape):
    """A decoder-only transformer stack (the AR trunk)."""

    dim: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int | None = None
    ff_dim: int | None = None
    vocab_size: int = 32768
    latent_size: int = LATENT_DIM
    theta: float = 10_000
    eps: float = 1e-5
    # Positions the model was trained on: the rotary table's length and the engine's context.
    seq_len: int = 2048


@dataclass(frozen=True)
class ResynthesizerConfig(_TransformerShape):
    """The resynthesizer: a transformer turning the next token into a GMM over the next latent."""

    dim: int = 4096
    layers: int = 8
    heads: int = 16
    kv_heads: int | None = 16
    ff_dim: int | None = 11008
    gmm_components: int = 8
    # The original code always injects at layers // 2; the field is kept for the file format.
    plex_layer: int | None = None
    plex_roll: int = 1
    theta: float = 10_000
    eps: float = 1e-5
    seq_len: int = 8192
    latent_size: int = LATENT_DIM

    @property
    def injection_layer(self) -> int:
        """Layer at which the next token's code is added (``layers // 2``, as the original)."""
        return self.layers // 2


@dataclass(frozen=True)
class QuantizerConfig:
    """Latent quantizer: Linear(32 -> dim), gated FFN, FSQ with ``fsq_levels``."""

    dim: int = 2048
    ff_dim: int | None = 8192
    input_dim: int = LATENT_DIM
    fsq_levels: tuple[int, ...] = (8, 8, 8, 8, 8)

    @property
    def ffn_dim(self) -> int:
        """Feed-forward width: ``ff_dim`` if set, else the default for ``dim``."""
        return self.ff_dim or default_ff_dim(self.dim)

    @property
    def codebook_size(self) -> int:
        """Number of quantizer codes: the product of the FSQ levels."""
        size = 1
        for level in self.fsq_levels:
            size *= level
        return size


ROLLOVERS = ("refill", "ring")


@dataclass(frozen=True)
class ServingConfig:
    """How the engine serves the model when its caller does not say (a property of the model).

    ``rollover``: what happens when a call fills the context (``hertz_agents.engine.stepper``):
    ``"refill"`` (the original's: re-prefill the last 3/4 of the context) or ``"ring"`` (a ring
    KV cache, nothing recomputed). Each model's choice is measured for it (docs/engine.md):
    hertz-small says ``"ring"``, which equals the refill's quality at its context and costs
    nothing at a rollover.
    """

    rollover: str = "refill"

    def __post_init__(self) -> None:
        if self.rollover not in ROLLOVERS:
            raise ValueError(f"serving.rollover must be one of {ROLLOVERS}, not {self.rollover!r}")


@dataclass(frozen=True)
class HertzConfig:
    """The whole model: codec, quantizer, AR trunk and resynthesizer, and how it is served."""

    split: bool = True
    codec: CodecConfig = field(default_factory=CodecConfig)
    ar: TransformerConfig = field(default_factory=TransformerConfig)
    resynthesizer: ResynthesizerConfig = field(default_factory=ResynthesizerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    @property
    def channels(self) -> int:
        """Audio channels the AR models: 2 for the duplex ("split") model, else 1."""
        return 2 if self.split else 1

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a plain ``config.json``-style dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, split: bool | None = None) -> HertzConfig:
        """Build a config from a ``config.json``-style dict; missing blocks keep official sizes."""
        known = {"split", "codec", "ar", "resynthesizer", "quantizer", "serving"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"config.json has unknown blocks {sorted(unknown)}; known: {sorted(known)}"
            )
        blocks: dict[str, Any] = {}
        for name, klass in (
            ("codec", CodecConfig),
            ("ar", TransformerConfig),
            ("resynthesizer", ResynthesizerConfig),
            ("quantizer", QuantizerConfig),
            ("serving", ServingConfig),
        ):
            if name in data:
                blocks[name] = _block(klass, name, data[name])
        use_split = data.get("split", True) if split is None else split
        return cls(split=bool(use_split), **blocks)

    @classmethod
    def from_json(cls, path: str | Path, *, split: bool | None = None) -> HertzConfig:
        """Read a config from the ``config.json`` at ``path`` (see :meth:`from_dict`)."""
        with open(path) as f:
            return cls.from_dict(json.load(f), split=split)


def usable_context(config: HertzConfig) -> int:
    """Return the positions the model was trained on: the engine's default context.

    The shorter of the two transformers' ``seq_len`` (their rotary tables' length; a longer
    context extends them, out of the model's training). The one definition of the context.
    """
    return min(config.ar.seq_len, config.resynthesizer.seq_len)


def _block(klass: type, name: str, values: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(klass)}
    unknown = set(values) - fields
    if unknown:
        raise ValueError(
            f"config.json block {name!r} has unknown fields {sorted(unknown)}; "
            f"known: {sorted(fields)}"
        )
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return klass(**clean)
