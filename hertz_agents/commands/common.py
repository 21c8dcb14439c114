"""Options several commands share."""

from __future__ import annotations

import argparse

import torch

from hertz_agents.sampling import SamplingSettings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_options(parser: argparse.ArgumentParser, default: str = "default") -> None:
    parser.add_argument("--model", "-m", default=default, metavar="MODEL",
                        help=f"variant name, 'default', or a checkpoint directory (default: {default})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    d = SamplingSettings()
    parser.add_argument("--temps", type=float, nargs=3, metavar=("TOKEN", "CATEGORICAL", "GAUSSIAN"),
                        default=(d.token_temp, d.categorical_temp, d.gaussian_temp),
                        help="token temperature, then the mixture's categorical and gaussian temperatures "
                        f"(default: {d.token_temp} {d.categorical_temp} {d.gaussian_temp}, the original's)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling of tokens, e.g. 0.9")
    parser.add_argument("--min-p", type=float, default=None, help="min-p sampling of tokens, e.g. 0.05")


def sampling_from(args: argparse.Namespace) -> SamplingSettings:
    token, categorical, gaussian = args.temps
    return SamplingSettings(token, categorical, gaussian, top_p=args.top_p, min_p=args.min_p)


def load(args: argparse.Namespace):
    from hertz_agents.checkpoint import load_model

    return load_model(args.model, device=args.device, dtype=DTYPES.get(args.dtype) if args.dtype else None)
