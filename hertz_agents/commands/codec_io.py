"""``hertz-agents encode`` and ``decode``: audio <-> codec latents."""

from __future__ import annotations

import argparse
from pathlib import Path

from hertz_agents.commands.common import add_model_options, load
from hertz_agents.errors import AudioInputError
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP


def add_command(commands) -> None:
    e = commands.add_parser(
        "encode", help="audio -> latents.npy ([frames, 32] float32)",
        description="Encode audio with the codec: the posterior mean by default, a draw with --sample. The audio "
        "is read as float (float WAVs are not quantized), mixed to mono, resampled to 16 kHz and zero-padded to a "
        "multiple of 2000 samples (one frame per 125 ms).",
    )
    add_model_options(e)
    e.add_argument("audio", help="input audio file")
    e.add_argument("--out", required=True, help="output .npy")
    e.add_argument("--sample", action="store_true", help="draw from the posterior instead of its mean")
    e.add_argument("--seed", type=int, default=None, help="seed for --sample")
    e.set_defaults(handler=run_encode)
    d = commands.add_parser("decode", help="latents.npy -> audio", description="Decode [frames, 32] latents.")
    add_model_options(d)
    d.add_argument("latents", help="input .npy of shape [frames, 32]")
    d.add_argument("--out", required=True, help="output WAV (16 kHz)")
    d.set_defaults(handler=run_decode)


def run_encode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from hertz_agents.audio import read_audio

    audio = read_audio(args.audio, channels=1)[0]
    frames = -(-audio.shape[0] // SAMPLES_PER_STEP)
    padded = np.zeros(frames * SAMPLES_PER_STEP, dtype=np.float32)
    padded[: audio.shape[0]] = audio
    model = load(args)
    param = next(model.parameters())
    generator = torch.Generator(device=param.device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    with torch.no_grad():
        wave = torch.from_numpy(padded).to(param.device, param.dtype)[None, None]
        latents = model.codec.encode(wave, sample=args.sample, generator=generator)[0]
    np.save(args.out, latents.float().cpu().numpy())
    print(f"wrote {args.out}: {frames} frames x {latents.shape[-1]}")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from hertz_agents.audio import write_audio

    path = Path(args.latents)
    try:
        latents = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        hint = "give the output of `hertz-agents encode`"
        raise AudioInputError(f"cannot read {path} as a .npy array ({e}); {hint}") from e
    model = load(args)
    dim = model.config.codec.latent_dim
    if latents.ndim != 2 or latents.shape[1] != dim or latents.shape[0] == 0:
        raise AudioInputError(f"{path} must hold [frames, {dim}] latents, got shape {latents.shape}")
    if not np.isfinite(latents).all():
        raise AudioInputError(f"{path} holds NaN or inf values")
    param = next(model.parameters())
    with torch.no_grad():
        audio = model.codec.decode(torch.from_numpy(latents).to(param.device, param.dtype)[None])[0]
    write_audio(args.out, audio.float().cpu().numpy(), SAMPLE_RATE)
    print(f"wrote {args.out}: {audio.shape[-1] / SAMPLE_RATE:.2f} s")
    return 0
