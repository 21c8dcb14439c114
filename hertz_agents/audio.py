"""Audio in and out of the core: reading and writing files, validating PCM, level helpers.

Two layouts appear, and every function says which it takes:

- files and prompts are channels-first, ``[C, N]`` (``read_audio``, ``write_audio``);
- live PCM is frames-first, ``[n, C]``, the interleaved order of ``bytes`` (``to_float32``).

Everything returned is float32 in [-1, 1] (int16 is scaled by 1/32768).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from hertz_agents.errors import AudioInputError
from hertz_agents.timing import SAMPLE_RATE

PathLike = str | os.PathLike[str]

RESAMPLE_QUALITY = "HQ"
"""soxr quality for whole files: 'HQ' is 20-bit precision, flat to ~95% of Nyquist (live streams use
the
low-latency polyphase resampler, see docs/audio.md)."""

INT16_SCALE = 32768.0
"""int16 full scale: ``float = int16 / INT16_SCALE``."""

MAX_FLOAT_AMPLITUDE = 64.0
"""Float input louder than this is rejected: it is almost surely int16 values stored as floats."""

MAX_FILE_CHANNELS = 64
"""``write_audio`` refuses more channels than this: the array is probably ``[N, C]``, not
``[C, N]``."""


def check_sample_rate(sample_rate: float, what: str = "sample_rate") -> int:
    """Return ``sample_rate`` as a positive int, or raise AudioInputError saying what to pass."""
    try:
        rate = int(sample_rate)
    except (TypeError, ValueError):
        rate = 0
    if rate <= 0 or rate != sample_rate:
        raise AudioInputError(
            f"{what} must be a positive whole number of Hz (e.g. 16000, 48000), "
            f"got {sample_rate!r}."
        )
    return rate


def check_finite(audio: np.ndarray, where: str = "audio") -> None:
    """Raise AudioInputError if ``audio`` holds NaN or inf (they would poison the model's state)."""
    if audio.size and not np.isfinite(audio).all():
        bad = int(audio.size - np.count_nonzero(np.isfinite(audio)))
        raise AudioInputError(
            f"{where} contains {bad} NaN/inf sample(s); send finite float samples in [-1, 1] "
            "(replace them, e.g. with np.nan_to_num, before sending)."
        )


def check_channels(channels: int) -> int:
    """Return ``channels`` as a positive int, or raise AudioInputError."""
    if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool) or channels < 1:
        raise AudioInputError(
            f"channels must be a positive int (1 for mono, 2 for stereo), got {channels!r}."
        )
    return int(channels)


def to_float32(pcm: bytes | bytearray | memoryview | np.ndarray, channels: int = 1) -> np.ndarray:
    """Turn live PCM into validated float32 frames ``[n, channels]``.

    Args:
        pcm: ``bytes``-like int16 little-endian PCM (interleaved when ``channels > 1``), or a numpy
            array of int16 or float (in [-1, 1]) shaped ``[n]`` (interleaved when ``channels > 1``)
            or ``[n, channels]``.
        channels: Number of interleaved channels in ``pcm``.

    Returns:
        float32 ``[n, channels]``, C-contiguous. It may share memory with a float32 input.

    Raises:
        AudioInputError: odd byte count, a length that is not whole frames, a wrong shape or dtype,
            NaN/inf, or float samples that look int16-scaled.
    """
    channels = check_channels(channels)
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        raw = memoryview(pcm).cast("B")
        if raw.nbytes % 2:
            raise AudioInputError(
                f"int16 PCM bytes must have an even length (2 bytes a sample), "
                f"got {raw.nbytes} bytes; "
                "send whole samples."
            )
        arr: np.ndarray = np.frombuffer(raw, dtype="<i2")
    elif isinstance(pcm, np.ndarray):
        arr = pcm
    else:
        raise AudioInputError(
            f"audio must be int16 PCM bytes or a numpy array, got {type(pcm).__name__}; "
            "convert it with np.asarray(...) first."
        )

    if arr.dtype.kind == "i" and arr.dtype.itemsize == 2:  # int16, either byte order
        out = arr.astype(np.float32) / np.float32(INT16_SCALE)
    elif np.issubdtype(arr.dtype, np.floating):
        out = np.asarray(arr, dtype=np.float32)
        check_finite(out)
        if out.size and float(np.max(np.abs(out))) > MAX_FLOAT_AMPLITUDE:
            raise AudioInputError(
                f"float audio peaks at {float(np.max(np.abs(out))):.0f}, far outside [-1, 1]; it "
                "looks like int16 values stored as floats: send them as int16, or divide by "
                f"{INT16_SCALE:.0f}."
            )
    else:
        raise AudioInputError(
            f"audio dtype {arr.dtype} is not supported; send int16 PCM or float32/float64 "
            "in [-1, 1]."
        )

    if out.ndim == 1:
        if out.shape[0] % channels:
            raise AudioInputError(
                f"{out.shape[0]} interleaved samples is not a whole number of "
                f"{channels}-channel frames; "
                "send whole frames."
            )
        out = out.reshape(-1, channels)
    elif out.ndim == 2:
        if out.shape[1] != channels:
            hint = " (it looks channels-first: pass audio.T)" if out.shape[0] == channels else ""
            raise AudioInputError(
                f"audio shaped {tuple(out.shape)} does not match channels={channels}; "
                f"send [n] or [n, {channels}]{hint}."
            )
    else:
        raise AudioInputError(
            f"audio must be shaped [n] or [n, channels], got {out.ndim} dims {out.shape}."
        )
    return np.ascontiguousarray(out)


def float_to_int16(audio: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16, the one conversion every part of hertz-agents uses.

    Scales by ``INT16_SCALE`` (the inverse of :func:`to_float32`), rounds to nearest and clips
    to the int16 range, so 1.0 becomes 32767 and -1.0 becomes -32768. Any shape.
    """
    scaled = np.asarray(audio, dtype=np.float32) * np.float32(INT16_SCALE)
    return np.rint(np.clip(scaled, -INT16_SCALE, INT16_SCALE - 1)).astype(np.int16)


def float_to_pcm16(audio: np.ndarray) -> bytes:
    """Float samples in [-1, 1] -> int16 little-endian PCM bytes (:func:`float_to_int16`)."""
    return float_to_int16(audio).astype("<i2", copy=False).tobytes()


def pcm16_to_float(data: bytes | bytearray | memoryview) -> np.ndarray:
    """int16 little-endian PCM bytes -> float32 ``[n]`` (unvalidated: for trusted, even lengths)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / np.float32(INT16_SCALE)


def mix_to_mono(audio: np.ndarray, *, channel_axis: int = -1) -> np.ndarray:
    """Average the channels of ``audio`` into float32 ``[n]``.

    Args:
        audio: ``[n, C]`` (``channel_axis=-1``, live PCM) or ``[C, n]`` (``channel_axis=0``, files).
            A 1-D array is already mono and is returned as float32.
        channel_axis: Axis that holds the channels.
    """
    audio = np.asarray(audio)
    if audio.ndim == 1:
        return audio.astype(np.float32, copy=False)
    if audio.ndim != 2:
        raise AudioInputError(f"mix_to_mono takes [n] or a 2-D array, got shape {audio.shape}.")
    if audio.shape[channel_axis] == 1:
        return np.ascontiguousarray(np.take(audio, 0, axis=channel_axis), dtype=np.float32)
    # Mean in float32: the sum of a few channels of [-1, 1] audio loses nothing that matters.
    return np.ascontiguousarray(audio.mean(axis=channel_axis, dtype=np.float32))


def rms(audio: np.ndarray) -> float:
    """Root mean square of all samples (0.0 for empty audio). A full-scale sine has RMS 0.707."""
    audio = np.asarray(audio)
    if audio.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


def dbfs(audio: np.ndarray, *, floor: float = -120.0) -> float:
    """RMS level in dB of full scale 1.0 (a full-scale sine is -3.01 dBFS), at least ``floor``."""
    level = rms(audio)
    if level <= 0.0:
        return floor
    return max(floor, 20.0 * float(np.log10(level)))


def _convert_channels(frames: np.ndarray, channels: int | None) -> np.ndarray:
    """``[N, C]`` -> ``[N, channels]``: duplicate mono, average to mono, or keep the first two."""
    have = frames.shape[1]
    if channels is None or channels == have:
        return frames
    if channels == 1:
        return frames.mean(axis=1, keepdims=True, dtype=np.float32)
    if channels == 2:
        if have == 1:
            return np.repeat(frames, 2, axis=1)
        # More than two: in WAV channel order the first two are front left and front right.
        return frames[:, :2]
    raise AudioInputError(f"channels must be None, 1 or 2, got {channels!r}.")


def read_audio(
    path: PathLike | BinaryIO,
    *,
    sample_rate: int = SAMPLE_RATE,
    channels: int | None = None,
    min_seconds: float = 0.0,
) -> np.ndarray:
    """Read an audio file as float32 ``[channels, samples]`` at ``sample_rate``.

    Reads WAV, FLAC, OGG/Vorbis/Opus, MP3 and the other formats libsndfile knows, as float (a float
    WAV is not quantized). Any rate is resampled with soxr (HQ).
    Channels: ``None`` keeps the file's;
    ``1`` averages all channels; ``2`` duplicates mono, or keeps the first two of a file with more
    (front left and right in WAV order).

    Args:
        path: File path, or a binary file object.
        sample_rate: Rate of the returned audio in Hz (default: the model's 16 kHz).
        channels: ``None``, ``1`` or ``2``.
        min_seconds: Raise if the file is shorter than this.

    Raises:
        AudioInputError: missing, unreadable or empty file, too short, NaN/inf samples.
    """
    sample_rate = check_sample_rate(sample_rate)
    if channels is not None and channels not in (1, 2):
        raise AudioInputError(f"channels must be None, 1 or 2, got {channels!r}.")
    name = repr(str(path)) if isinstance(path, (str, os.PathLike)) else "audio stream"
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if not p.exists():
            raise AudioInputError(f"audio file {name} does not exist; check the path.")
        if not p.is_file():
            raise AudioInputError(f"{name} is not a file; pass the path of an audio file.")
        if p.stat().st_size == 0:
            raise AudioInputError(
                f"audio file {name} is empty (0 bytes); record or export it again."
            )
    try:
        frames, file_rate = sf.read(path, dtype="float32", always_2d=True)  # [N, C]
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        raise AudioInputError(
            f"could not read {name} as audio ({exc}); use WAV, FLAC, OGG or MP3, "
            "and re-export the file if it is damaged."
        ) from exc
    if frames.shape[0] == 0 or frames.shape[1] == 0:
        raise AudioInputError(f"{name} holds no audio samples; record or export it again.")
    duration = frames.shape[0] / file_rate
    if duration < min_seconds:
        raise AudioInputError(
            f"{name} is {duration:.3f} s long, shorter than the {min_seconds:g} s needed; "
            "use a longer clip."
        )
    check_finite(frames, name)

    frames = _convert_channels(frames, channels)
    if file_rate != sample_rate:
        frames = soxr.resample(frames, file_rate, sample_rate, quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(frames.T, dtype=np.float32)  # [C, N]


def write_audio(
    path: PathLike | BinaryIO,
    audio: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    *,
    subtype: str = "FLOAT",
    format: str | None = None,
) -> None:
    """Write float audio ``[C, N]`` or ``[N]`` to a file (WAV unless the extension says otherwise).

    Args:
        path: Destination path or binary file object (give ``format`` for a file object).
        audio: float ``[C, N]`` (channels-first, as ``read_audio`` returns) or mono ``[N]``.
        sample_rate: Rate of ``audio`` in Hz.
        subtype: libsndfile subtype: ``"FLOAT"`` (lossless float32, the default) or ``"PCM_16"``
            (samples are clipped to [-1, 1] first, so loud peaks saturate instead of wrapping).
        format: Container (``"WAV"``, ``"FLAC"``...); default: from the file extension.

    Raises:
        AudioInputError: wrong shape, NaN/inf, or a bad sample rate.
    """
    sample_rate = check_sample_rate(sample_rate)
    audio = np.asarray(audio)
    if audio.ndim == 1:
        audio = audio[None, :]
    if audio.ndim != 2:
        raise AudioInputError(f"write_audio takes [C, N] or [N], got shape {audio.shape}.")
    if audio.shape[0] > MAX_FILE_CHANNELS:
        raise AudioInputError(
            f"audio shaped {audio.shape} would have {audio.shape[0]} channels; "
            "write_audio takes channels-first [C, N] (pass audio.T)."
        )
    frames = np.ascontiguousarray(audio.T, dtype=np.float32)  # [N, C]
    check_finite(frames)
    if subtype.upper().startswith("PCM"):
        frames = np.clip(frames, -1.0, 1.0)
    if format is None and not isinstance(path, (str, os.PathLike)):
        format = "WAV"
    sf.write(path, frames, sample_rate, subtype=subtype, format=format)


__all__ = [
    "INT16_SCALE",
    "RESAMPLE_QUALITY",
    "check_channels",
    "check_finite",
    "check_sample_rate",
    "dbfs",
    "mix_to_mono",
    "read_audio",
    "rms",
    "to_float32",
    "write_audio",
]
