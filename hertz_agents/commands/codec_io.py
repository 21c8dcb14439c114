"""``hertz-agents encode`` and ``decode``: audio <-> codec latents.

Both load only the codec, so they work on a directory that holds only the official codec file
(``hertz-agents download --variant codec``) as well as on every full model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hertz_agents.commands.common import (
    add_model_options,
    audio_output,
    check_device,
    load_codec_of,
    npy_output,
)
from hertz_agents.errors import AudioInputError
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP


def add_command(commands) -> None:
    """Register the ``encode`` and ``decode`` subcommands on the ``commands`` subparsers."""
    e = commands.add_parser(
        "encode",
        help="audio -> latents.npy ([frames, 32] float32)",
        description="Encode audio with the codec: the posterior mean by default, a draw with "
        "--sample. The audio is read as float (float WAVs are not quantized), mixed to mono, "
        "resampled to 16 kHz and zero-padded to a multiple of 2000 samples (one frame per 125 ms).",
    )
    add_model_options(e)
    e.add_argument("audio", help="input audio file")
    e.add_argument("--out", required=True, help="output .npy (the name must end in .npy)")
    e.add_argument(
        "--sample", action="store_true", help="draw from the posterior instead of its mean"
    )
    e.add_argument("--seed", type=int, default=None, help="seed for --sample")
    e.set_defaults(handler=run_encode)
    d = commands.add_parser(
        "decode", help="latents.npy -> audio", description="Decode [frames, 32] latents."
    )
    add_model_options(d)
    d.add_argument("latents", help="input .npy of shape [frames, 32]")
    d.add_argument("--out", required=True, help="output audio at 16 kHz (.wav, .flac, ...)")
    d.set_defaults(handler=run_decode)


def run_encode(args: argparse.Namespace) -> int:
    """Run ``hertz-agents encode``: audio file -> latents ``.npy``."""
    import numpy as np
    import torch

    from hertz_agents.audio import read_audio

    out = npy_output(args.out)
    check_device(args)
    audio = read_audio(args.audio, channels=1)[0]
    frames = -(-audio.shape[0] // SAMPLES_PER_STEP)
    padded = np.zeros(frames * SAMPLES_PER_STEP, dtype=np.float32)
    padded[: audio.shape[0]] = audio
    codec = load_codec_of(args)
    param = next(codec.parameters())
    generator = torch.Generator(device=param.device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    with torch.no_grad():
        wave = torch.from_numpy(padded).to(param.device, param.dtype)[None, None]
        latents = codec.encode(wave, sample=args.sample, generator=generator)[0]
    with out.open("wb") as fh:  # a file object: np.save would append .npy to a name
        np.save(fh, latents.float().cpu().numpy())
    print(f"wrote {out}: {frames} frames x {latents.shape[-1]}")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    """Run ``hertz-agents decode``: latents ``.npy`` -> audio file."""
    import numpy as np
    import torch

    from hertz_agents.audio import write_audio

    output = audio_output(args.out)
    check_device(args)
    path = Path(args.latents)
    latents = _read_latents(path)
    codec = load_codec_of(args)
    dim = codec.config.latent_dim
    if latents.ndim != 2 or latents.shape[1] != dim or latents.shape[0] == 0:
        raise AudioInputError(
            f"{path} must hold [frames, {dim}] latents, got shape {latents.shape}"
        )
    if not np.isfinite(latents).all():
        raise AudioInputError(f"{path} holds NaN or inf values")
    param = next(codec.parameters())
    with torch.no_grad():
        audio = codec.decode(torch.from_numpy(latents).to(param.device, param.dtype)[None])[0]
    write_audio(
        output.path,
        audio.float().cpu().numpy(),
        SAMPLE_RATE,
        subtype=output.subtype,
        format=output.format,
    )
    print(f"wrote {output.path}: {audio.shape[-1] / SAMPLE_RATE:.2f} s")
    return 0


def _read_latents(path: Path):
    """The latents array of a .npy file; anything else is a user error that says what to give."""
    import numpy as np

    hint = "give a .npy file written by `hertz-agents encode`"
    if not path.is_file():
        raise AudioInputError(f"{path} does not exist; {hint}")
    with path.open("rb") as fh:
        is_npy = fh.read(6) == b"\x93NUMPY"  # the .npy format's magic string
    if not is_npy:
        raise AudioInputError(f"{path} is not a .npy file; {hint}")
    try:
        latents = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise AudioInputError(f"{path} is a damaged or unsupported .npy file ({e}); {hint}") from e
    if latents.dtype.kind != "f":
        raise AudioInputError(f"{path} holds {latents.dtype} values, not float latents; {hint}")
    return latents
