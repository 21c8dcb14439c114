"""Command-line options the example bots share: the model, a prompt, the speech gate.

Kept in the package so that a bot of your own gets the same flags with two calls::

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args()
    preload_or_exit(args.model, args.prompt)
"""

from __future__ import annotations

import argparse
import asyncio

from hertz_agents.errors import HertzError
from pipecat_hertz.service import HertzDuplexService


def gate_db(value: str) -> float | str | None:
    """``--gate-db``: "auto", "off" or a level in dBFS."""
    return None if value == "off" else value if value == "auto" else float(value)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--prompt`` and ``--gate-db``."""
    parser.add_argument("--model", default="default", help="model name, checkpoint directory, or hertz://host:port")
    parser.add_argument("--prompt", help="WAV the conversation starts from (mono, or stereo caller | model)")
    parser.add_argument(
        "--gate-db",
        type=gate_db,
        default="auto",
        help="speech gate threshold: auto (from the model's quiet level), a level in dBFS, or off",
    )


def preload_or_exit(model: str, prompt: str | None) -> None:
    """Load the weights before serving, and say plainly what is wrong if they cannot be."""
    if model.startswith("hertz://"):
        return
    try:
        asyncio.run(HertzDuplexService.preload(model, prompt=prompt))
    except HertzError as e:
        raise SystemExit(f"error: {e}") from None
