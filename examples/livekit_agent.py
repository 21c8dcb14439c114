"""hertz-dev as a LiveKit voice agent: it joins a room, hears the caller and talks at the same time.

    pip install 'hertz-agents[livekit]'
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    python examples/livekit_agent.py dev          # a development worker: joins every new room
    python examples/livekit_agent.py start        # a production worker
    python examples/livekit_agent.py console      # your microphone and speakers, no server needed
    python -m livekit.agents console examples/livekit_agent.py --connect-addr HOST:PORT  # `lk` console

This example's own options go before the mode (or in the environment):

    --model NAME|DIR|hertz://HOST:PORT   HERTZ_MODEL        the checkpoint (default: "default")
    --io agent|rtc                       HERTZ_LIVEKIT_IO   AgentSession (default) or plain rtc
    --agent-name NAME                    HERTZ_AGENT_NAME   only explicit dispatch (SIP) reaches it
    --max-sessions N                     HERTZ_MAX_SESSIONS calls one worker takes at once
    --prompt WAV                         HERTZ_PROMPT       what the model hears before each call
    --silence-rms X                      HERTZ_SILENCE_RMS  the gate's quiet level (default: measured)
    --record-dir DIR                     HERTZ_RECORD_DIR   a stereo WAV of every call (caller | model)

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
    JobContext,
    JobExecutorType,
    JobProcess,
    cli,
    room_io,
)
from livekit.agents.worker import ServerEnvOption
from livekit.plugins import hertz

from hertz_agents.timing import SAMPLE_RATE, STEP_SECONDS

STEP_MS = round(STEP_SECONDS * 1000)

# (flag, environment variable, help); the flags are read here and passed on as the variables, so
# a job process (and the `lk` console, which imports this file) sees the same settings
OPTIONS = [
    ("--model", "HERTZ_MODEL", "model name, checkpoint directory or hertz://host:port"),
    ("--io", "HERTZ_LIVEKIT_IO", "agent (AgentSession, gated bursts) or rtc (every sample played)"),
    ("--agent-name", "HERTZ_AGENT_NAME", "register under this name: only explicit dispatch reaches it"),
    ("--max-sessions", "HERTZ_MAX_SESSIONS", "calls one worker's engine takes at once"),
    ("--prompt", "HERTZ_PROMPT", "WAV the model hears before each call"),
    ("--silence-rms", "HERTZ_SILENCE_RMS", "the model's quiet level for the gate (default: measured)"),
    ("--record-dir", "HERTZ_RECORD_DIR", "write a stereo WAV of every call (caller | model) here"),
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


read_flags(sys.argv[1:])  # at import: the agent name below is read when the module loads


def load_model(proc: JobProcess) -> None:
    """Prewarm: load the weights once per worker (every job thread gets the same engine)."""
    model = os.environ.get("HERTZ_MODEL", hertz.DEFAULT_MODEL)
    silence = os.environ.get("HERTZ_SILENCE_RMS")
    options = {
        "gate": hertz.GateOptions(silence_rms=float(silence) if silence else None),
        "prompt": os.environ.get("HERTZ_PROMPT") or None,
        "record_dir": os.environ.get("HERTZ_RECORD_DIR") or None,
    }
    if model.startswith("hertz://"):  # a remote inference server holds the weights
        proc.userdata["hertz"] = hertz.DuplexModel(model=model, **options)
        return
    max_sessions = os.environ.get("HERTZ_MAX_SESSIONS")
    proc.userdata["hertz"] = hertz.DuplexModel.load(
        model, max_sessions=int(max_sessions) if max_sessions else None, **options
    )


server = AgentServer(
    # every call of this worker runs in this process, on one engine that batches their steps
    job_executor_type=JobExecutorType.THREAD,
    # calls in progress over the engine's slots: at 1.0 LiveKit sends further calls elsewhere
    load_fnc=hertz.worker_load,
    load_threshold=1.0,
    # keep a prewarmed job thread, so the weights load when the worker starts, not on a call
    num_idle_processes=ServerEnvOption(dev_default=1, prod_default=2),
    initialize_process_timeout=600.0,  # the first prewarm loads gigabytes of weights
    setup_fnc=load_model,
)


@server.rtc_session(agent_name=os.environ.get("HERTZ_AGENT_NAME", ""))
async def entrypoint(ctx: JobContext) -> None:
    model: hertz.DuplexModel = ctx.proc.userdata["hertz"]
    if os.environ.get("HERTZ_LIVEKIT_IO", "agent") == "rtc":
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
    await session.start(
        agent=Agent(instructions="(hertz-dev reads no text: shape it with --prompt)"),
        room=ctx.room,
        room_options=room_io.RoomOptions(
            # the model's own rate, one model step per frame: nothing to resample or re-chunk
            audio_input=room_io.AudioInputOptions(sample_rate=SAMPLE_RATE, frame_size_ms=STEP_MS),
            audio_output=room_io.AudioOutputOptions(sample_rate=hertz.DEFAULT_SAMPLE_RATE),
        ),
    )


async def run_plain_rtc(ctx: JobContext, model: hertz.DuplexModel) -> None:
    """Every sample the model produces is played, its quiet included; no gate, no AgentSession."""
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    participant = await ctx.wait_for_participant()
    # about two steps of queue: enough to ride out jitter in step times, little added latency
    source = rtc.AudioSource(hertz.DEFAULT_SAMPLE_RATE, 1, queue_size_ms=2 * STEP_MS)
    track = rtc.LocalAudioTrack.create_audio_track("hertz-dev", source)
    options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    await ctx.room.local_participant.publish_track(track, options)

    session = model.session()
    ctx.add_shutdown_callback(session.aclose)  # ends the audio_stream loop below

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
        async for step in session.audio_stream:
            await source.capture_frame(step.frame)
    finally:
        listening.cancel()
        await caller.aclose()


def main() -> None:
    sys.argv = [sys.argv[0], *read_flags(sys.argv[1:])]  # LiveKit's CLI sees only its own
    cli.run_app(server)


if __name__ == "__main__":
    main()
