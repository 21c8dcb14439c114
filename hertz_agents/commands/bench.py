"""``hertz-agents bench``: how fast the engine steps B conversations on this machine."""

from __future__ import annotations

import argparse
import json

from hertz_agents.commands.common import add_model_options, check_sink, load


def add_command(commands) -> None:
    """Register the ``bench`` subcommand and its options on the ``commands`` subparsers."""
    p = commands.add_parser(
        "bench",
        help=(
            "time batched engine steps: median/p90/p99, real-time factor, "
            "whether B sessions keep up"
        ),
        description="Step B synthetic conversations together N times and report the tick time "
        "(median, p90, p99), the real-time factor (tick time / 125 ms) and whether B sessions keep "
        "up with 8 steps/s. Works on any checkpoint directory, including a config.json with other "
        "sizes.",
    )
    add_model_options(p)
    p.add_argument(
        "--sessions", "-b", type=int, default=1, help="conversations stepped together (default 1)"
    )
    p.add_argument("--steps", "-n", type=int, default=40, help="timed steps (default 40)")
    p.add_argument(
        "--position",
        type=int,
        default=0,
        help="start at this context position (cost must not grow); with --rollover ring it "
        "may be past the context",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help=(
            "positions per session before it rolls over (default: the model's); "
            "the steps may cross it"
        ),
    )
    p.add_argument(
        "--rollover",
        choices=("refill", "ring"),
        default=None,
        help="at the context: re-prefill the kept window (refill) or keep a ring cache (ring); "
        "default: the model's (refill for hertz-dev, ring for hertz-small)",
    )
    p.add_argument(
        "--sink",
        type=int,
        default=0,
        help="with a ring (--rollover ring or the model's): the first positions of a call kept "
        "in its cache (default 0)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, time the batched steps and print the result.

    Returns:
        The exit status, 0.

    Raises:
        HertzError: ``--sessions``, ``--steps`` or ``--context`` is too small, or the benchmark
            rejects its arguments.
    """
    import torch

    from hertz_agents.benchmark import bench_ticks
    from hertz_agents.errors import HertzError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sessions < 1 or args.steps < 1:
        raise HertzError("--sessions and --steps must be at least 1")
    check_sink(args)
    if args.context is not None and args.context < 8:
        raise HertzError("--context must be at least 8 positions")
    model = load(args)
    try:
        result = bench_ticks(
            model,
            args.sessions,
            args.steps,
            start_position=args.position,
            context=args.context,
            rollover=args.rollover,
            sink=args.sink,
        )
    except ValueError as e:
        raise HertzError(str(e)) from e
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    verdict = "keeps up" if result.keeps_up else "does NOT keep up"
    print(
        f"{result.sessions} session(s) on {result.device} "
        f"({result.dtype}, {result.threads} threads), "
        f"{result.steps} steps from position {result.start_position}:"
    )
    print(
        f"  tick  median {result.step_ms_median:.1f} ms   p90 {result.step_ms_p90:.1f} ms   "
        f"p99 {result.step_ms_p99:.1f} ms   max {result.step_ms_max:.1f} ms"
    )
    print(
        f"  context {result.context} positions ({result.rollover}): "
        f"{result.rollovers} rollover(s) during the timed steps"
    )
    print(f"  real-time factor {result.rtf:.3f}: {verdict} with 8 steps/s")
    print(
        "  memory per session (KV caches, history, codec state): "
        f"{result.bytes_per_session / 1e6:.1f} MB"
    )
    return 0
