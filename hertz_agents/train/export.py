"""Reading and writing what the training phases produce.

The codec phase writes a codec directory: ``codec.safetensors`` and a ``config.json`` with
``"format": "hertz-agents-codec"`` and the ``codec`` block. The AR phase writes a full model
directory with :func:`hertz_agents.checkpoint.save_model`, which ``load_model`` reads.
Anywhere a codec is asked for, a codec directory, a full model directory or a variant name
will do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hertz_agents.checkpoint import load_model
from hertz_agents.codec.model import WaveCodec
from hertz_agents.config import CodecConfig, HertzConfig
from hertz_agents.weights import check_and_load

CODEC_FORMAT = "hertz-agents-codec"
CODEC_WEIGHTS = "codec.safetensors"


def save_codec(
    codec: WaveCodec, directory: str | os.PathLike[str], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write a trained codec (plain weights) as a codec directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in codec.state_dict().items()}
    save_file(state, str(out / CODEC_WEIGHTS))
    config = {
        "format": CODEC_FORMAT,
        "codec": HertzConfig(codec=codec.config).to_dict()["codec"],
        **(extra or {}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def load_codec(source: str | os.PathLike[str], device: torch.device | str = "cpu") -> WaveCodec:
    """A codec from a codec directory, a model directory or a variant name, in float32."""
    path = Path(source)
    if (path / CODEC_WEIGHTS).exists():
        meta = json.loads((path / "config.json").read_text())
        config = HertzConfig.from_dict({"codec": meta["codec"]}).codec
        codec = WaveCodec(config)
        check_and_load(codec, load_file(str(path / CODEC_WEIGHTS)), str(path / CODEC_WEIGHTS))
        return codec.to(device)
    net = load_model(str(source), device="cpu", dtype=torch.float32)
    codec = WaveCodec(net.codec.config)
    codec.load_state_dict(net.codec.state_dict())
    return codec.to(device)


def codec_config_of(source: str | os.PathLike[str]) -> CodecConfig:
    """The codec sizes of a checkpoint directory or codec file."""
    return load_codec(source).config
