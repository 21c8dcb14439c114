"""Training recipes as TOML files, read into dataclasses.

A recipe has one table per dataclass below. Unknown tables or keys are errors that name the
known ones, so a typo never silently falls back to a default. Architecture tables take the
fields of :mod:`hertz_agents.config` (``[codec]``, ``[ar]``, ``[resynthesizer]``, ``[quantizer]``,
``[serving]``).

    cfg = load_codec_config("hertz_agents/train/configs/small_codec.toml", ["optim.steps=10"])

Overrides are ``table.key=value`` with a TOML value (``optim.lr=3e-4``, ``run.device="cuda"``,
``model.freeze=["codec","quantizer"]``).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hertz_agents.config import (
    CodecConfig,
    QuantizerConfig,
    ResynthesizerConfig,
    ServingConfig,
    TransformerConfig,
)

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
    strategy: str = (
        "ddp"  # multi-process: "ddp" (replicas) or "fsdp" (sharded, for the full-size AR)
    )
    wandb: bool = False  # also log to Weights & Biases when the package is installed
    wandb_project: str = "hertz-agents"
    run_name: str = ""
    time_limit_minutes: float = 0.0  # stop (checkpoint and export) after this long; 0: no limit
    stop_at_step: int = 0  # stop (checkpoint and export) after this step, schedule unchanged; 0: no
    # A step whose loss or gradient is NaN/inf is never applied. "stop": end the run there
    # (exit 1, nothing saved, good checkpoints kept); "skip": drop the step and go on, stopping
    # after `max_skipped_steps` such steps in a row.
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10


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
    optimizer: str = "adamw"  # "adamw", "adamw_fused" (CUDA), "adamw_8bit" (needs bitsandbytes)


@dataclass
class LogConfig:
    """How often to log, validate and checkpoint (in optimizer steps)."""

    every: int = 10
    val_every: int = 200
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    plot: bool = True  # write curves.png in the run folder at each validation
    progress: bool = True  # tqdm bar on rank 0; without it, one console line per log step
    val_at_start: bool = True  # validate before the first step (the baseline of the curves)
    best_metric: str = "auto"  # validation metric (lower is better) whose best step is kept in
    # <out_dir>/best; "auto": ce (AR) or mel_distance (codec); "none": keep no best
    early_stop_patience: int = 0  # stop after this many validations without a new best; 0: never
    samples: bool = True  # write audio samples to <out_dir>/samples/step_N/ at each validation


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
    cache_latents: bool = (
        True  # encode the corpus once (needs latents = "mean" or caches mu/logvar)
    )
    checkpointing: bool = False  # recompute each transformer block in the backward (less memory)


@dataclass
class LoRAConfig:
    """Low-rank adapters on the trunk's and resynthesizer's projections (rank 0: off).

    With ``rank`` > 0 the base model is frozen (``model.freeze`` is ignored), held in
    ``base_dtype``, and only the adapters train, save and export (see :mod:`hertz_agents.lora`).
    """

    rank: int = 0
    alpha: float = 0.0  # scale = alpha / rank; 0: alpha = rank (scale 1)
    dropout: float = 0.0
    targets: tuple[str, ...] = ("proj_qkv", "attn_out", "gateup_proj", "down_proj")
    parts: tuple[str, ...] = ("ar", "resynthesizer")  # where the targets are looked for
    base_dtype: str = "bf16"  # the frozen base's weights: "bf16", "int8" (linear layers) or "fp32"


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
    serving: ServingConfig = field(default_factory=ServingConfig)
    loss: ARLossConfig = field(default_factory=ARLossConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


T = TypeVar("T")


class RecipeError(ValueError):
    """A recipe that cannot run: the message is one line that names the key and what to do."""


def from_dict(klass: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``klass`` from nested dicts, checking every key and every value's type.

    Unknown keys, a string where a list belongs, ``10.5`` where an integer belongs: each is a
    :class:`RecipeError` naming the key. Integers are accepted for floats; lists become tuples.
    """
    fields = {f.name: f for f in dataclasses.fields(klass)}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        name = where or klass.__name__
        raise RecipeError(f"{name}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(klass)
    values: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise RecipeError(f"{key} is a table ([{name}]), not {value!r}")
            values[name] = from_dict(hint, value, name)  # type: ignore[arg-type]
        else:
            values[name] = coerce(value, hint, key)
    try:
        return klass(**values)
    except (TypeError, ValueError) as e:  # a config's own __post_init__ check
        raise RecipeError(f"{where or klass.__name__}: {e}") from e


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint``, or a :class:`RecipeError`.

    ``hint`` is int, float, bool, str, X | None or tuple[X, ...]; the error says what ``key``
    wants.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in args if a is not type(None)]
        return coerce(value, options[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key} must be a list such as [1, 2], got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{key} must be a list of {len(args)} values, got {list(value)!r}")
        return tuple(
            coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key} must be a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f'{key} must be a string such as "x", got {value!r}')
        return value
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain dicts and lists (for JSON logs and checkpoints)."""
    return dataclasses.asdict(cfg)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    r"""``["optim.steps=10", "run.device=\"cpu\""]`` -> nested dict. Bare words are strings."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise RecipeError(f"--set {item!r} is not key=value (e.g. --set optim.steps=100)")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string such as run.device=cpu
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {part} is a value, not a table")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into a copy of ``base``, recursively for tables; ``extra`` wins."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_toml(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe (a file or a shipped name; None: empty) with ``--set`` overrides on top."""
    data: dict[str, Any] = {}
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            with open(resolved, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{resolved} is not valid TOML: {e}") from e
        except OSError as e:
            raise RecipeError(f"cannot read recipe {resolved}: {e.strerror}") from e
    return merge(data, parse_overrides(overrides))


def resolve_config_path(path: str | Path) -> Path:
    """A path, or the name of a shipped recipe (``small_codec`` -> configs/small_codec.toml)."""
    p = Path(path)
    if p.exists():
        return p
    shipped = CONFIG_DIR / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
    if shipped.exists():
        return shipped
    shipped_names = sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))
    raise RecipeError(f"no recipe {str(path)!r}: give a TOML file or one of {shipped_names}")


def load_codec_config(path: str | Path | None, overrides: Sequence[str] = ()) -> CodecTrainConfig:
    """Load and check a codec recipe with its ``--set`` overrides."""
    return from_dict(CodecTrainConfig, read_toml(path, overrides))


def load_ar_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ARTrainConfig:
    """Load and check an AR recipe with its ``--set`` overrides."""
    return from_dict(ARTrainConfig, read_toml(path, overrides))
