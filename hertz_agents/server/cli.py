"""``hertz-agents serve``: the engine as a network service (see docs/server.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hertz_agents.errors import HertzError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000  # the original hertz-dev server's, so its clients find this one


def add_serve_command(commands) -> None:
    """Register ``serve`` on the ``hertz-agents`` subcommands."""
    from hertz_agents.commands.common import add_model_options

    p = commands.add_parser(
        "serve", help="serve the model to remote sessions over WebSocket (one server per GPU)",
        description="Load the model once and serve many conversations, batched in one engine: "
        "hertz://HOST:PORT for DuplexSession, the Pipecat service and the LiveKit plugin; /audio for clients "
        "of the original hertz-dev server; /healthz, /readyz and /metrics (Prometheus) for operators.",
    )
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--max-sessions", type=int, default=8, help="concurrent sessions, batched together (default: 8)")
    p.add_argument("--context", type=int, default=None, help="context steps per session (default: the model's)")
    p.add_argument("--max-input-backlog", type=int, default=4, metavar="STEPS",
                   help="input steps a session may queue while compute is behind before the oldest is dropped "
                   "(default: 4, 0.5 s; more rides out hiccups at the cost of latency)")
    p.add_argument("--token", default=None, help="bearer token clients must send (better: --token-file or "
                   "$HERTZ_TOKEN); required when --host is not a loopback address")
    p.add_argument("--token-file", default=None, help="read the token from this file")
    p.add_argument("--prompt", action="append", default=[], metavar="NAME=FILE",
                   help="a prompt WAV clients can start from by name (repeatable)")
    p.add_argument("--default-prompt", default=None, metavar="NAME",
                   help="prompt for sessions that name none, and for /audio clients")
    p.add_argument("--no-inline-prompts", action="store_true", help="refuse prompts sent inside start messages")
    p.add_argument("--max-session-seconds", type=float, default=3600.0, help="end sessions after this long")
    p.add_argument("--idle-timeout", type=float, default=30.0, help="end sessions that send no audio for this long")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/Ctrl-C, let open sessions finish for up to this long (default: 30 s)")
    p.set_defaults(handler=run)


def parse_prompts(specs: list[str]) -> dict[str, Path]:
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
    import asyncio
    import dataclasses

    from hertz_agents.commands.common import load
    from hertz_agents.engine import Engine
    from hertz_agents.server.app import HertzServer, ServerConfig, run_server
    from hertz_agents.server.auth import TokenAuth, is_loopback, resolve_token
    from hertz_agents.server.protocol import Limits

    token = resolve_token(args.token, args.token_file)
    if token is None and not is_loopback(args.host):
        raise HertzError(f"listening on {args.host} reaches beyond this machine, so clients must authenticate: pass "
                         "--token-file FILE or set HERTZ_TOKEN (make one with `python -c \"import secrets; "
                         "print(secrets.token_urlsafe(32))\"`)")
    if args.max_sessions < 1:
        raise HertzError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    prompts = parse_prompts(args.prompt)
    limits = dataclasses.replace(Limits(), max_session_seconds=args.max_session_seconds, idle_timeout=args.idle_timeout)
    if args.default_prompt is not None and args.default_prompt not in prompts:
        raise HertzError(f"--default-prompt {args.default_prompt!r} is not one of the --prompt names {sorted(prompts)}")
    try:
        TokenAuth(token)
    except ValueError as e:
        raise HertzError(str(e)) from e
    config = ServerConfig(limits=limits, token=token, prompts=prompts, default_prompt=args.default_prompt,
                          allow_inline_prompts=not args.no_inline_prompts, model_name=str(args.model))
    engine = Engine(load(args), max_sessions=args.max_sessions, context=args.context,
                    max_input_backlog=args.max_input_backlog)
    try:
        for name, path in prompts.items():  # prefill each prompt now, not during someone's call
            engine.prefill_prompt(path)
            log.info("prompt %s ready (%s)", name, path)
        server = HertzServer(engine, config)

        def ready(url: str) -> None:
            print(f"hertz-agents serve: listening on {url} ({args.model}, {engine.max_sessions} sessions; "
                  f"hertz://{url.split('://', 1)[1]})", flush=True)

        asyncio.run(run_server(server, args.host, args.port, drain_timeout=args.drain_timeout, on_ready=ready))
    finally:
        engine.close()
    print("hertz-agents serve: stopped", flush=True)
    return 0


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
