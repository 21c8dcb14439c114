"""Options several commands share, and the checks that run before any long work starts."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from hertz_agents.errors import HertzError

# Names only: the parser is built without importing torch, so --help and argument errors are quick.
DTYPES = ("bfloat16", "float16", "float32")

# Output extension -> libsndfile container. Only what soundfile can write on this machine counts.
AUDIO_FORMATS = {
    ".wav": "WAV",
    ".flac": "FLAC",
    ".ogg": "OGG",
    ".mp3": "MP3",
    ".aiff": "AIFF",
    ".aif": "AIFF",
    ".au": "AU",
    ".caf": "CAF",
    ".w64": "W64",
    ".rf64": "RF64",
}
# SamplingSettings' default temperatures (the original's), here so that building the parser does
# not import torch; tests/test_cli.py checks that the two agree.
DEFAULT_TEMPS = (0.8, 0.5, 0.1)
# SamplingSettings' field names -> the options that set them, for error messages.
_SAMPLING_OPTIONS = {
    "token_temp": "--temps TOKEN",
    "categorical_temp": "--temps CATEGORICAL",
    "gaussian_temp": "--temps GAUSSIAN",
    "top_p": "--top-p",
    "min_p": "--min-p",
}


def add_model_options(parser: argparse.ArgumentParser, default: str = "default") -> None:
    """Add ``--model``, ``--device`` and ``--dtype`` to ``parser``."""
    parser.add_argument(
        "--model",
        "-m",
        default=default,
        metavar="MODEL",
        help=f"variant name, 'default', or a checkpoint directory (default: {default})",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU"
    )


def torch_dtype(name: str | None):
    """``--dtype`` as a torch dtype (None: the device's default)."""
    import torch

    return getattr(torch, name) if name else None


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Add the sampling options (``--temps``, ``--top-p``, ``--min-p`` ...) to ``parser``."""
    token, categorical, gaussian = DEFAULT_TEMPS
    parser.add_argument(
        "--temps",
        type=float,
        nargs=3,
        metavar=("TOKEN", "CATEGORICAL", "GAUSSIAN"),
        default=DEFAULT_TEMPS,
        help="token temperature, then the mixture's categorical and gaussian temperatures "
        f"(default: {token} {categorical} {gaussian}, the original's)",
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling of tokens, e.g. 0.9"
    )
    parser.add_argument(
        "--min-p", type=float, default=None, help="min-p sampling of tokens, e.g. 0.05"
    )


def sampling_from(args: argparse.Namespace):
    """The sampling options as settings; a value out of range is a user error naming its option."""
    from hertz_agents.sampling import SamplingSettings

    token, categorical, gaussian = args.temps
    try:
        return SamplingSettings(token, categorical, gaussian, top_p=args.top_p, min_p=args.min_p)
    except ValueError as e:
        message = str(e)
        for field, option in _SAMPLING_OPTIONS.items():
            message = re.sub(rf"\b{field}\b", option, message)
        raise HertzError(message) from None


def check_device(args: argparse.Namespace) -> None:
    """Refuse a device this machine does not have before loading anything."""
    from hertz_agents.checkpoint import resolve_device

    resolve_device(args.device)


def _check_not_a_folder(path: Path, option: str) -> None:
    if path.is_dir():
        raise HertzError(f"{option} {path} is a folder; give a file name")


def _check_folder(path: Path, option: str) -> None:
    folder = path.parent
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise HertzError(
            f"{option} {path}: the folder {folder} {what}; create it first (mkdir -p {folder})"
        )


@dataclass(frozen=True)
class AudioOutput:
    """Where and how a command writes audio: checked before the work starts."""

    path: Path
    format: str
    subtype: str


def audio_output(name: str, option: str = "--out") -> AudioOutput:
    """Check an output audio file name up front: an existing folder and a known extension.

    The format follows the extension; float samples where the format has them (WAV, AIFF...),
    else the format's usual encoding (16-bit FLAC, Vorbis, MP3).

    Raises:
        HertzError: The folder is missing or the extension is not an audio format.
    """
    import soundfile as sf

    path = Path(name)
    _check_not_a_folder(path, option)
    available = sf.available_formats()
    known = {ext: fmt for ext, fmt in AUDIO_FORMATS.items() if fmt in available}
    fmt = known.get(path.suffix.lower())
    if fmt is None:
        listed = ", ".join(sorted(set(known)))
        raise HertzError(
            f"{option} {name}: unknown audio extension {path.suffix or '(none)'!r}; "
            f"use one of {listed}"
        )
    _check_folder(path, option)
    subtype = "FLOAT" if sf.check_format(fmt, "FLOAT") else sf.default_subtype(fmt)
    return AudioOutput(path, fmt, subtype)


def npy_output(name: str, option: str = "--out") -> Path:
    """Check an output ``.npy`` name up front (numpy would silently append ``.npy`` to others)."""
    path = Path(name)
    _check_not_a_folder(path, option)
    if path.suffix.lower() != ".npy":
        raise HertzError(
            f"{option} {name}: latents are written as .npy; name the file e.g. {path.stem}.npy"
        )
    _check_folder(path, option)
    return path


def load(args: argparse.Namespace):
    """Load the model that ``--model``, ``--device`` and ``--dtype`` name."""
    from hertz_agents.checkpoint import load_model

    return load_model(args.model, device=args.device, dtype=torch_dtype(args.dtype))


def load_codec_of(args: argparse.Namespace):
    """Load only the codec of the model that ``--model`` names, on ``--device`` and ``--dtype``."""
    from hertz_agents.checkpoint import load_codec

    return load_codec(args.model, device=args.device, dtype=torch_dtype(args.dtype))


def check_sink(args: argparse.Namespace) -> None:
    """Refuse ``--sink`` unless the calls will have a ring cache (``--rollover`` or the model's).

    Checked before the model loads, so a server says so at once instead of from its engine.
    """
    if not args.sink or args.rollover == "ring":
        return
    rollover = args.rollover
    if rollover is None:
        from hertz_agents.checkpoint import read_config, resolve_model_dir

        try:
            rollover = read_config(resolve_model_dir(args.model)[0])[0].serving.rollover
        except (HertzError, ValueError, OSError):
            return  # loading the model reports what is wrong with it
    if rollover != "ring":
        raise HertzError(
            f"--sink keeps positions in a ring cache, and {args.model}'s calls would roll over "
            f"by {rollover}: add --rollover ring"
        )
