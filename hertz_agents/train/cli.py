"""The ``hertz-agents train`` commands.

    hertz-agents train codec --config my_codec.toml [--set optim.steps=20000] [--resume]
    hertz-agents train ar    --config my_ar.toml    [--set model.init_from=ckpt/hertz-dev]
    [--resume] hertz-agents train small                         # the shipped CPU model, end to end

Under ``torchrun --nproc_per_node N -m hertz_agents.train.cli codec --config ...`` every process
runs the same command and they train as one (DDP; ``run.strategy = "fsdp"`` shards the AR).
``python -m hertz_agents.train.launch`` takes torchrun's arguments and stops on Ctrl-C with one
line per process, the launcher's included (see :mod:`hertz_agents.train.launch`).

The main CLI wires these in with :func:`add_train_commands`; this module also runs alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
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
    phases = train.add_subparsers(dest="phase", required=True, metavar="{codec,ar,merge,small}")
    _add_phase(phases, "codec", "train the codec (VAE) on a folder of recordings", run_codec)
    _add_phase(
        phases, "ar", "train the quantizer, AR trunk and resynthesizer on a frozen codec", run_ar
    )

    merge = phases.add_parser(
        "merge", help="fold a LoRA adapter into its base model and write a full model directory"
    )
    merge.add_argument(
        "--model", required=True, help="the base model: a name (hertz-dev) or directory"
    )
    merge.add_argument(
        "--adapter", required=True, help="the LoRA adapter folder (a LoRA run's final/)"
    )
    merge.add_argument("--out", required=True, help="the model directory to write")
    merge.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' type in the output"
    )
    merge.set_defaults(func=run_merge)

    small = phases.add_parser(
        "small", help="build the project's small CPU model (synthetic data, both phases)"
    )
    small.add_argument(
        "--data", default="data/synth", help="synthetic corpus root (made when missing)"
    )
    small.add_argument("--out", default="runs/small", help="run folders for both phases")
    small.add_argument(
        "--ckpt", default="ckpt/hertz-small", help="where the finished model is written"
    )
    small.add_argument(
        "--synth-train", type=int, default=4000, help="training conversations to synthesize"
    )
    small.add_argument(
        "--synth-val", type=int, default=16, help="validation conversations to synthesize"
    )
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
        "--real-speech",
        default="",
        help="folder of real recordings to measure the codec on (read only)",
    )
    small.add_argument(
        "--img", default="", help="write loss curves and spectrograms into this folder"
    )
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
        help="continue from the run folder's latest checkpoint (an error if it has none), "
        "or from CHECKPOINT",
    )
    p.add_argument(
        "--resume-if-any",
        action="store_true",
        help="with --resume: start fresh when the run folder has no checkpoint yet",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh in a run folder that holds another run, deleting its checkpoints and log",
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


def _run_phase(args: argparse.Namespace, phase: str) -> int:
    """Check the recipe and the run folder, then train.

    A user error is one line and exit code 2, a diverged run one line and exit code 1, Ctrl-C one
    line per process and exit code 130.
    """
    from hertz_agents.train.config import RecipeError, load_ar_config, load_codec_config
    from hertz_agents.train.loop import Diverged
    from hertz_agents.train.runfolder import RunFolderError, resolve_resume

    _logging()
    rank = os.environ.get("RANK", "0")
    interrupted = _InterruptOnce()
    try:
        cfg = (load_codec_config if phase == "codec" else load_ar_config)(
            args.config, args.overrides
        )
        resume = args.resume or ("latest" if args.resume_if_any else None)
        resume_from = resolve_resume(resume, Path(cfg.run.out_dir), if_any=args.resume_if_any)
        if phase == "codec":
            from hertz_agents.train.codec_trainer import train_codec as train
        else:
            from hertz_agents.train.ar_trainer import train_ar as train
        out = train(cfg, resume=resume_from, overwrite=args.overwrite)  # type: ignore[arg-type]
    except (RecipeError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException as e:
        # Under torchrun a peer stopped by the same Ctrl-C can break a collective this process
        # waits in: whatever ends the run after a Ctrl-C is the Ctrl-C.
        if not (isinstance(e, KeyboardInterrupt) or interrupted.seen):
            raise
        _say(f"[rank {rank}] interrupted; continue with --resume from the last checkpoint")
        return 130
    finally:
        interrupted.restore()
    print(out)
    return 0


def _say(line: str) -> None:
    """Write ``line`` and its newline to stderr in one write.

    Every rank shares the launcher's stderr, and ``print`` writes a line's text and its newline
    apart, so two ranks' lines could interleave.
    """
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class _InterruptOnce:
    """Ctrl-C raises ``KeyboardInterrupt`` once and is remembered; a second one is ignored.

    torchrun forwards the launcher's SIGINT to each worker, and a user may press Ctrl-C again:
    the second must not cut the first one's one-line exit short with a traceback.
    """

    def __init__(self) -> None:
        self.seen = False
        self._previous = signal.getsignal(signal.SIGINT)
        # Signal handlers belong to the main thread (a caller on another thread keeps its own).
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.seen = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    def restore(self) -> None:
        """Put back the handler there was before."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous or signal.SIG_DFL)


def run_codec(args: argparse.Namespace) -> int:
    """``train codec``: train the codec phase of a recipe."""
    return _run_phase(args, "codec")


def run_ar(args: argparse.Namespace) -> int:
    """``train ar``: train the AR phase of a recipe."""
    return _run_phase(args, "ar")


def run_merge(args: argparse.Namespace) -> int:
    """``train merge``: base + adapter -> a model directory any command loads."""
    import torch

    from hertz_agents.checkpoint import load_model, save_model
    from hertz_agents.errors import HertzError
    from hertz_agents.lora import is_adapter_dir

    _logging()
    if not is_adapter_dir(args.adapter):
        print(
            f"error: --adapter {args.adapter}: not a LoRA adapter folder (no adapter_config.json)",
            file=sys.stderr,
        )
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        net = load_model(args.model, device="cpu", dtype=dtype, adapter=args.adapter)
    except HertzError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    extra = {"notes": f"{args.model} with the LoRA adapter {args.adapter} merged"}
    print(save_model(net, args.out, extra=extra))
    return 0


def run_small_command(args: argparse.Namespace) -> int:
    """``train small``: build the small model end to end from a speech corpus."""
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
