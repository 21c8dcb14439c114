"""Training recipes as TOML files, read into dataclasses.

A recipe has one table per dataclass below. Unknown tables or keys are errors that name the
known ones, so a typo never silently falls back to a default. Architecture tables take the
fields of :mod:`hertz_agents.config` (``[codec]``, ``[ar]``, ``[resynthesizer]``, ``[quantizer]``).

    cfg = load_codec_config("hertz_agents/train/configs/small_codec.toml", ["optim.steps=10"])

Overrides are ``table.key=value`` with a TOML value (``optim.lr=3e-4``, ``run.device="cuda"``,
``model.freeze=["codec","quantizer"]``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hertz_agents.config import CodecConfig, QuantizerConfig, ResynthesizerConfig, TransformerConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the backport (pip install tomli)
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped recipes (``small_codec.toml``, ``small_ar.toml``, ``finetune_ar.toml``...)."""


@dataclass
class RunConfig:
    """Where a run writes, and what it runs on."""

    out_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    threads: int = 0  # torch.set_num_threads per process; 0 leaves torch's default
    strategy: str = "ddp"  # multi-process: "ddp" (replicas) or "fsdp" (sharded, for the full-size AR)
    wandb: bool = False  # also log to Weights & Biases when the package is installed
    wandb_project: str = "hertz-agents"
    run_name: str = ""
    time_limit_minutes: float = 0.0  # stop (checkpoint and export) after this long; 0: no limit
    stop_at_step: int = 0  # stop (checkpoint and export) after this step, schedule unchanged; 0: no


@dataclass
class DataConfig:
    """Folders of recordings and how they are cut (see :class:`AudioSegmentDataset`)."""

    train: str = "data/synth/train"
    val: str = "data/synth/val"
    channels: int = 2  # 2: stereo, one speaker per channel; 1: mix down to mono
    segment_seconds: float = 1.0
    workers: int = 0  # DataLoader worker processes
    val_items: int = 64  # segments scored at each validation (spread evenly over the val set)
    rescan: bool = False  # rebuild the training set each epoch (a corpus still being written)
    max_items: int = 0  # AR phase with cached latents: encode at most this many segments (0: all)
    latent_cache: str = ""  # AR phase: folder of the cached latents ("": <out_dir>/latents)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (or constant)."""

    steps: int = 1000
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" or "constant"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class LogConfig:
    """How often to log, validate and checkpoint (in optimizer steps)."""

    every: int = 10
    val_every: int = 200
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    plot: bool = True  # write curves.png in the run folder at each validation
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class CodecLossConfig:
    """Weights of the codec's losses; the adversarial ones start at ``adversarial_start``."""

    stft: float = 1.0  # multi-resolution spectral convergence + log magnitude
    mel: float = 1.0  # multi-resolution log-mel L1
    waveform: float = 0.1  # L1 on samples
    kl: float = 1e-4  # KL(posterior || N(0, 1)) per latent dimension and frame
    adversarial: float = 1.0
    feature: float = 2.0  # discriminator feature matching
    adversarial_start: int = 1000
    fft_sizes: tuple[int, ...] = (2048, 1024, 512, 256, 128)
    sample_latents: bool = True  # decode a posterior sample (VAE); False decodes the mean


@dataclass
class DiscriminatorConfig:
    """Multi-period waveform and multi-resolution STFT discriminators."""

    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    period_channels: int = 16
    stft_ffts: tuple[int, ...] = (1024, 512, 256)
    stft_channels: int = 16
    lr: float = 0.0  # 0: the generator's lr
    loss: str = "hinge"  # "hinge" or "lsgan"


@dataclass
class CodecTrainConfig:
    """``hertz-agents train codec``."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    loss: CodecLossConfig = field(default_factory=CodecLossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    init_from: str = ""  # a codec or model directory to start from ("" = from scratch)


@dataclass
class ARModelConfig:
    """Where the AR phase's weights come from and what it trains."""

    codec_from: str = ""  # a codec run's final dir, or any model dir / variant name
    init_from: str = ""  # a full model to start from (its sizes win over the tables below)
    split: bool = True  # two-channel (duplex) model; False: one channel, stereo mixed down
    freeze: tuple[str, ...] = ("codec",)  # any of "codec", "quantizer", "ar", "resynthesizer"
    latents: str = "mean"  # encode to the posterior "mean" or a posterior "sample"
    cache_latents: bool = True  # encode the corpus once (needs latents = "mean" or caches mu/logvar)


@dataclass
class ARLossConfig:
    """Weights of the AR phase's losses."""

    ce: float = 1.0  # next-token cross-entropy of the trunk, per channel
    nll: float = 1.0  # resynthesizer GMM negative log-likelihood, per latent dimension


@dataclass
class ARTrainConfig:
    """``hertz-agents train ar``."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(segment_seconds=16.0))
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    model: ARModelConfig = field(default_factory=ARModelConfig)
    ar: TransformerConfig = field(default_factory=TransformerConfig)
    resynthesizer: ResynthesizerConfig = field(default_factory=ResynthesizerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: ARLossConfig = field(default_factory=ARLossConfig)


T = TypeVar("T")


def from_dict(klass: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``klass`` from nested dicts, refusing unknown keys, lists -> tuples."""
    fields = {f.name: f for f in dataclasses.fields(klass)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{where or klass.__name__}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    values: dict[str, Any] = {}
    defaults = klass()
    for name, value in data.items():
        current = getattr(defaults, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            values[name] = from_dict(type(current), value, f"[{name}]")
        elif isinstance(value, list):
            values[name] = tuple(value)
        else:
            values[name] = value
    return klass(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain dicts and lists (for JSON logs and checkpoints)."""
    return dataclasses.asdict(cfg)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.steps=10", "run.device=\\"cpu\\""]`` -> nested dict. Bare words are strings."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string such as run.device=cpu
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_toml(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if path is not None:
        with open(resolve_config_path(path), "rb") as f:
            data = tomllib.load(f)
    return merge(data, parse_overrides(overrides))


def resolve_config_path(path: str | Path) -> Path:
    """A path, or the name of a shipped recipe (``small_codec`` -> configs/small_codec.toml)."""
    p = Path(path)
    if p.exists():
        return p
    shipped = CONFIG_DIR / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
    if shipped.exists():
        return shipped
    raise FileNotFoundError(f"no config {path!r} (shipped ones: {sorted(q.stem for q in CONFIG_DIR.glob('*.toml'))})")


def load_codec_config(path: str | Path | None, overrides: Sequence[str] = ()) -> CodecTrainConfig:
    return from_dict(CodecTrainConfig, read_toml(path, overrides))


def load_ar_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ARTrainConfig:
    return from_dict(ARTrainConfig, read_toml(path, overrides))
