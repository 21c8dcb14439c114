"""The ``hertz-agents train`` commands.

    hertz-agents train codec --config my_codec.toml [--set optim.steps=20000] [--resume]
    hertz-agents train ar    --config my_ar.toml    [--set model.init_from=ckpt/hertz-dev] [--resume]
    hertz-agents train small                         # the shipped CPU model, end to end

Under ``torchrun --nproc_per_node N -m hertz_agents.train.cli codec --config ...`` every process
runs the same command and they train as one (DDP; ``run.strategy = "fsdp"`` shards the AR).

The main CLI wires these in with :func:`add_train_commands`; this module also runs alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hertz_agents.train.config import CONFIG_DIR


def add_train_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``train`` (with ``codec``, ``ar``, ``small``) to a parent parser's subcommands.

    Each leaf parser sets ``func`` to its handler, which takes the parsed namespace and returns
    an exit code: ``return args.func(args)``.
    """
    train = subparsers.add_parser(
        "train",
        help="train or fine-tune the codec or the AR, or build the small model",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    phases = train.add_subparsers(dest="phase", required=True, metavar="{codec,ar,small}")
    _add_phase(phases, "codec", "train the codec (VAE) on a folder of recordings", run_codec)
    _add_phase(phases, "ar", "train the quantizer, AR trunk and resynthesizer on a frozen codec", run_ar)

    small = phases.add_parser("small", help="build the project's small CPU model (synthetic data, both phases)")
    small.add_argument("--data", default="data/synth", help="synthetic corpus root (made when missing)")
    small.add_argument("--out", default="runs/small", help="run folders for both phases")
    small.add_argument("--ckpt", default="ckpt/hertz-small", help="where the finished model is written")
    small.add_argument("--synth-train", type=int, default=4000, help="training conversations to synthesize")
    small.add_argument("--synth-val", type=int, default=16, help="validation conversations to synthesize")
    small.add_argument("--synth-workers", type=int, default=1, help="parallel espeak-ng processes")
    small.add_argument(
        "--codec-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of configs/small_codec.toml (repeatable)",
    )
    small.add_argument(
        "--ar-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of configs/small_ar.toml (repeatable)",
    )
    small.add_argument(
        "--real-speech", default="", help="folder of real recordings to measure the codec on (read only)"
    )
    small.add_argument("--img", default="", help="write loss curves and spectrograms into this folder")
    small.set_defaults(func=run_small_command)
    return train


def _add_phase(phases: argparse._SubParsersAction, name: str, help: str, func) -> None:  # type: ignore[type-arg]
    p = phases.add_parser(name, help=help)
    p.add_argument(
        "--config",
        required=True,
        help=f"TOML recipe, or the name of a shipped one ({', '.join(_shipped())})",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override one key, e.g. --set optim.steps=100 --set run.device=cuda (repeatable)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the run folder's latest checkpoint, or from CHECKPOINT",
    )
    p.set_defaults(func=func)


def _shipped() -> list[str]:
    return sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))


def _logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
    )


def _resume(arg: str | None, out_dir: str) -> str | None:
    if arg == "latest":
        if not (Path(out_dir) / "checkpoints" / "latest").exists():
            logging.getLogger(__name__).warning("--resume: no checkpoint in %s yet; starting fresh", out_dir)
            return None
        return out_dir
    return arg


def run_codec(args: argparse.Namespace) -> int:
    from hertz_agents.train.codec_trainer import train_codec
    from hertz_agents.train.config import load_codec_config

    _logging()
    cfg = load_codec_config(args.config, args.overrides)
    out = train_codec(cfg, resume=_resume(args.resume, cfg.run.out_dir))
    print(out)
    return 0


def run_ar(args: argparse.Namespace) -> int:
    from hertz_agents.train.ar_trainer import train_ar
    from hertz_agents.train.config import load_ar_config

    _logging()
    cfg = load_ar_config(args.config, args.overrides)
    out = train_ar(cfg, resume=_resume(args.resume, cfg.run.out_dir))
    print(out)
    return 0


def run_small_command(args: argparse.Namespace) -> int:
    from hertz_agents.train.small import run_small

    _logging()
    out = run_small(
        args.data,
        args.out,
        args.ckpt,
        args.synth_train,
        args.synth_val,
        args.synth_workers,
        args.codec_set,
        args.ar_set,
        args.real_speech,
        args.img,
    )
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hertz_agents.train.cli {codec,ar,small} ...`` (what torchrun launches)."""
    parser = argparse.ArgumentParser(prog="hertz_agents.train.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_commands(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        argv = ["train", *argv]  # `-m hertz_agents.train.cli codec ...` reads as `train codec ...`
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
