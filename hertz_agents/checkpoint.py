"""Finding, loading and converting checkpoints.

A model is named by a variant (``hertz-dev``, ``hertz-dev-mono``, ``hertz-dev-mono-audio``),
by ``default`` (the project's small CPU model, installed with the ``hertz-agents-small``
distribution), or by a directory (where each name points: :mod:`hertz_agents.locations`).
A directory holds either

* the official files under their official names (``inference_*.pt``), with an optional
  ``config.json`` that overrides sizes (see :mod:`hertz_agents.config`), or
* this project's own layout, written by ``hertz-agents convert`` or by training:
  ``model.safetensors`` (plain weights, weight norm folded) and ``config.json`` with
  ``"format": "hertz-agents"``. It is memory-mapped, so loading is fast.

A directory that holds only the official codec file (``inference_apatosaurus_95000.pt``, with an
optional ``config.json``) serves the codec alone: :func:`load_codec`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from hertz_agents.codec.model import WaveCodec
from hertz_agents.config import CodecConfig, HertzConfig
from hertz_agents.errors import CheckpointError, HertzError, ModelNotFound
from hertz_agents.locations import (
    DEFAULT_DIR_NAME,
    DEFAULT_MODEL,
    ckpt_root,
    locate,
    missing_hint,
)
from hertz_agents.model.hertz import HertzModel
from hertz_agents.registry import CODEC_FILE, CODEC_ONLY, VARIANTS, Variant
from hertz_agents.weights import check_and_load, official_codec_state

log = logging.getLogger(__name__)

OWN_FORMAT = "hertz-agents"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CODEC_STATE_PREFIX = "codec."

__all__ = [
    "DEFAULT_DIR_NAME",
    "DEFAULT_MODEL",
    "ckpt_root",
    "is_codec_only",
    "load_codec",
    "load_model",
    "resolve_device",
    "resolve_model_dir",
    "save_model",
]


def resolve_model_dir(model: str | os.PathLike[str]) -> tuple[Path, Variant | None]:
    """A model name or path -> (directory, the official variant it names or None)."""
    location = locate(model)
    return location.directory, location.variant


def resolve_device(device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Pick the device (CUDA when available) and dtype (bfloat16 on CUDA, float32 on CPU).

    Raises:
        HertzError: An unknown device name, or CUDA asked for where there is none.
    """
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise HertzError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        _check_cuda(dev)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, dtype


def _check_cuda(dev: torch.device) -> None:
    if torch.version.cuda is None:
        raise HertzError(
            f"device {str(dev)!r}: this torch ({torch.__version__}) is a CPU-only build; "
            "use --device cpu, or install the CUDA build of torch (scripts/setup --cuda)"
        )
    if not torch.cuda.is_available():
        raise HertzError(
            f"device {str(dev)!r}: no CUDA GPU is visible (check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES); use --device cpu"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise HertzError(
            f"device {str(dev)!r}: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )


def read_config(directory: Path, split: bool | None = None) -> tuple[HertzConfig, dict[str, Any]]:
    path = directory / CONFIG_FILE
    if not path.exists():
        return HertzConfig(split=True if split is None else split), {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or delete it") from e
    meta = {k: raw.pop(k) for k in ("format", "notes", "training") if k in raw}
    try:
        return HertzConfig.from_dict(raw, split=split), meta
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


# -- official files ---------------------------------------------------------------------------


def official_files(directory: Path, variant: Variant | None) -> dict[str, Path]:
    """Role -> path of the official files present in ``directory``."""
    candidates = [variant] if variant else list(VARIANTS.values())
    for v in candidates:
        paths = {f.role: directory / f.name for f in v.files}
        if all(p.exists() for p in paths.values()):
            return paths
    if variant is None and not any(directory.glob("inference_*.pt")):
        raise ModelNotFound(
            f"{directory} holds no model: a checkpoint directory has {WEIGHTS_FILE} + "
            f"{CONFIG_FILE} (`hertz-agents convert`), or the official inference_*.pt files "
            "(`hertz-agents download`)"
        )
    wanted = variant or VARIANTS["hertz-dev"]
    missing = [f.name for f in wanted.files if not (directory / f.name).exists()]
    name = wanted.name
    raise ModelNotFound(
        f"{directory} does not hold a complete model (missing: {', '.join(missing)}). "
        f"Download it with `hertz-agents download --variant {name} --dir {directory}`, "
        f"or convert one with `hertz-agents convert`."
    )


def _load_pt(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"{path} could not be read ({type(e).__name__}: {e}). It is truncated or corrupt: "
            "delete it and download it again with `hertz-agents download`."
        ) from e
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state_dict of tensors; is it the right file?")
    return dict(state)


def load_official_states(
    model: HertzModel, states: Mapping[str, Mapping[str, Tensor]], names: Mapping[str, str]
) -> None:
    """Load official state dicts (role -> state) into ``model``, checking every key and shape."""
    assign = next(model.parameters()).is_meta
    check_and_load(
        model.codec, official_codec_state(dict(states["codec"])), names["codec"], assign=assign
    )
    quantizer = model.resynthesizer.quantizer
    check_and_load(quantizer, dict(states["quantizer"]), names["quantizer"], assign=assign)
    resynth = dict(states["resynthesizer"])
    resynth.update({f"quantizer.{k}": v for k, v in quantizer.state_dict().items()})
    check_and_load(model.resynthesizer, resynth, names["resynthesizer"], assign=assign)
    check_and_load(model.ar, dict(states["ar"]), names["ar"], assign=assign)


# -- loading ----------------------------------------------------------------------------------


def load_model(
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    adapter: str | os.PathLike[str] | None = None,
) -> HertzModel:
    """Load a model by name or directory, ready for inference (eval mode, no grad).

    ``adapter``: a LoRA adapter folder (a LoRA run's ``final/``), merged into the weights.
    """
    location = locate(model)
    directory, variant = location.directory, location.variant
    if not location.present:
        raise ModelNotFound(f"model {str(model)!r} is not in {directory}: {missing_hint(location)}")
    dev, dt = resolve_device(device, dtype)
    if variant is CODEC_ONLY or is_codec_only(directory):
        raise CheckpointError(
            f"{directory} holds only the codec ({CODEC_FILE}): it encodes and decodes "
            "(`hertz-agents encode`/`decode`, `load_codec()`) but cannot generate; "
            "give a full model"
        )
    own = directory / WEIGHTS_FILE
    if own.exists():
        net = _load_own(directory)
    else:
        net = _load_official(directory, variant)
    net = net.to(device=dev, dtype=dt)
    # -- LoRA (issue 16): fold the adapter into the weights; see hertz_agents/lora.py --
    if adapter is not None:
        from hertz_agents.lora import merge_adapter

        merge_adapter(net, adapter)
    return net.eval().requires_grad_(False)


def _load_own(directory: Path) -> HertzModel:
    config, meta = read_config(directory)
    _check_own_format(directory, meta)
    try:
        state = load_file(str(directory / WEIGHTS_FILE))  # memory-mapped
    except Exception as e:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} could not be read ({e}); it is truncated or corrupt: "
            "convert or copy it again"
        ) from e
    with torch.device("meta"):
        net = HertzModel(config)
    check_and_load(net, state, str(directory / WEIGHTS_FILE), assign=True)
    return net


def _check_own_format(directory: Path, meta: Mapping[str, Any]) -> None:
    if meta.get("format") != OWN_FORMAT:
        raise CheckpointError(
            f'{directory / CONFIG_FILE} must say "format": "{OWN_FORMAT}" next to {WEIGHTS_FILE}'
        )


def _load_official(directory: Path, variant: Variant | None) -> HertzModel:
    config, _ = read_config(directory, split=variant.split if variant else None)
    paths = official_files(directory, variant)
    if variant is None and not (directory / CONFIG_FILE).exists():
        config = HertzConfig(split=paths["ar"].name == VARIANTS["hertz-dev"].file("ar").name)
    log.info("loading official checkpoint files from %s", directory)
    states = {role: _load_pt(path) for role, path in paths.items()}
    with torch.device("meta"):
        net = HertzModel(config)
    load_official_states(net, states, {role: str(p) for role, p in paths.items()})
    return net


# -- the codec alone ---------------------------------------------------------------------------


def is_codec_only(directory: Path) -> bool:
    """Whether ``directory`` holds the official codec file and no other model file.

    A directory with some of a variant's other files is an incomplete model, not a codec-only one:
    loading it says which files are missing.
    """
    if not (directory / CODEC_FILE).is_file() or (directory / WEIGHTS_FILE).exists():
        return False
    others = {f.name for v in VARIANTS.values() for f in v.files} - {CODEC_FILE}
    return not any((directory / name).exists() for name in others)


def load_codec(
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> WaveCodec:
    """Load only a model's codec (audio <-> latents), ready for inference.

    Works on every model (the codec part of a full one) and on a directory that holds only the
    official codec file ``inference_apatosaurus_95000.pt``, with an optional ``config.json`` whose
    ``"codec"`` block gives other sizes (``hertz-agents download --variant codec`` fetches it).

    Args:
        model: ``"default"``, a variant name, ``"codec"``, or a checkpoint directory.
        device: Where to put it (default: CUDA when available).
        dtype: Default: bfloat16 on CUDA, float32 on the CPU.

    Returns:
        The codec in eval mode without gradients: ``encode(audio [B, 1, N])`` gives latents
        ``[B, N / 2000, 32]`` (the posterior mean), ``decode`` the reverse.

    Raises:
        ModelNotFound: No such model, or the directory holds no codec.
        CheckpointError: A corrupt file, or weights that do not match the configuration.
    """
    location = locate(model)
    directory = location.directory
    if not location.present:
        raise ModelNotFound(f"model {str(model)!r} is not in {directory}: {missing_hint(location)}")
    dev, dt = resolve_device(device, dtype)
    codec_config = _codec_config(directory)
    own = directory / WEIGHTS_FILE
    if own.exists():
        _check_own_format(directory, read_config(directory)[1])
        state, what = _own_codec_state(own), str(own)
    elif (directory / CODEC_FILE).is_file():
        path = directory / CODEC_FILE
        state, what = official_codec_state(_load_pt(path)), str(path)
    else:
        raise ModelNotFound(
            f"{directory} holds no codec: it needs {CODEC_FILE} "
            f"(`hertz-agents download --variant codec --dir {directory}`) "
            f"or {WEIGHTS_FILE} + {CONFIG_FILE}"
        )
    with torch.device("meta"):
        codec = WaveCodec(codec_config)
    check_and_load(codec, state, what, assign=True)
    return codec.to(device=dev, dtype=dt).eval().requires_grad_(False)


def _codec_config(directory: Path) -> CodecConfig:
    """The codec sizes of a directory.

    From its config.json's ``"codec"`` block, or a config.json that is a bare codec block (as a
    codec-only directory may hold), or the official sizes.
    """
    path = directory / CONFIG_FILE
    if path.exists():
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); fix or delete it") from e
        codec_fields = {f.name for f in dataclasses.fields(CodecConfig)}
        if isinstance(raw, dict) and raw and set(raw) <= codec_fields:
            try:
                return HertzConfig.from_dict({"codec": raw}).codec
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: {e}") from e
    return read_config(directory)[0].codec


def _own_codec_state(path: Path) -> dict[str, Tensor]:
    """The ``codec.*`` tensors of an own-layout file, read without touching the rest."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                key[len(CODEC_STATE_PREFIX) :]: f.get_tensor(key)
                for key in f.keys()  # noqa: SIM118 - safe_open is not a dict
                if key.startswith(CODEC_STATE_PREFIX)
            }
    except Exception as e:  # safetensors raises its own types for truncated files
        raise CheckpointError(
            f"{path} could not be read ({e}); it is truncated or corrupt: convert or copy it again"
        ) from e


def save_model(
    net: HertzModel, directory: str | os.PathLike[str], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``net`` in this project's layout (``model.safetensors`` + ``config.json``)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    config = {"format": OWN_FORMAT, **net.config.to_dict(), **(dict(extra) if extra else {})}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return out


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
