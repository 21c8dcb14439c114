"""``hertz-agents convert``: write a model in this project's fast-loading safetensors layout."""

from __future__ import annotations

import argparse

from hertz_agents.commands.common import DTYPES


def add_command(commands) -> None:
    """Register the ``convert`` subcommand on the ``commands`` subparsers."""
    p = commands.add_parser(
        "convert",
        help="convert a model (e.g. official .pt files) to model.safetensors + config.json",
        description="Load a model (official files or any checkpoint directory), fold weight norm, "
        "and write model.safetensors + config.json; later loads memory-map it and are fast.",
    )
    p.add_argument("--model", "-m", required=True, help="variant name or checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="bfloat16",
        help="storage dtype (default bfloat16: half the size; loads upcast on CPU)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``hertz-agents convert``: load a model and write it as a checkpoint directory."""
    from hertz_agents.checkpoint import load_model, save_model
    from hertz_agents.commands.common import torch_dtype

    model = load_model(args.model, device="cpu", dtype=torch_dtype(args.dtype))
    out = save_model(model, args.out)
    print(f"wrote {out}")
    return 0
