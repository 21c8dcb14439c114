"""Audio corpora turned into codec latents, once, for the AR phase.

The AR phase never trains the codec, so every segment's posterior can be computed once and
reused for every epoch. :func:`encode_corpus` encodes the fixed segments of an
:class:`AudioSegmentDataset` (each channel alone, as at inference) and :class:`LatentSet`
serves them. A cache file records what produced it (codec weights, segment length, channels,
item selection, and the contents of every file) and is rebuilt when any of that changes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hertz_agents.codec.model import WaveCodec
from hertz_agents.train.data import AudioSegmentDataset
from hertz_agents.train.runtime import Runtime

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_audio(codec: WaveCodec, audio: Tensor, with_logvar: bool = False) -> Tensor:
    """Encode audio ``[B, C, N]`` to latents ``[B, T, C*32]`` (channel-major).

    With ``with_logvar``: ``[B, 2, T, C*32]`` holding (mu, logvar).
    """
    b, c, n = audio.shape
    mu, logvar = codec.posterior(audio.reshape(b * c, 1, n).to(next(codec.parameters()).dtype))
    t = mu.shape[1]

    def channels_last(x: Tensor) -> Tensor:  # [B*C, T, 32] -> [B, T, C*32]
        return x.view(b, c, t, -1).permute(0, 2, 1, 3).reshape(b, t, -1)

    if not with_logvar:
        return channels_last(mu).float()
    return torch.stack((channels_last(mu), channels_last(logvar)), dim=1).float()


def sample_posterior(stats: Tensor) -> Tensor:
    """``[B, 2, T, D]`` (mu, logvar) -> a sample ``[B, T, D]`` (uses the global RNG)."""
    mu, logvar = stats[:, 0], stats[:, 1]
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def codec_fingerprint(codec: WaveCodec) -> str:
    """A short hash of the codec's weights, to tell whether a latent cache was made with it."""
    h = hashlib.sha256()
    for k, v in sorted(codec.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: a recording rewritten under the same name is encoded again."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def spread(n: int, limit: int) -> list[int]:
    """``limit`` indices spread evenly over ``range(n)`` (all of them when ``limit`` <= 0)."""
    if limit <= 0 or limit >= n:
        return list(range(n))
    return sorted({int(i * n / limit) for i in range(limit)})


@torch.no_grad()
def encode_corpus(
    codec: WaveCodec,
    dataset: AudioSegmentDataset,
    indices: list[int],
    with_logvar: bool,
    batch_size: int = 16,
    progress: bool = True,
) -> Tensor:
    """Latents of the chosen segments, ``[N, T, C*32]`` (or ``[N, 2, T, C*32]``), on the CPU."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices)
    device = next(codec.parameters()).device
    out = []
    batches = loader
    if progress:
        from tqdm import tqdm  # type: ignore[import-untyped]

        batches = tqdm(loader, desc="encode", unit="batch", dynamic_ncols=True)
    for audio in batches:
        out.append(encode_audio(codec, audio.to(device), with_logvar).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def cache_key(
    codec: WaveCodec, dataset: AudioSegmentDataset, indices: list[int], with_logvar: bool
) -> dict:
    """What a cache was made from: codec weights, segments, item selection, file contents."""
    return {
        "codec": codec_fingerprint(codec),
        "segment": dataset.segment,
        "channels": dataset.channels,
        "files": [(str(f.path), file_digest(f.path)) for f in dataset.files],
        "indices": hashlib.sha256(str(indices).encode()).hexdigest()[:16],
        "logvar": with_logvar,
    }


def read_cache(path: Path, key: dict, with_logvar: bool) -> Tensor | None:
    """The cached latents if ``path`` was made from ``key``, else None."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("key") == key:
        return saved["latents"]
    if not with_logvar and saved.get("key") == {**key, "logvar": True}:
        return saved["latents"][:, 0]  # means, from a cache that also holds log-variances
    log.info("%s was made from other data or another codec: encoding again", path)
    return None


def write_cache(path: Path, key: dict, latents: Tensor) -> None:
    """Save ``latents`` with their ``key`` to ``path`` atomically (write, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "latents": latents}, tmp)
    tmp.replace(path)


def cached_latents(
    path: Path,
    codec: WaveCodec,
    dataset: AudioSegmentDataset,
    limit: int,
    with_logvar: bool,
    progress: bool = True,
    rt: Runtime | None = None,
) -> Tensor:
    """Load ``path`` if it was made from the same codec, segments and files, else encode it.

    Encoded latents are written to ``path``. Under torchrun (``rt`` given) every rank encodes its
    share of the segments (``indices[rank::world]``) and rank 0 puts them back in order: no rank
    waits on another encoding the whole corpus. Every rank must call it; every rank gets the whole
    result.
    """
    indices = spread(len(dataset), limit)
    key = cache_key(codec, dataset, indices, with_logvar)
    latents = read_cache(path, key, with_logvar)
    if latents is not None:
        return latents
    rank, world = (rt.rank, rt.world) if rt is not None else (0, 1)
    log.info(
        "encoding %d segments of %s to latents (%d process(es))", len(indices), dataset.root, world
    )
    mine = encode_corpus(
        codec, dataset, indices[rank::world], with_logvar, progress=progress and rank == 0
    )
    if world == 1:
        write_cache(path, key, mine)
        return mine
    assert rt is not None
    part = path.with_suffix(f".part{rank}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(mine, part)
    rt.barrier()
    if rank == 0:
        parts = [
            torch.load(path.with_suffix(f".part{r}"), weights_only=False) for r in range(world)
        ]
        whole = torch.stack([parts[i % world][i // world] for i in range(len(indices))])
        write_cache(path, key, whole)
        for r in range(world):
            path.with_suffix(f".part{r}").unlink()
    rt.barrier()
    latents = read_cache(path, key, with_logvar)
    assert latents is not None
    return latents


class LatentSet(Dataset[Tensor]):
    """Precomputed latents as a dataset: item ``i`` is ``latents[i]``."""

    def __init__(self, latents: Tensor) -> None:
        self.latents = latents

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> Tensor:
        return self.latents[index]
