"""Recipe checks that run before any work: ranges, choices, paths and devices.

Types and unknown keys are checked while the TOML is read (:func:`config.from_dict`); what is
left needs the values together or the machine: a step count of 0, a ``device = "cuda"`` on a
machine without CUDA, a data folder that is not there, a model that was never downloaded. Each
problem is one :class:`RecipeError` line that names the key and says what to do, raised before
the model loads or the corpus is scanned.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP
from hertz_agents.train.config import ARTrainConfig, CodecTrainConfig, DataConfig, RecipeError

FREEZABLE = ("codec", "quantizer", "ar", "resynthesizer")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise RecipeError(f"{key} must be one of {list(options)}, got {value!r}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise RecipeError(f"{key} must be at least {low:g}, got {value!r}")


def _between(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise RecipeError(f"{key} must be between {low:g} and {high:g}, got {value!r}")


def check_device(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where there is CUDA."""
    if not _DEVICE.match(device):
        raise RecipeError(f'run.device must be "auto", "cpu", "cuda" or "cuda:N", got {device!r}')
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError(
                f'run.device = "{device}" but this machine has no CUDA GPU: use "cpu" or "auto"'
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise RecipeError(
                f"run.device = {device!r} but this machine has {count} CUDA device(s)"
            )


def check_common(cfg: CodecTrainConfig | ARTrainConfig) -> None:
    """What both phases share: ``[run]``, ``[data]``, ``[optim]``, ``[log]``."""
    run, data, opt, lg = cfg.run, cfg.data, cfg.optim, cfg.log
    check_device(run.device)
    _choice("run.precision", run.precision, ("auto", "fp32", "bf16"))
    _choice("run.strategy", run.strategy, ("ddp", "fsdp"))
    _choice("run.on_nonfinite", run.on_nonfinite, ("stop", "skip"))
    if not run.out_dir:
        raise RecipeError('run.out_dir is empty: name the run folder, e.g. run.out_dir="runs/x"')
    for key, value in (("run.threads", run.threads), ("run.stop_at_step", run.stop_at_step)):
        _at_least(key, value, 0)
    _at_least("run.time_limit_minutes", run.time_limit_minutes, 0)
    _at_least("run.max_skipped_steps", run.max_skipped_steps, 1)
    for key, value in (("optim.steps", opt.steps), ("optim.batch_size", opt.batch_size)):
        _at_least(key, value, 1)
    _at_least("optim.grad_accum", opt.grad_accum, 1)
    if not opt.lr > 0:
        raise RecipeError(f"optim.lr must be above 0, got {opt.lr!r}")
    for i, beta in enumerate(opt.betas):
        if not 0 <= beta < 1:
            raise RecipeError(f"optim.betas[{i}] must be in [0, 1), got {beta!r}")
    _at_least("optim.weight_decay", opt.weight_decay, 0)
    _at_least("optim.warmup_steps", opt.warmup_steps, 0)
    _choice("optim.schedule", opt.schedule, ("cosine", "constant"))
    _between("optim.min_lr_ratio", opt.min_lr_ratio, 0, 1)
    _at_least("optim.grad_clip", opt.grad_clip, 0)
    _choice("optim.optimizer", opt.optimizer, ("adamw", "adamw_fused", "adamw_8bit"))
    if opt.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(
            'optim.optimizer = "adamw_8bit" needs bitsandbytes (pip install bitsandbytes)'
        )
    for key in ("every", "val_every", "ckpt_every", "keep_checkpoints"):
        _at_least(f"log.{key}", getattr(lg, key), 1)
    _at_least("log.early_stop_patience", lg.early_stop_patience, 0)
    if lg.early_stop_patience and lg.best_metric == "none":
        raise RecipeError('log.early_stop_patience needs a log.best_metric (not "none")')
    check_data(data)


def check_data(data: DataConfig) -> None:
    _choice("data.channels", str(data.channels), ("1", "2"))
    step = SAMPLES_PER_STEP / SAMPLE_RATE
    if data.segment_seconds < step:
        raise RecipeError(f"data.segment_seconds must be at least one model step ({step} s)")
    for key in ("workers", "val_items", "max_items"):
        _at_least(f"data.{key}", getattr(data, key), 0)
    check_folder("data.train", data.train)
    if data.val:
        check_folder("data.val", data.val)


def check_folder(key: str, path: str) -> None:
    if not path:
        raise RecipeError(f"{key} is empty: give the folder of recordings")
    if not Path(path).expanduser().exists():
        raise RecipeError(f"{key}: no such folder {path!r}")


def check_model_source(key: str, source: str) -> None:
    """A model directory, a codec directory or a model name whose files are there."""
    from hertz_agents.checkpoint import resolve_model_dir
    from hertz_agents.errors import ModelNotFound

    try:
        directory, variant = resolve_model_dir(source)
    except ModelNotFound:
        raise RecipeError(
            f"{key}: no model {source!r}; give a model directory or a model name"
        ) from None
    if not directory.is_dir():
        hint = f"hertz-agents download --variant {variant.name}" if variant else "train it first"
        raise RecipeError(f"{key} = {source!r} is not in {directory}: {hint}")


def check_codec_recipe(cfg: CodecTrainConfig) -> None:
    """Everything :func:`train_codec` needs, or a :class:`RecipeError`."""
    check_common(cfg)
    if cfg.run.strategy == "fsdp":
        raise RecipeError('run.strategy = "fsdp" is for the AR phase; the codec trains with "ddp"')
    if cfg.init_from:
        check_model_source("init_from", cfg.init_from)
    _choice("discriminator.loss", cfg.discriminator.loss, ("hinge", "lsgan"))
    _at_least("loss.adversarial_start", cfg.loss.adversarial_start, 0)
    for key in ("stft", "mel", "waveform", "kl", "adversarial", "feature"):
        _at_least(f"loss.{key}", getattr(cfg.loss, key), 0)


def check_ar_recipe(cfg: ARTrainConfig) -> None:
    """Everything :func:`train_ar` needs, or a :class:`RecipeError`."""
    check_common(cfg)
    m, lora = cfg.model, cfg.lora
    unknown = [p for p in m.freeze if p not in FREEZABLE]
    if unknown:
        raise RecipeError(f"model.freeze has unknown parts {unknown}; known: {list(FREEZABLE)}")
    _choice("model.latents", m.latents, ("mean", "sample"))
    if not m.init_from and not m.codec_from:
        raise RecipeError(
            "give model.init_from (a model to start from) or model.codec_from (a codec)"
        )
    if m.init_from:
        check_model_source("model.init_from", m.init_from)
    if m.codec_from:
        check_model_source("model.codec_from", m.codec_from)
    if not m.init_from and cfg.ar.vocab_size != cfg.quantizer.codebook_size:
        raise RecipeError(
            f"ar.vocab_size {cfg.ar.vocab_size} != the quantizer's codebook "
            f"{cfg.quantizer.codebook_size} (the product of quantizer.fsq_levels)"
        )
    for key in ("ce", "nll"):
        _at_least(f"loss.{key}", getattr(cfg.loss, key), 0)
    _at_least("lora.rank", lora.rank, 0)
    _at_least("lora.alpha", lora.alpha, 0)
    _between("lora.dropout", lora.dropout, 0, 0.99)
    _choice("lora.base_dtype", lora.base_dtype, ("bf16", "int8", "fp32"))
    bad_parts = [p for p in lora.parts if p not in ("ar", "resynthesizer")]
    if bad_parts:
        raise RecipeError(
            f"lora.parts has unknown parts {bad_parts}; known: ['ar', 'resynthesizer']"
        )
    if lora.rank and not lora.targets:
        raise RecipeError('lora.targets is empty: name the projections to adapt, e.g. ["proj_qkv"]')
    if lora.rank and lora.base_dtype != "fp32" and cfg.run.precision == "fp32":
        raise RecipeError(
            f'lora.base_dtype = "{lora.base_dtype}" runs under bf16 autocast: '
            'set run.precision "auto" or "bf16"'
        )
    if lora.rank and cfg.run.strategy == "fsdp":
        raise RecipeError('LoRA trains on one GPU or with run.strategy = "ddp", not "fsdp"')


__all__ = ["check_ar_recipe", "check_codec_recipe", "check_device"]
