"""``hertz-agents download``: fetch the official checkpoints (or only the codec) from the Hub."""

from __future__ import annotations

import argparse


def add_command(commands) -> None:
    """Register the ``download`` subcommand on the ``commands`` subparsers."""
    from hertz_agents.registry import DOWNLOADS

    p = commands.add_parser(
        "download", help="download official checkpoints (si-pbc/hertz-dev) and verify their md5",
        description="Fetch a variant's files with huggingface_hub (progress bars; HF_ENDPOINT and "
        "HF_TOKEN are honoured), verify every md5, skip files already present and correct. "
        "`--variant codec` fetches only the codec (190 MB), enough for `encode` and `decode`. "
        "Offline, it fails at once and says which files to copy by hand and where.",
    )
    p.add_argument("--variant", choices=list(DOWNLOADS), default="hertz-dev",
                   help="default: hertz-dev (duplex); codec: the codec file alone")
    p.add_argument("--dir", default=None,
                   help="target directory (default: VARIANT in the models folder; "
                   "`hertz-agents info` shows it)")
    p.add_argument("--no-verify", action="store_true", help="skip md5 verification")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``hertz-agents download``: fetch and verify a variant's files."""
    from pathlib import Path

    from hertz_agents.download import DownloadError, download_variant
    from hertz_agents.errors import CheckpointError, HertzError
    from hertz_agents.locations import ckpt_root

    dest = Path(args.dir) if args.dir else ckpt_root() / args.variant
    if dest.exists() and not dest.is_dir():
        raise HertzError(f"--dir {dest} is a file; give a folder")
    try:
        path = download_variant(args.variant, dest, verify=not args.no_verify)
    except DownloadError as e:
        raise CheckpointError(str(e)) from e
    print(f"{args.variant} is ready in {path}")
    return 0
