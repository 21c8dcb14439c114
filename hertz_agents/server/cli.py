"""``hertz-agents serve``: the engine as a network service (see docs/server.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hertz_agents.backend import REMOTE_SCHEME
from hertz_agents.errors import HertzError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000  # the original hertz-dev server's, so its clients find this one


def add_serve_command(commands) -> None:
    """Register ``serve`` on the ``hertz-agents`` subcommands."""
    from hertz_agents.commands.common import add_model_options

    p = commands.add_parser(
        "serve",
        help="serve the model to remote sessions over WebSocket (one server per GPU)",
        description="Load the model once and serve many conversations, batched in one engine: "
        "hertz://HOST:PORT for DuplexSession, the Pipecat service and the LiveKit plugin; "
        "/audio for clients of the original hertz-dev server; /healthz, /readyz and /metrics "
        "(Prometheus) for operators.",
    )
    add_model_options(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; with 0.0.0.0 a "
        "token is required: put a rate-limiting proxy in front)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)",
    )
    p.add_argument(
        "--max-sessions",
        type=int,
        default=8,
        help="concurrent sessions, batched together (default: 8)",
    )
    p.add_argument(
        "--context", type=int, default=None, help="context steps per session (default: the model's)"
    )
    p.add_argument(
        "--rollover",
        choices=("refill", "ring"),
        default=None,
        help="when a call fills its context: re-prefill its last 3/4 (refill) or keep a ring "
        "cache of its last positions (ring: no recompute; docs/engine.md); default: the "
        "model's (refill for hertz-dev, ring for hertz-small)",
    )
    p.add_argument(
        "--sink",
        type=int,
        default=0,
        metavar="STEPS",
        help="with a ring (--rollover ring or the model's): the first steps of each call kept in "
        "its cache (default 0)",
    )
    p.add_argument(
        "--max-input-backlog",
        type=int,
        default=4,
        metavar="STEPS",
        help="input steps a session may queue while compute is behind before the oldest is dropped "
        "(default: 4, 0.5 s; more rides out hiccups at the cost of latency)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="bearer token clients must send (better: --token-file or "
        "$HERTZ_TOKEN); required when --host is not a loopback address",
    )
    p.add_argument("--token-file", default=None, help="read the token from this file")
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a prompt WAV clients can start from by name (repeatable)",
    )
    p.add_argument(
        "--default-prompt",
        default=None,
        metavar="NAME",
        help="prompt for sessions that name none, and for /audio clients",
    )
    p.add_argument(
        "--inline-prompts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="take prompts sent inside start messages (default: only when --host is loopback; "
        "an inline prompt is a file the server decodes)",
    )
    p.add_argument(
        "--max-prompt-seconds",
        type=float,
        default=30.0,
        help="longest inline prompt, read from its header before decoding (default: 30)",
    )
    p.add_argument(
        "--max-inline-prompts-per-client",
        type=int,
        default=4,
        metavar="N",
        help="distinct inline prompts one client address may add (default: 4; 16 server-wide)",
    )
    p.add_argument(
        "--max-session-seconds", type=float, default=3600.0, help="end sessions after this long"
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        help="end sessions that send no audio for this long",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/Ctrl-C, let open sessions finish for up to this long (default: 30 s)",
    )
    p.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="a LoRA adapter folder (a LoRA run's final/) merged into --model's weights",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for the model's math (default: one fewer than this machine's cores, at "
        "least 1: the front end and the network need a core of their own)",
    )
    p.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the model in a process of its own, so protocol work can never take the "
        "engine's time (default: on; --no-engine-process runs it in the server's process)",
    )
    add_budget_options(p)
    p.set_defaults(handler=run)


def add_budget_options(p: argparse.ArgumentParser) -> None:
    """The per-connection and per-peer budgets (docs/server.md, "Limits"); 0 turns one off."""
    g = p.add_argument_group("budgets (per connection and per client address; 0: off)")
    g.add_argument(
        "--audio-messages-per-second",
        type=float,
        default=50.0,
        metavar="N",
        help="audio messages a session may send a second (default: 50)",
    )
    g.add_argument(
        "--control-messages-per-second",
        type=float,
        default=5.0,
        metavar="N",
        help="JSON control messages a session may send a second (default: 5, burst 10)",
    )
    g.add_argument(
        "--min-audio-ms",
        type=float,
        default=10.0,
        metavar="MS",
        help="smallest audio message but a call's last (default: 10 ms)",
    )
    g.add_argument(
        "--step-burst",
        type=int,
        default=8,
        metavar="STEPS",
        help="steps a client may send ahead of real time, not saved up while idle "
        "(default: 8, 1 s); more are dropped",
    )
    g.add_argument(
        "--send-stall-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="a client whose reading blocks a send this long is closed (default: 2)",
    )
    g.add_argument(
        "--start-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="to send the start message after connecting (default: 2)",
    )
    g.add_argument(
        "--max-pending-per-client",
        type=int,
        default=None,
        metavar="N",
        help="connections of one address that have not started yet (default: --max-sessions, "
        "at least 4: one agent-worker host may bring all its calls at once)",
    )
    g.add_argument(
        "--starts-per-second",
        type=float,
        default=2.0,
        metavar="N",
        help="session starts a second per client address, burst max(8, --max-sessions) "
        "(default: 2)",
    )
    g.add_argument(
        "--auth-failures",
        type=int,
        default=5,
        metavar="N",
        help="failed authentications in 10 s after which an address is cut off (default: 5)",
    )
    g.add_argument(
        "--auth-block-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="how long such an address is cut off (default: 30)",
    )
    g.add_argument(
        "--header-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="to send a whole request head after connecting; also the idle "
        "keep-alive timeout (default: 5)",
    )


def inline_prompts_allowed(args: argparse.Namespace) -> bool:
    """``--inline-prompts``/``--no-inline-prompts``, else only when listening on loopback only."""
    from hertz_agents.server.auth import is_loopback

    return args.inline_prompts if args.inline_prompts is not None else is_loopback(args.host)


def budgets_from(args: argparse.Namespace, limits):
    """(protocol Limits, PeerLimits) from the budget flags (HertzError for a negative one)."""
    import dataclasses

    from hertz_agents.server.guards import PeerLimits

    for name in (
        "audio_messages_per_second",
        "control_messages_per_second",
        "min_audio_ms",
        "step_burst",
        "send_stall_timeout",
        "start_timeout",
        "max_pending_per_client",
        "starts_per_second",
        "auth_failures",
        "auth_block_seconds",
        "header_timeout",
        "max_prompt_seconds",
        "max_inline_prompts_per_client",
    ):
        value = getattr(args, name)
        if value is not None and value < 0:  # None: the default that follows --max-sessions
            flag = "--" + name.replace("_", "-")
            raise HertzError(f"{flag} must be 0 (off) or more, got {value}")
    limits = dataclasses.replace(
        limits,
        audio_messages_per_second=args.audio_messages_per_second,
        control_messages_per_second=args.control_messages_per_second,
        min_audio_message_bytes=int(args.min_audio_ms * 16) * 2,  # 16 samples a ms, 2 bytes each
        step_burst=args.step_burst if args.step_burst > 0 else 1 << 30,
        max_send_stall_seconds=args.send_stall_timeout,
        start_timeout=args.start_timeout if args.start_timeout > 0 else 10.0,
        max_prompt_seconds=args.max_prompt_seconds,
    )
    # One agent-worker host (one address) may open all of the engine's sessions at once, so the
    # per-address start burst and pending pool are at least --max-sessions.
    pending = args.max_pending_per_client
    peer = PeerLimits(
        max_pending_per_peer=max(4, args.max_sessions) if pending is None else pending,
        starts_per_second=args.starts_per_second,
        start_burst=max(PeerLimits.start_burst, args.max_sessions),
        auth_failures=args.auth_failures,
        auth_block_seconds=args.auth_block_seconds,
        header_timeout=args.header_timeout,
        keepalive_timeout=args.header_timeout,
    )
    return limits, peer


def parse_prompts(specs: list[str]) -> dict[str, Path]:
    """``NAME=FILE`` specs -> name -> path (HertzError naming the bad one)."""
    prompts: dict[str, Path] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise HertzError(f"--prompt takes NAME=FILE, got {spec!r}")
        path = Path(file).expanduser()
        if not path.is_file():
            raise HertzError(f"--prompt {name}: no file at {path}")
        prompts[name] = path
    return prompts


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until stopped; the exit code."""
    import asyncio
    import dataclasses

    from hertz_agents.remote.protocol import Limits
    from hertz_agents.server.app import HertzServer, ServerConfig, run_server
    from hertz_agents.server.auth import TokenAuth, is_loopback, resolve_token

    token = resolve_token(args.token, args.token_file)
    if token is None and not is_loopback(args.host):
        raise HertzError(
            f"listening on {args.host} reaches beyond this machine, so clients must "
            "authenticate: pass "
            '--token-file FILE or set HERTZ_TOKEN (make one with `python -c "import secrets; '
            'print(secrets.token_urlsafe(32))"`)'
        )
    if args.max_sessions < 1:
        raise HertzError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    prompts = parse_prompts(args.prompt)
    limits, peer_limits = budgets_from(
        args,
        dataclasses.replace(
            Limits(), max_session_seconds=args.max_session_seconds, idle_timeout=args.idle_timeout
        ),
    )
    inline = inline_prompts_allowed(args)
    if args.default_prompt is not None and args.default_prompt not in prompts:
        raise HertzError(
            f"--default-prompt {args.default_prompt!r} is not one of the --prompt names "
            f"{sorted(prompts)}"
        )
    try:
        TokenAuth(token)
    except ValueError as e:
        raise HertzError(str(e)) from e
    config = ServerConfig(
        limits=limits,
        token=token,
        prompts=prompts,
        default_prompt=args.default_prompt,
        allow_inline_prompts=inline,
        max_inline_prompts_per_peer=args.max_inline_prompts_per_client,
        peer_limits=peer_limits,
        model_name=str(args.model),
    )
    # LoRA: the adapter folder is checked before the (long) model load, merged right after it.
    adapter = args.adapter
    if adapter is not None:
        from hertz_agents.lora import ADAPTER_CONFIG, is_adapter_dir

        if not is_adapter_dir(adapter):
            raise HertzError(f"--adapter {adapter}: not a LoRA adapter (no {ADAPTER_CONFIG})")
    from hertz_agents.commands.common import check_sink

    check_sink(args)
    threads = engine_threads(args.threads)
    engine_options = {
        "max_sessions": args.max_sessions,
        "context": args.context,
        "max_input_backlog": args.max_input_backlog,
        "rollover": args.rollover,
        "sink": args.sink,
    }
    engine = start_engine(args, engine_options, list(prompts.values()), threads)
    try:
        server = HertzServer(engine, config)

        def ready(url: str) -> None:
            print(
                f"hertz-agents serve: listening on {url} "
                f"({args.model}, {engine.max_sessions} sessions; "
                f"{REMOTE_SCHEME}{url.split('://', 1)[1]})",
                flush=True,
            )

        asyncio.run(
            run_server(
                server, args.host, args.port, drain_timeout=args.drain_timeout, on_ready=ready
            )
        )
    finally:
        engine.close()
    print("hertz-agents serve: stopped", flush=True)
    return 0


def engine_threads(requested: int | None) -> int:
    """The engine's torch CPU threads: ``--threads``, or all cores but one (at least one).

    torch's default is every core, and its OpenMP threads spin while they wait for each other:
    beside a front end and clients on the same cores they lose more time than they gain. On a
    2-core machine, 16 sessions ran at 0.63 of real time with one thread against 0.83 with two
    (``benchmarks/server_threads.py``).

    Raises:
        HertzError: ``requested`` is below 1.
    """
    if requested is not None:
        if requested < 1:
            raise HertzError(f"--threads must be at least 1, got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


def start_engine(args: argparse.Namespace, engine_options: dict, prompts: list[Path], threads: int):
    """The server's engine, its prompts prefilled: in its own process unless told otherwise.

    Raises:
        HertzError: The model or a prompt cannot be loaded (the engine process's reason).
    """
    if args.engine_process:
        from hertz_agents.server.engine_process import EngineProcess
        from hertz_agents.server.engine_wire import EngineSpec

        spec = EngineSpec(
            model=str(args.model),
            device=args.device,
            dtype=args.dtype,
            adapter=args.adapter,
            engine_options=engine_options,
            prompts=tuple(str(path) for path in prompts),
            threads=threads,
        )
        return EngineProcess(spec)
    import torch

    from hertz_agents.commands.common import load
    from hertz_agents.engine import Engine

    torch.set_num_threads(threads)

    net = load(args)
    if args.adapter is not None:
        from hertz_agents.lora import merge_adapter

        merge_adapter(net, args.adapter)
    engine = Engine(net, **engine_options)
    try:
        for path in prompts:  # prefill each prompt now, not during someone's call
            engine.prefill_prompt(path)
            log.info("prompt ready (%s)", path)
    except BaseException:
        engine.close()
        raise
    return engine


def main(argv: list[str] | None = None) -> int:
    """``python -m hertz_agents.server``: the same as ``hertz-agents serve``."""
    parser = argparse.ArgumentParser(prog="python -m hertz_agents.server")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except HertzError as e:
        print(f"hertz-agents serve: error: {e}", file=sys.stderr)
        return 2
