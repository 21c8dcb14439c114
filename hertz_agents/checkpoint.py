"""Finding, loading and converting checkpoints.

A model is named by a variant (``hertz-dev``, ``hertz-dev-mono``, ``hertz-dev-mono-audio``),
by ``default`` (the project's small CPU model shipped in ``ckpt/hertz-small``), or by a
directory. A directory holds either

* the official files under their official names (``inference_*.pt``), with an optional
  ``config.json`` that overrides sizes (see :mod:`hertz_agents.config`), or
* this project's own layout, written by ``hertz-agents convert`` or by training:
  ``model.safetensors`` (plain weights, weight norm folded) and ``config.json`` with
  ``"format": "hertz-agents"``. It is memory-mapped, so loading is fast.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from hertz_agents.config import HertzConfig
from hertz_agents.errors import CheckpointError, ModelNotFound
from hertz_agents.model.hertz import HertzModel
from hertz_agents.registry import VARIANTS, Variant
from hertz_agents.weights import check_and_load, official_codec_state

log = logging.getLogger(__name__)

OWN_FORMAT = "hertz-agents"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_MODEL = "default"
DEFAULT_DIR_NAME = "hertz-small"


def ckpt_root() -> Path:
    """Where named models live: ``$HERTZ_AGENTS_CKPT`` or the repository's ``ckpt/``."""
    env = os.environ.get("HERTZ_AGENTS_CKPT")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "ckpt"


def resolve_model_dir(model: str | os.PathLike[str]) -> tuple[Path, Variant | None]:
    """A model name or path -> (directory, the official variant it names or None)."""
    name = str(model)
    if name == DEFAULT_MODEL:
        return ckpt_root() / DEFAULT_DIR_NAME, None
    if name in VARIANTS:
        return ckpt_root() / name, VARIANTS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return path, None
    known = ", ".join([DEFAULT_MODEL, *VARIANTS])
    raise ModelNotFound(f"no model {name!r}: give a checkpoint directory or one of: {known}")


def resolve_device(device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Pick the device (CUDA when available) and dtype (bfloat16 on CUDA, float32 on CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, dtype


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
            f"{path} could not be read ({type(e).__name__}: {e}). It is truncated or corrupt: delete it "
            f"and download it again with `hertz-agents download`."
        ) from e
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state_dict of tensors; is it the right file?")
    return dict(state)


def load_official_states(
    model: HertzModel, states: Mapping[str, Mapping[str, Tensor]], names: Mapping[str, str]
) -> None:
    """Load official state dicts (role -> state) into ``model``, checking every key and shape."""
    assign = next(model.parameters()).is_meta
    check_and_load(model.codec, official_codec_state(dict(states["codec"])), names["codec"], assign=assign)
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
) -> HertzModel:
    """Load a model by name or directory, ready for inference (eval mode, no grad)."""
    directory, variant = resolve_model_dir(model)
    if not directory.is_dir():
        hint = (
            f"download it with `hertz-agents download --variant {variant.name}`"
            if variant
            else "train it with `hertz-agents train small` (see docs/training.md)"
        )
        raise ModelNotFound(f"model {str(model)!r} is not in {directory}: {hint}")
    dev, dt = resolve_device(device, dtype)
    own = directory / WEIGHTS_FILE
    if own.exists():
        net = _load_own(directory)
    else:
        net = _load_official(directory, variant)
    return net.to(device=dev, dtype=dt).eval().requires_grad_(False)


def _load_own(directory: Path) -> HertzModel:
    config, meta = read_config(directory)
    if meta.get("format") != OWN_FORMAT:
        raise CheckpointError(f"{directory / CONFIG_FILE} must say \"format\": \"{OWN_FORMAT}\" next to {WEIGHTS_FILE}")
    try:
        state = load_file(str(directory / WEIGHTS_FILE))  # memory-mapped
    except Exception as e:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} could not be read ({e}); it is truncated or corrupt: convert or copy it again"
        ) from e
    with torch.device("meta"):
        net = HertzModel(config)
    check_and_load(net, state, str(directory / WEIGHTS_FILE), assign=True)
    return net


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


def save_model(net: HertzModel, directory: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> Path:
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
