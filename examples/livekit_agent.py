"""hertz-dev as a LiveKit voice agent: it joins a room, hears the caller and talks at the same time.

    pip install livekit-plugins-hertz
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    # or a local server: scripts/livekit_dev_stack start; eval "$(scripts/livekit_dev_stack env)"
    python examples/livekit_agent.py dev          # a development worker: joins every new room
    python examples/livekit_agent.py start        # a production worker
    python -m livekit.agents start examples/livekit_agent.py   # the same, LiveKit's own runner
    python -m livekit.agents console examples/livekit_agent.py --connect-addr HOST:PORT  # lk

This example's own options go before the mode (or in the environment):

    --model NAME|DIR|hertz://HOST:PORT   HERTZ_MODEL        the checkpoint (default: "default")
    --io agent|rtc                       HERTZ_LIVEKIT_IO   AgentSession (default) or plain rtc
    --agent-name NAME                    HERTZ_AGENT_NAME   only explicit dispatch (SIP) reaches it
    --max-sessions N                     HERTZ_MAX_SESSIONS calls one worker takes at once
    --prompt WAV                         HERTZ_PROMPT       what the model hears before each call
    --silence-rms X                      HERTZ_SILENCE_RMS  the gate's quiet level (else measured)
    --record-dir DIR                     HERTZ_RECORD_DIR   a stereo WAV of each call (caller|model)
    --prebuffer SECONDS                  HERTZ_PREBUFFER    output held before a burst plays (0.3)
    --keep-room 1                        HERTZ_KEEP_ROOM    do not end the room when the agent ends
    --executor thread|process            HERTZ_EXECUTOR     default: thread, process for hertz://
    --http-port PORT                     HERTZ_HTTP_PORT    health checks (start: 8081, 0: any)

docs/livekit.md explains every setting below.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from livekit import rtc
from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    AutoSubscribe,
    CloseEvent,
    CloseReason,
    JobContext,
    JobExecutorType,
    JobProcess,
    room_io,
)
from livekit.agents.worker import ServerEnvOption
from livekit.plugins import hertz

from hertz_agents.timing import SAMPLE_RATE, STEP_SECONDS

STEP_MS = round(STEP_SECONDS * 1000)
INPUT_FRAME_MS = 20

# (flag, environment variable, help); the flags are read here and passed on as the variables, so
# a job process (and the `lk` console, which imports this file) sees the same settings
OPTIONS = [
    ("--model", "HERTZ_MODEL", "model name, checkpoint directory or hertz://host:port"),
    ("--io", "HERTZ_LIVEKIT_IO", "agent (AgentSession, gated bursts) or rtc (every sample played)"),
    (
        "--agent-name",
        "HERTZ_AGENT_NAME",
        "register under this name: only explicit dispatch reaches it",
    ),
    ("--max-sessions", "HERTZ_MAX_SESSIONS", "calls one worker's engine takes at once"),
    ("--prompt", "HERTZ_PROMPT", "WAV the model hears before each call"),
    (
        "--silence-rms",
        "HERTZ_SILENCE_RMS",
        "the model's quiet level for the gate (default: measured)",
    ),
    ("--record-dir", "HERTZ_RECORD_DIR", "write a stereo WAV of every call (caller | model) here"),
    ("--prebuffer", "HERTZ_PREBUFFER", "seconds of output held before it plays (default 0.3)"),
    (
        "--keep-room",
        "HERTZ_KEEP_ROOM",
        "1: leave the room open when the agent ends (default: end it)",
    ),
    (
        "--executor",
        "HERTZ_EXECUTOR",
        "thread (one engine for all calls) or process (hertz:// default)",
    ),
    (
        "--http-port",
        "HERTZ_HTTP_PORT",
        "the worker's health-check port (start: 8081; 0: any free one)",
    ),
]


def read_flags(argv: list[str]) -> list[str]:
    """Move this example's flags into the environment; returns the arguments left for LiveKit."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag, env, help_text in OPTIONS:
        parser.add_argument(flag, dest=env, help=help_text)
    ours, rest = parser.parse_known_args(argv)
    for env, value in vars(ours).items():
        if value is not None:
            os.environ[env] = value
    return rest


def _number(env: str, kind: type, *, minimum: float, flag: str) -> None:
    value = os.environ.get(env)
    if not value:
        return
    try:
        ok = kind(value) >= minimum
    except ValueError:
        ok = False
    if not ok:
        what = "a whole number" if kind is int else "a number"
        print(f"{flag} must be {what} of at least {minimum}, got {value!r}", file=sys.stderr)
        sys.exit(2)


def check_settings() -> None:
    """Refuse a bad number when the worker starts, not inside the first call's job."""
    _number("HERTZ_PREBUFFER", float, minimum=0, flag="--prebuffer")
    _number("HERTZ_SILENCE_RMS", float, minimum=0, flag="--silence-rms")
    _number("HERTZ_MAX_SESSIONS", int, minimum=1, flag="--max-sessions")
    _number("HERTZ_HTTP_PORT", int, minimum=0, flag="--http-port")


read_flags(sys.argv[1:])  # at import: the agent name below is read when the module loads
check_settings()


def plain_rtc() -> bool:
    """``--io rtc``: every step played through ``rtc.AudioSource``, no ``AgentSession``."""
    return os.environ.get("HERTZ_LIVEKIT_IO", "agent") == "rtc"


def prebuffer_seconds() -> float:
    """Seconds of the model's output held before it plays (``--prebuffer``)."""
    return float(os.environ.get("HERTZ_PREBUFFER") or hertz.DEFAULT_PREBUFFER)


def load_model(proc: JobProcess) -> None:
    """Prewarm: load the weights once per worker (every job thread gets the same engine)."""
    model = os.environ.get("HERTZ_MODEL", hertz.DEFAULT_MODEL)
    silence = os.environ.get("HERTZ_SILENCE_RMS")
    options = {
        "gate": hertz.GateOptions(silence_rms=float(silence) if silence else None),
        "prompt": os.environ.get("HERTZ_PROMPT") or None,
        "record_dir": os.environ.get("HERTZ_RECORD_DIR") or None,
        # per burst for AgentSession; the rtc path holds its own once per call (play_stream)
        "prebuffer": 0.0 if plain_rtc() else prebuffer_seconds(),
    }
    if model.startswith("hertz://"):  # a remote inference server holds the weights
        proc.userdata["hertz"] = hertz.DuplexModel(model=model, **options)
        return
    proc.userdata["hertz"] = hertz.DuplexModel.load(model, max_sessions=max_sessions(), **options)


def remote_engine() -> bool:
    return os.environ.get("HERTZ_MODEL", "").startswith("hertz://")


def executor_type() -> JobExecutorType:
    """Threads share one engine in this process; a remote engine needs no sharing, and separate
    job processes keep one call's crash or stall away from the others."""
    default = "process" if remote_engine() else "thread"
    choice = os.environ.get("HERTZ_EXECUTOR") or default
    if choice not in ("thread", "process"):
        print(f"--executor must be thread or process, got {choice!r}", file=sys.stderr)
        sys.exit(2)
    return JobExecutorType.THREAD if choice == "thread" else JobExecutorType.PROCESS


def max_sessions() -> int | None:
    value = os.environ.get("HERTZ_MAX_SESSIONS")
    return int(value) if value else None


server = AgentServer(
    # with threads, every call of this worker runs in this process, on one engine that batches them
    job_executor_type=executor_type(),
    # engine slots (or accepted calls) in use over capacity: at 1.0 LiveKit sends calls elsewhere;
    # a hertz:// server tells its own load
    load_fnc=hertz.WorkerLoad(os.environ.get("HERTZ_MODEL"), max_sessions=max_sessions()),
    load_threshold=1.0,
    # keep a prewarmed job thread, so the weights load when the worker starts, not on a call
    num_idle_processes=ServerEnvOption(dev_default=1, prod_default=2),
    initialize_process_timeout=600.0,  # the first prewarm loads gigabytes of weights
    setup_fnc=load_model,
    **({"port": int(os.environ["HERTZ_HTTP_PORT"])} if os.environ.get("HERTZ_HTTP_PORT") else {}),
)


def end_call(ctx: JobContext, reason: str) -> None:
    """End the call for everyone (a phone call hangs up), unless --keep-room; then leave."""
    if os.environ.get("HERTZ_KEEP_ROOM", "") not in ("", "0"):
        ctx.shutdown(reason=reason)
        return
    deleting = ctx.delete_room()
    deleting.add_done_callback(lambda _: ctx.shutdown(reason=reason))


@server.rtc_session(agent_name=os.environ.get("HERTZ_AGENT_NAME", ""))
async def entrypoint(ctx: JobContext) -> None:
    model: hertz.DuplexModel = ctx.proc.userdata["hertz"]
    if plain_rtc():
        await run_plain_rtc(ctx, model)
        return

    session: AgentSession[None] = AgentSession(
        llm=model,  # wrapped in llm.DuplexRealtimeAdapter: the model speaks over the caller
        vad=None,  # no client-side turn detection: the model decides when to talk and to stop
        # the default 3 s replaces the caller's audio with silence while the agent speaks, so the
        # model would miss everything said over it; hertz-dev needs to hear overlapping speech
        aec_warmup_duration=None,
        turn_handling={"turn_detection": "realtime_llm"},  # turn-taking belongs to the model
    )

    @session.on("close")
    def on_close(event: CloseEvent) -> None:
        # a model that failed mid-call (engine gone, server restarted) must not leave silence
        if event.reason == CloseReason.ERROR:
            end_call(ctx, f"hertz-dev failed: {event.error.error if event.error else 'unknown'}")

    await session.start(
        agent=Agent(instructions="(hertz-dev reads no text: shape it with --prompt)"),
        room=ctx.room,
        room_options=room_io.RoomOptions(
            # the model's own rate; 20 ms frames, which the core cuts into 125 ms steps (a 125 ms
            # frame crashes the job process: WebRTC's audio processing takes whole 10 ms blocks)
            audio_input=room_io.AudioInputOptions(
                sample_rate=SAMPLE_RATE, frame_size_ms=INPUT_FRAME_MS
            ),
            audio_output=room_io.AudioOutputOptions(sample_rate=hertz.DEFAULT_SAMPLE_RATE),
            # a chat message would interrupt() the agent, which cuts the model's burst off
            # until its next pause; the model cannot read text anyway
            text_input=False,
            # a 1:1 call: when the agent ends (the caller left, or an error), the call ends
            delete_room_on_close=os.environ.get("HERTZ_KEEP_ROOM", "") in ("", "0"),
        ),
    )


async def run_plain_rtc(ctx: JobContext, model: hertz.DuplexModel) -> None:
    """Every sample the model produces is played, its quiet included; no gate, no AgentSession."""
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    participant = await ctx.wait_for_participant()
    session = model.session()
    ctx.add_shutdown_callback(session.aclose)  # ends the audio_stream loop below
    if not await session.wait_open():  # a full engine, a missing model, a refused server
        end_call(ctx, f"hertz-dev could not start: {session.failed}")
        return

    prebuffer = prebuffer_seconds()
    source = hertz.output_source(hertz.DEFAULT_SAMPLE_RATE, prebuffer=prebuffer)
    track = rtc.LocalAudioTrack.create_audio_track("hertz-dev", source)
    options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    await ctx.room.local_participant.publish_track(track, options)

    def on_left(left: rtc.RemoteParticipant) -> None:
        if left.identity == participant.identity:
            ctx.shutdown(reason="the caller left")

    ctx.room.on("participant_disconnected", on_left)
    caller = rtc.AudioStream.from_participant(
        participant=participant,
        track_source=rtc.TrackSource.SOURCE_MICROPHONE,
        sample_rate=SAMPLE_RATE,
        frame_size_ms=STEP_MS,
    )

    async def listen() -> None:
        async for event in caller:  # no track yet, or a muted one: the model steps on silence
            session.push_audio(event.frame)

    listening = asyncio.create_task(listen())
    try:
        await hertz.play_stream(session.audio_stream, source, prebuffer=prebuffer)
    finally:
        listening.cancel()
        await caller.aclose()
    if session.failed is not None:
        end_call(ctx, f"hertz-dev failed: {session.failed}")


def main() -> None:
    """``dev`` and ``start`` run the worker through ``python -m livekit.agents start``."""
    rest = read_flags(sys.argv[1:])
    if not rest or rest[0] not in ("dev", "start"):
        print(
            "usage: python examples/livekit_agent.py [options] dev|start [--log-level LEVEL ...]; "
            "console: python -m livekit.agents console examples/livekit_agent.py "
            "--connect-addr HOST:PORT (what the `lk` CLI runs)",
            file=sys.stderr,
        )
        sys.exit(2)
    from livekit.agents.__main__ import main as livekit_main

    mode, *extra = rest
    sys.exit(livekit_main(["start", __file__, *extra, *(["--dev"] if mode == "dev" else [])]))


if __name__ == "__main__":
    main()
