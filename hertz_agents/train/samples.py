"""Audio samples of a model in training: a continuation of a prompt, and codec round trips.

Written at each validation into ``<out_dir>/samples/step_N/`` so a run can be listened to while
it trains (WAV, 16 kHz, one channel per speaker).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from hertz_agents.codec.model import WaveCodec
from hertz_agents.model.hertz import HertzModel
from hertz_agents.sampling import SamplingSettings, SamplingTensors


@torch.no_grad()
def continue_latents(
    net: HertzModel,
    prompt: Tensor,
    steps: int,
    seed: int = 0,
    settings: SamplingSettings | None = None,
) -> Tensor:
    """Sample ``steps`` latents after ``prompt`` [T, C*32] with cached steps.

    Returns [T+steps, C*32] on the prompt's device.
    """
    t = prompt.shape[0]
    caches = net.new_caches(1, t + steps + 1)
    sampling = SamplingTensors.from_settings([settings or SamplingSettings()], device=prompt.device)
    gen = [torch.Generator(device=prompt.device).manual_seed(seed)]
    positions = torch.arange(t, device=prompt.device)[None]
    nxt, _ = net.next_latents(prompt[None], positions, caches, None, sampling, gen)
    out = [nxt]
    for i in range(steps - 1):
        position = torch.tensor([[t + i]], device=prompt.device)
        nxt, _ = net.next_latents(nxt[:, None], position, caches, None, sampling, gen)
        out.append(nxt)
    return torch.cat((prompt, torch.cat(out).to(prompt.dtype)), dim=0)


@torch.no_grad()
def decode_channels(codec: WaveCodec, latents: Tensor) -> Tensor:
    """[T, C*32] -> audio [C, T*hop], decoded in float32 on the codec's device."""
    param = next(codec.parameters())
    latents = latents.to(device=param.device, dtype=param.dtype)
    chans = latents.chunk(latents.shape[-1] // codec.config.latent_dim, dim=-1)
    with torch.autocast(param.device.type, enabled=False):
        return torch.stack([codec.decode(c[None]).view(-1) for c in chans]).float()


def write_wavs(directory: Path, codec: WaveCodec, latents: dict[str, Tensor]) -> list[Path]:
    """Decode each ``name: [T, C*32]`` and write ``directory/name.wav``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, lat in latents.items():
        audio = decode_channels(codec, lat).clamp(-1, 1).cpu().numpy().T  # [N, C]
        path = directory / f"{name}.wav"
        sf.write(path, np.ascontiguousarray(audio), codec.config.sample_rate, subtype="PCM_16")
        written.append(path)
    return written
