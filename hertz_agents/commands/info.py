"""``hertz-agents info``: where each model is, its files, md5 state and parameter counts."""

from __future__ import annotations

import argparse


def add_command(commands) -> None:
    """Register the ``info`` subcommand on the ``commands`` subparsers."""
    p = commands.add_parser(
        "info",
        help="show where each model is, which files are present, md5 state and parameter counts",
        description="Without --model: the default model, every official variant and the codec "
        "alone, each with the folder it is looked for in and why (HERTZ_AGENTS_CKPT, the "
        "checkout's ckpt/, the hertz-agents-small package, or the user's model folder). With "
        "--model: that model's configuration, files and sizes, codec-only directories included. "
        "--md5 hashes files (slow for the big ones).",
    )
    p.add_argument(
        "--model", "-m", default=None, help="a variant name, 'default' or a checkpoint directory"
    )
    p.add_argument("--md5", action="store_true", help="verify md5 sums of present official files")
    p.set_defaults(handler=run)


def _params(module_class, config) -> int:
    import torch

    with torch.device("meta"):
        model = module_class(config)
    return sum(p.numel() for p in model.parameters())


def _describe(name: str, md5: bool) -> None:
    from hertz_agents.checkpoint import WEIGHTS_FILE, is_codec_only, read_config
    from hertz_agents.config import HertzConfig
    from hertz_agents.locations import locate
    from hertz_agents.registry import CODEC_FILE, check_dir

    location = locate(name)
    directory, variant = location.directory, location.variant
    where = "not present" if not location.present else location.source
    print(f"{name}: {directory} ({where})")
    if variant is not None:
        print(f"  {variant.description}; about {variant.approx_bytes / 1e9:.1f} GB to download")
        for status in check_dir(directory, variant, md5=md5):
            print(f"  {status.describe()}")
        if variant.name == "codec":
            _describe_codec(HertzConfig().codec)
            return
        config = HertzConfig(split=variant.split)
    elif not location.present:
        return
    elif (directory / WEIGHTS_FILE).exists():
        config, meta = read_config(directory)
        size = (directory / WEIGHTS_FILE).stat().st_size
        print(
            f"  own layout ({WEIGHTS_FILE}, {size / 1e6:.1f} MB); {meta.get('notes', '')}".rstrip(
                "; "
            )
        )
    elif is_codec_only(directory):
        config, _ = read_config(directory)
        size = (directory / CODEC_FILE).stat().st_size
        print(f"  codec only ({CODEC_FILE}, {size / 1e6:.1f} MB): encode and decode, no generation")
        _describe_codec(config.codec)
        return
    else:
        config, _ = read_config(directory)
        print(
            "  official layout with config.json"
            if (directory / "config.json").exists()
            else "  official layout"
        )
    from hertz_agents.config import usable_context
    from hertz_agents.model.hertz import HertzModel
    from hertz_agents.timing import STEPS_PER_SECOND

    split = "two-channel (duplex)" if config.split else "one-channel"
    context = usable_context(config)
    params_m = _params(HertzModel, config) / 1e6
    print(
        f"  {split}; {params_m:,.1f} M parameters; AR dim {config.ar.dim} x "
        f"{config.ar.layers} layers, context {context} steps "
        f"({context / STEPS_PER_SECOND:.0f} s), {config.serving.rollover} at a rollover"
    )


def _describe_codec(codec_config) -> None:
    from hertz_agents.codec.model import WaveCodec

    print(
        f"  codec: {_params(WaveCodec, codec_config) / 1e6:,.1f} M parameters, "
        f"{codec_config.latent_dim}-dim latents every {codec_config.hop} samples"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``hertz-agents info``: describe one model, or the default and every download."""
    from hertz_agents.locations import DEFAULT_MODEL, ckpt_root
    from hertz_agents.registry import DOWNLOADS

    if args.model:
        _describe(args.model, args.md5)
        return 0
    print(
        f"models folder: {ckpt_root()} (`download` puts variants here; HERTZ_AGENTS_CKPT moves it)"
    )
    for name in (DEFAULT_MODEL, *DOWNLOADS):
        _describe(name, args.md5)
    return 0
