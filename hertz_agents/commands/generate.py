"""``hertz-agents generate``: continue a prompt offline."""

from __future__ import annotations

import argparse
import math

from tqdm import tqdm

from hertz_agents.commands.common import (
    add_model_options,
    add_sampling_options,
    audio_output,
    check_device,
    load,
    sampling_from,
)
from hertz_agents.timing import SAMPLE_RATE, STEPS_PER_SECOND


def add_command(commands) -> None:
    """Register the ``generate`` subcommand on the ``commands`` subparsers."""
    p = commands.add_parser(
        "generate",
        help="continue a prompt (mono for one-channel models, stereo for the duplex model)",
        description="Continue a prompt as the original notebook does. A one-channel model "
        "continues a mono prompt; the duplex model continues a stereo prompt (channel 1: the other "
        "speaker, channel 2: the model). Any sample rate and channel count is converted. Writes "
        "SECONDS of continuation.",
    )
    add_model_options(p)
    p.add_argument("--prompt", required=True, help="prompt audio file (WAV, FLAC, MP3...)")
    p.add_argument("--seconds", type=float, required=True, help="seconds of audio to generate")
    p.add_argument(
        "--out", required=True, help="output audio (.wav, .flac, ...; the folder must exist)"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible output")
    p.add_argument(
        "--include-prompt", action="store_true", help="write the prompt before the continuation"
    )
    add_sampling_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``hertz-agents generate``: continue a prompt and write the audio."""
    import numpy as np

    from hertz_agents.audio import read_audio, write_audio
    from hertz_agents.errors import AudioInputError
    from hertz_agents.generation import continue_prompt

    # Every check on the arguments comes before the model loads and generates: a mistake found
    # after minutes of generation would lose the work.
    if not (args.seconds > 0 and math.isfinite(args.seconds)):
        raise AudioInputError(f"--seconds must be a positive number, got {args.seconds}")
    output = audio_output(args.out)
    sampling = sampling_from(args)
    check_device(args)
    model = load(args)
    prompt = read_audio(args.prompt, channels=model.channels, min_seconds=1 / STEPS_PER_SECOND)
    steps = math.ceil(args.seconds * STEPS_PER_SECOND)
    with tqdm(total=steps, unit="step", desc="generating", disable=None) as bar:
        audio = continue_prompt(
            model, prompt, steps, sampling, args.seed, on_step=lambda _: bar.update()
        )
    audio = audio[:, : int(round(args.seconds * SAMPLE_RATE))]
    if args.include_prompt:
        audio = np.concatenate([prompt, audio], axis=1)
    write_audio(output.path, audio, SAMPLE_RATE, subtype=output.subtype, format=output.format)
    print(f"wrote {output.path}: {audio.shape[1] / SAMPLE_RATE:.2f} s, {audio.shape[0]} channel(s)")
    return 0
