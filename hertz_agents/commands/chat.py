"""``hertz-agents chat``: talk to the model with the local microphone and speakers."""

from __future__ import annotations

import argparse

from hertz_agents.commands.common import (
    add_model_options,
    add_sampling_options,
    audio_output,
    check_device,
    sampling_from,
)
from hertz_agents.errors import HertzError
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

PORTAUDIO_HINT = (
    "sound needs PortAudio and the sounddevice package: `apt-get install libportaudio2` "
    "(Debian/Ubuntu) or `brew install portaudio` (macOS), then `pip install 'hertz-agents[mic]'`"
)
DEVICE_HINT = (
    "connect a microphone and headphones (or speakers) and check that this user may use them; "
    "`python -m sounddevice` lists the devices PortAudio sees"
)


def add_command(commands) -> None:
    """Register the ``chat`` subcommand on the ``commands`` subparsers."""
    p = commands.add_parser(
        "chat",
        help="talk to the model with your microphone and speakers (use headphones)",
        description="Full-duplex conversation through the local sound devices: the model hears you "
        "while it talks. Use headphones, or it hears itself. Ctrl-C ends the call; --record keeps "
        "a stereo WAV.",
    )
    add_model_options(p)
    p.add_argument(
        "--prompt", default=None, help="stereo (caller | model) or mono WAV to start from"
    )
    p.add_argument("--record", default=None, help="write the call as a stereo WAV (you | model)")
    p.add_argument("--seconds", type=float, default=None, help="end the call after this long")
    add_sampling_options(p)
    p.set_defaults(handler=run)


def import_sounddevice():
    """Import sounddevice; a missing package or PortAudio library raises :class:`HertzError`."""
    try:
        import sounddevice
    except ImportError as e:
        raise HertzError(f"the sounddevice package is not installed ({e}); {PORTAUDIO_HINT}") from e
    except OSError as e:  # the package is there but the PortAudio library is not
        raise HertzError(f"the PortAudio library is missing ({e}); {PORTAUDIO_HINT}") from e
    return sounddevice


def check_sound_devices(sd) -> None:
    """Refuse up front, before the model loads, when there is no microphone or no output device."""
    for kind in ("input", "output"):
        try:
            sd.query_devices(kind=kind)
        except (sd.PortAudioError, ValueError) as e:  # ValueError: PortAudio has no such device
            raise HertzError(f"no sound {kind} device ({e}); {DEVICE_HINT}") from None


def run(args: argparse.Namespace) -> int:
    """Run ``hertz-agents chat``: a live call through the microphone and speakers."""
    import asyncio

    import soundfile as sf

    record = audio_output(args.record, "--record") if args.record is not None else None
    if record is not None and not sf.check_format(record.format, "PCM_16"):
        raise HertzError(
            f"--record {args.record}: the call is recorded as 16-bit audio; use .wav or .flac"
        )
    sampling_from(args)
    check_device(args)
    sd = import_sounddevice()
    check_sound_devices(sd)
    asyncio.run(_chat(sd, args))
    return 0


async def _chat(sd, args: argparse.Namespace) -> None:
    import asyncio

    import numpy as np

    from hertz_agents.engine import load_engine
    from hertz_agents.session import DuplexSession

    engine = await asyncio.to_thread(load_engine, args.model, device=args.device)
    session = await DuplexSession.open(
        engine, prompt=args.prompt, sampling=sampling_from(args), record_path=args.record
    )
    loop = asyncio.get_running_loop()
    playback = np.zeros(0, dtype=np.float32)

    def mic(indata, frames, time_info, status) -> None:
        loop.call_soon_threadsafe(session.push_audio_nowait, indata[:, 0].copy(), SAMPLE_RATE)

    def speaker(outdata, frames, time_info, status) -> None:
        nonlocal playback
        take = playback[:frames]
        outdata[: len(take), 0] = take
        outdata[len(take) :, 0] = 0
        playback = playback[frames:]

    try:
        with (
            sd.InputStream(
                samplerate=SAMPLE_RATE,
                channels=1,
                dtype="float32",
                blocksize=SAMPLES_PER_STEP // 4,
                callback=mic,
            ),
            sd.OutputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", callback=speaker),
        ):
            print("talking: Ctrl-C to hang up")
            deadline = loop.time() + args.seconds if args.seconds else None
            async for chunk in session:
                playback = np.concatenate([playback[-SAMPLE_RATE:], chunk.audio])
                if deadline and loop.time() > deadline:
                    break
    except sd.PortAudioError as e:
        raise HertzError(f"the sound device failed ({e}); {DEVICE_HINT}") from None
    finally:
        await session.close()
        _print_summary(session.metrics.snapshot())


def _print_summary(metrics: dict) -> None:
    """One line about the call, or nothing when no step ran (its figures would all be NaN)."""
    if not metrics.get("steps"):
        return
    print(
        f"call ended: {metrics['steps']} steps, "
        f"step time median {metrics['step_ms_median']:.1f} ms, "
        f"real-time factor {metrics['rtf']:.2f}, {metrics['late_steps']} late step(s)"
    )
