"""``hertz-agents info``: variants, files present, md5 state, parameter counts."""

from __future__ import annotations

import argparse


def add_command(commands) -> None:
    p = commands.add_parser(
        "info", help="show variants, which files are present, md5 state and parameter counts",
        description="Without --model: every official variant and the default model, with their files in ckpt/. "
        "With --model: that model's configuration, files and sizes. --md5 hashes files (slow for the big ones).",
    )
    p.add_argument("--model", "-m", default=None, help="a variant name, 'default' or a checkpoint directory")
    p.add_argument("--md5", action="store_true", help="verify md5 sums of present official files")
    p.set_defaults(handler=run)


def _params(config) -> int:
    import torch

    from hertz_agents.model.hertz import HertzModel

    with torch.device("meta"):
        model = HertzModel(config)
    return sum(p.numel() for p in model.parameters())


def _describe_dir(name: str, md5: bool) -> None:
    from hertz_agents.checkpoint import WEIGHTS_FILE, read_config, resolve_model_dir
    from hertz_agents.config import HertzConfig
    from hertz_agents.registry import check_dir

    directory, variant = resolve_model_dir(name)
    print(f"{name}: {directory}")
    if variant is not None:
        print(f"  {variant.description}; about {variant.approx_bytes / 1e9:.1f} GB to download")
        for status in check_dir(directory, variant, md5=md5):
            print(f"  {status.describe()}")
        config = HertzConfig(split=variant.split)
    elif (directory / WEIGHTS_FILE).exists():
        config, meta = read_config(directory)
        size = (directory / WEIGHTS_FILE).stat().st_size
        print(f"  own layout ({WEIGHTS_FILE}, {size / 1e6:.1f} MB); {meta.get('notes', '')}".rstrip("; "))
    elif directory.is_dir():
        config, _ = read_config(directory)
        print("  official layout with config.json" if (directory / "config.json").exists() else "  official layout")
    else:
        print("  not present")
        return
    split = "two-channel (duplex)" if config.split else "one-channel"
    print(f"  {split}; {_params(config) / 1e6:,.1f} M parameters; AR dim {config.ar.dim} x {config.ar.layers} layers, "
          f"context {config.ar.seq_len} steps ({config.ar.seq_len / 8:.0f} s)")


def run(args: argparse.Namespace) -> int:
    from hertz_agents.checkpoint import DEFAULT_MODEL
    from hertz_agents.registry import VARIANTS

    names = [args.model] if args.model else [DEFAULT_MODEL, *VARIANTS]
    for name in names:
        _describe_dir(name, args.md5)
    return 0
