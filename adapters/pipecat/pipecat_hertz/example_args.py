"""What the example bots share: their flags, the model's description, the preload before serving.

Kept in the package so that a bot of your own gets the same flags with a few calls::

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args, _ = parser.parse_known_args()      # the runner's own flags are parsed by its main()
    preload_or_exit(args.model, args.prompt)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from typing import Any

from loguru import logger

from hertz_agents.backend import is_remote_url
from hertz_agents.errors import HertzError
from pipecat_hertz.service import HertzDuplexService

DEFAULT_MODEL = "default"
DEMO_MODEL_NOTE = (
    "the project's small demo model: it makes speech-like sounds, not words "
    "(--model hertz-dev for the real model, on a GPU)"
)


def gate_db(value: str) -> float | str | None:
    """``--gate-db``: "auto", "off" or a level in dBFS."""
    if value in ("auto", "off"):
        return None if value == "off" else value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected auto, off or a level in dBFS such as -45, got {value!r}"
        ) from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--prompt``, ``--gate-db`` and ``--record-dir``."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model name, checkpoint directory, or hertz://host:port?token=...",
    )
    parser.add_argument(
        "--prompt", help="WAV the conversation starts from (mono, or stereo caller | model)"
    )
    parser.add_argument(
        "--gate-db",
        type=gate_db,
        default="auto",
        help="speech gate threshold: auto (from the model's quiet level), a level in dBFS, or off",
    )
    parser.add_argument("--record-dir", help="record every call here (stereo WAV: caller | model)")


@dataclass(frozen=True)
class BotOptions:
    """The example flags a call needs (from the runner's parsed command line)."""

    model: Any = DEFAULT_MODEL
    prompt: str | None = None
    gate_db: float | str | None = "auto"
    record_dir: str | None = None

    @classmethod
    def from_cli(cls, cli_args: argparse.Namespace | None) -> BotOptions:
        """From ``runner_args.cli_args``; the defaults when the bot runs without the dev runner."""
        if cli_args is None:
            return cls()
        return cls(
            model=getattr(cli_args, "model", DEFAULT_MODEL),
            prompt=getattr(cli_args, "prompt", None),
            gate_db=getattr(cli_args, "gate_db", "auto"),
            record_dir=getattr(cli_args, "record_dir", None),
        )


def describe_model(model: Any) -> str:
    """What the page and the console say about the model that talks."""
    label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if label == DEFAULT_MODEL:
        return f"{DEFAULT_MODEL}: {DEMO_MODEL_NOTE}"
    if is_remote_url(label):
        return f"a remote inference server ({label.split('?')[0]})"
    return label


def preload_or_exit(model: str, prompt: str | None) -> None:
    """Load the weights before serving, and say plainly what is wrong if they cannot be."""
    if is_remote_url(model):
        logger.info(f"model: {describe_model(model)}")
        return
    logger.info(f"loading hertz-dev model {model!r}...")
    try:
        asyncio.run(HertzDuplexService.preload(model, prompt=prompt))
    except (HertzError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    logger.info(f"model loaded: {describe_model(model)}")
