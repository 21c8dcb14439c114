"""``hertz-agents download``: fetch the official checkpoints from Hugging Face."""

from __future__ import annotations

import argparse


def add_command(commands) -> None:
    from hertz_agents.registry import VARIANTS

    p = commands.add_parser(
        "download", help="download official checkpoints (si-pbc/hertz-dev) and verify their md5",
        description="Fetch a variant's files with huggingface_hub (progress bars; HF_ENDPOINT and HF_TOKEN are "
        "honoured), verify every md5, skip files already present and correct. Offline, it says which files to "
        "copy by hand and where.",
    )
    p.add_argument("--variant", choices=sorted(VARIANTS), default="hertz-dev", help="default: hertz-dev (duplex)")
    p.add_argument("--dir", default=None, help="target directory (default: ckpt/VARIANT)")
    p.add_argument("--no-verify", action="store_true", help="skip md5 verification")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hertz_agents.checkpoint import ckpt_root
    from hertz_agents.download import DownloadError, download_variant
    from hertz_agents.errors import CheckpointError

    dest = Path(args.dir) if args.dir else ckpt_root() / args.variant
    try:
        path = download_variant(args.variant, dest, verify=not args.no_verify)
    except DownloadError as e:
        raise CheckpointError(str(e)) from e
    print(f"{args.variant} is ready in {path}")
    return 0
