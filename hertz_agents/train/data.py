"""Fixed-length audio segments from a folder of recordings, for training and validation.

A corpus is a folder of audio files (WAV, FLAC, OGG, MP3; anything libsndfile reads). With
`channels=2` every file must be stereo with one speaker per channel, the layout hertz-dev's
two-channel model trains on; with `channels=1` stereo files are mixed down to mono. Files are
resampled to the codec's rate on the fly.

The scan at construction reads every file once: files that cannot be decoded, are shorter than
one segment, or are silent are logged and listed in `dataset.skipped`, and never reach training.
After the scan only the needed span of a file is decoded for each segment.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

log = logging.getLogger(__name__)
T = TypeVar("T")

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif")
SILENCE_RMS = 10 ** (-60 / 20)
"""Whole-file RMS (full scale 1.0) below which a file, or a channel of a stereo file, is silent."""
_RESAMPLE_MARGIN = 64  # extra source frames read so the resampler's tail covers the segment


@dataclass(frozen=True)
class AudioFile:
    """A file that passed the scan."""

    path: Path
    sample_rate: int  # the file's own rate
    frames: int  # the file's length at its own rate
    channels: int  # the file's own channel count


class AudioSegmentDataset(Dataset[torch.Tensor]):
    """Segments of `segment_seconds` from every usable file under `root`, as `[channels, samples]`.

    Each file gives `length // segment` items, so long files weigh in proportion to their length.
    With `random_crop=True` (training) each item is a crop at a random offset, drawn from
    `(seed, epoch, index)`: reproducible, the same for any number of loader workers, and new each
    epoch once `set_epoch` is called (`set_epoch(loader, epoch)` below does it). With
    `random_crop=False` (validation) file k's items are its consecutive segments from the start,
    the same every time.

    Args:
        root: Folder searched recursively for audio files, or a single file.
        channels: 2 for two-speaker stereo (mono files are skipped), 1 to mix down to mono.
        segment_seconds: Segment length, rounded down to whole model steps.
        sample_rate: Output rate; files at other rates are resampled.
        random_crop: Random offsets (training) or fixed consecutive segments (validation).
        seed: Seed of the random crops.
        silence_rms: Files (and, for `channels=2`, single channels) quieter than this are skipped.
        extensions: File name endings treated as audio.

    Attributes:
        files: The files in use.
        skipped: `(path, reason)` for every file left out.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        channels: int = 1,
        segment_seconds: float = 6.0,
        sample_rate: int = SAMPLE_RATE,
        random_crop: bool = True,
        seed: int = 0,
        *,
        silence_rms: float = SILENCE_RMS,
        extensions: tuple[str, ...] = AUDIO_EXTENSIONS,
    ) -> None:
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        steps = int(segment_seconds * sample_rate) // SAMPLES_PER_STEP
        if steps < 1:
            raise ValueError(f"segment_seconds={segment_seconds} is shorter than one model step")
        self.root = Path(root)
        self.channels = channels
        self.sample_rate = sample_rate
        self.segment = steps * SAMPLES_PER_STEP  # samples per item at `sample_rate`
        self.random_crop = random_crop
        self.seed = seed
        self.epoch = 0
        self.silence_rms = silence_rms
        self.files: list[AudioFile] = []
        self.skipped: list[tuple[Path, str]] = []
        # item i is segment i - _starts[k] of file k, for the last k with _starts[k] <= i
        starts = [0]
        for path in _find_audio(self.root, extensions):
            info, reason = self._check(path)
            if info is None:
                self.skipped.append((path, reason))
                log.warning("skipping %s: %s", path, reason)
                continue
            self.files.append(info)
            starts.append(starts[-1] + self._frames_out(info) // self.segment)
        self._starts = np.asarray(starts, dtype=np.int64)
        if not self.files:
            log.warning("no usable audio under %s (%d files skipped)", self.root, len(self.skipped))

    # --- scanning --------------------------------------------------------------------------------

    def _frames_out(self, f: AudioFile) -> int:
        return f.frames * self.sample_rate // f.sample_rate

    def _check(self, path: Path) -> tuple[AudioFile | None, str]:
        """Read the header, then decode the whole file once in blocks to measure its level.

        Decoding everything here (not just the header) also catches files whose header is
        fine but whose data is truncated or corrupt, which would otherwise fail mid-training.
        """
        try:
            info = sf.info(str(path))
        except Exception as e:  # libsndfile raises RuntimeError/LibsndfileError/TypeError
            return None, f"unreadable ({e})"
        if info.channels != 2 and self.channels == 2:
            return (
                None,
                f"{info.channels} channel(s); channels=2 needs stereo, one speaker per channel",
            )
        f = AudioFile(path, info.samplerate, info.frames, info.channels)
        if self._frames_out(f) < self.segment:
            return None, (
                f"shorter than one segment ({info.frames / info.samplerate:.2f} s "
                f"< {self.segment / self.sample_rate:.2f} s)"
            )
        try:
            power, frames = np.zeros(info.channels), 0
            for block in sf.blocks(str(path), blocksize=1 << 18, dtype="float32", always_2d=True):
                power += np.einsum("ij,ij->j", block, block)  # per-channel energy, [channels]
                frames += len(block)
        except Exception as e:
            return None, f"unreadable data ({e})"
        if frames < info.frames * 0.99:  # mp3 headers may estimate the length slightly
            return None, f"truncated ({frames} of {info.frames} frames decode)"
        rms = np.sqrt(power / max(frames, 1))
        if np.sqrt(np.mean(rms**2)) < self.silence_rms:
            return (
                None,
                f"silent (RMS {float(np.sqrt(np.mean(rms**2))):.2e} < {self.silence_rms:.0e})",
            )
        if self.channels == 2 and rms.min() < self.silence_rms:
            return None, f"channel {int(rms.argmin())} is silent (RMS {rms.min():.2e})"
        return AudioFile(path, info.samplerate, min(frames, info.frames), info.channels), ""

    # --- items -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts[-1])

    def set_epoch(self, epoch: int) -> None:
        """Draw new random crops for `epoch` (no effect in validation mode)."""
        self.epoch = epoch

    def locate(self, index: int) -> tuple[AudioFile, int]:
        """The file and the start offset (in output samples) of item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        f = self.files[k]
        if self.random_crop:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            offset = int(rng.integers(0, self._frames_out(f) - self.segment + 1))
        else:
            offset = (index - int(self._starts[k])) * self.segment
        return f, offset

    def __getitem__(self, index: int) -> torch.Tensor:
        f, offset = self.locate(index)
        audio = self.read(f, offset)  # [samples, file channels]
        if self.channels == 1:
            audio = audio.mean(axis=1, keepdims=True)
        return torch.from_numpy(np.ascontiguousarray(audio.T))  # [channels, samples]

    def read(self, f: AudioFile, offset: int) -> np.ndarray:
        """Decode one segment starting `offset` output samples into `f`: `[segment, file channels]`.

        Only the span needed is decoded (soundfile seeks), then resampled if the rates differ.
        """
        if f.sample_rate == self.sample_rate:
            audio = sf.read(
                str(f.path), start=offset, frames=self.segment, dtype="float32", always_2d=True
            )[0]
        else:
            start = offset * f.sample_rate // self.sample_rate
            frames = math.ceil(self.segment * f.sample_rate / self.sample_rate) + _RESAMPLE_MARGIN
            audio = sf.read(
                str(f.path), start=start, frames=frames, dtype="float32", always_2d=True
            )[0]
            audio = soxr.resample(audio, f.sample_rate, self.sample_rate)
            audio = np.ascontiguousarray(audio[: self.segment], dtype=np.float32)
        if len(audio) < self.segment:  # at most a few samples at the very end of a file
            audio = np.pad(audio, ((0, self.segment - len(audio)), (0, 0)))
        return audio


def _find_audio(root: Path, extensions: tuple[str, ...]) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    for path in sorted(root.rglob("*")):
        if (
            path.is_file()
            and path.name.lower().endswith(extensions)
            and not path.name.startswith(".")
        ):
            yield path


def make_loader(
    dataset: Dataset[T],
    batch_size: int,
    workers: int = 0,
    shuffle: bool = True,
    distributed: bool | None = None,
    *,
    drop_last: bool | None = None,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader[T]:
    """A DataLoader of `[batch, channels, samples]` batches.

    Args:
        dataset: Usually an `AudioSegmentDataset`.
        batch_size: Items per batch (per process when distributed).
        workers: Loader worker processes; 0 loads in the calling process.
        shuffle: Shuffle the order every epoch (training) or keep it (validation).
        distributed: Shard across processes with a DistributedSampler. `None` (the default)
            shards exactly when `torch.distributed` is initialised.
        drop_last: Drop a final short batch; defaults to `shuffle` (training wants equal
            batches, validation wants every item).
        seed: Shuffle seed for the distributed sampler (the same on every process).
        pin_memory: Pin batches for faster copies to a GPU.

    Call `set_epoch(loader, epoch)` at the start of each epoch.
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if drop_last is None:
        drop_last = shuffle
    sampler: DistributedSampler[T] | None = (
        DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        if distributed
        else None
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,  # workers must be rebuilt to see the dataset's new epoch
    )


def set_epoch(loader: DataLoader[Any], epoch: int) -> None:
    """New random crops and, when distributed, a new shard order, for `epoch`."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
