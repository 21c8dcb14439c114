r"""``torchrun`` with a quiet Ctrl-C: the same launcher and arguments, one line when stopped.

    python -m hertz_agents.train.launch --standalone --nproc_per_node 8 \
        -m hertz_agents.train.cli ar --config finetune_ar --set ...

Stock ``torchrun`` handles Ctrl-C (SIGINT) or SIGTERM by forwarding the signal to every worker
(each in its own session, so the terminal's Ctrl-C reaches only the launcher), logging a warning
per worker and then letting its ``SignalException`` escape ``main``: a 25-line traceback of the
launcher's own, and exit code 1, after the workers' one line each. This runs torchrun's own
``run`` and turns that into one line and the shell's exit code for the signal (130 for Ctrl-C,
143 for SIGTERM). Everything else (arguments, rendezvous, failures of a worker) is torchrun's.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

# torchrun's agent announces each step of the shutdown it does for a signal; the one line below
# says it instead.
_SHUTDOWN_NOISE = ("death signal", "closing signal", "Closing process")


class _DropShutdownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(noise in message for noise in _SHUTDOWN_NOISE)


def main(argv: Sequence[str] | None = None) -> int:
    """Launch like ``torchrun``; a signal that stops the run ends in one line and 128 + signal."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    noise = _DropShutdownNoise()
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).addFilter(noise)
    try:
        run(args)
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(
            f"[launcher] {name}: stopped the {args.nproc_per_node} local processes; "
            "continue with --resume from the last checkpoint",
            file=sys.stderr,
        )
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
