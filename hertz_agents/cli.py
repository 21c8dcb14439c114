"""``hertz-agents``: the command line. Each subcommand lives in ``hertz_agents/commands``.

Errors the user can fix (bad audio, bad options, output paths that cannot be written, missing or
corrupt checkpoints, a full engine) print one clear message and exit with status 2; they never end
in a traceback. Commands check their arguments and output paths before any long work starts.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hertz_agents import __version__
from hertz_agents.errors import HertzError

EPILOG = """\
MODEL is a variant name (hertz-dev, hertz-dev-mono, hertz-dev-mono-audio; see `hertz-agents info`),
`default` (the project's small CPU model, installed with hertz-agents), or a checkpoint directory.
`encode` and `decode` also take `codec` or a directory holding only the official codec file.
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the ``hertz-agents`` argument parser with every available subcommand."""
    from hertz_agents.commands import bench, chat, codec_io, convert, download, generate, info

    parser = argparse.ArgumentParser(
        prog="hertz-agents",
        description="hertz-dev, the full-duplex audio model, for voice agents.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hertz-agents {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (generate, codec_io, info, download, convert, bench, chat):
        module.add_command(commands)
    for optional in ("hertz_agents.server.cli", "hertz_agents.train.cli"):
        _add_optional(commands, optional)
    return parser


def _add_optional(commands, module_name: str) -> None:
    """Commands whose modules need extras (server, training) register themselves if importable."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    for name in dir(module):
        if name.startswith("add_") and name.endswith(("_command", "_commands")):
            getattr(module, name)(commands)


def main(argv: list[str] | None = None) -> int:
    """Run the ``hertz-agents`` command line.

    Args:
        argv: The arguments after the program name; None reads ``sys.argv``.

    Returns:
        The exit code: the command's own (0 by default), 2 for an error the user can fix,
        130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        handler = getattr(args, "handler", None) or args.func  # train commands set `func`
        return int(handler(args) or 0)
    except HertzError as e:
        print(f"hertz-agents {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        sys.stdout = None  # so that the interpreter does not fail flushing it at exit
        return 0
    except OSError as e:
        if e.filename is None:  # not about a file the user named: a real failure, keep the trace
            raise
        # e.g. an output folder without write permission, or a full disk
        reason = e.strerror or e
        print(f"hertz-agents {args.command}: error: {reason}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
