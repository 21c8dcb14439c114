"""Tiny checkpoint directories in the official layout, built from the reference vectors.

The weights come from shared/reference (the original code's own tiny models), split into the
official file names exactly as the real checkpoints are split, plus a config.json with sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from reference import load_reference, weights

from hertz_agents.registry import VARIANTS


def write_official_dir(directory: Path, split: bool = True, variant: str | None = None) -> Path:
    """Write codec, quantizer, resynthesizer and AR files plus config.json into ``directory``."""
    variant = variant or ("hertz-dev" if split else "hertz-dev-mono")
    files = {f.role: f.name for f in VARIANTS[variant].files}
    codec_meta, codec_t = load_reference("codec_tiny_a")
    ar_meta, ar_t = load_reference("ar_split_tiny_a" if split else "ar_mono_tiny_a")
    w = weights(ar_t)
    resynth = weights(w, "resynthesizer.")
    states = {
        "codec": weights(codec_t),
        "quantizer": weights(resynth, "quantizer."),
        "resynthesizer": {k: v for k, v in resynth.items() if not k.startswith("quantizer.")},
        "ar": {k: v for k, v in w.items() if not k.startswith("resynthesizer.")},
    }
    directory.mkdir(parents=True, exist_ok=True)
    for role, state in states.items():
        torch.save({k: v.clone() for k, v in state.items()}, directory / files[role])
    blocks = {k: ar_meta["config"][k] for k in ("ar", "resynthesizer", "quantizer")}
    config = {"split": split, "codec": codec_meta["config"], **blocks}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_codec_only_dir(directory: Path, config: str = "block") -> Path:
    """Only the official codec file (the original code's tiny codec, unused keys included).

    ``config``: ``"block"`` writes ``{"codec": {...}}``, ``"bare"`` the codec fields alone,
    ``"full"`` a whole model's config.json (codec and AR blocks), ``"none"`` no config.json.
    """
    meta, tensors = load_reference("codec_tiny_a")
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in weights(tensors).items()}
    torch.save(state, directory / VARIANTS["hertz-dev"].file("codec").name)
    codec = meta["config"]
    if config == "block":
        (directory / "config.json").write_text(json.dumps({"codec": codec}))
    elif config == "bare":
        (directory / "config.json").write_text(json.dumps(codec))
    elif config == "full":
        ar_meta, _ = load_reference("ar_split_tiny_a")
        blocks = {k: ar_meta["config"][k] for k in ("ar", "resynthesizer", "quantizer")}
        full = {"split": True, "codec": codec, **blocks}
        (directory / "config.json").write_text(json.dumps(full))
    return directory
