"""The official hertz-dev checkpoints: which files make up each variant, and how to check them.

The weights live in the Hugging Face model repository ``si-pbc/hertz-dev`` as plain ``state_dict``
``.pt`` files. Every variant uses the same codec and quantizer and differs in its resynthesizer and
AR trunk. The md5 sums are the ones the original loader checked.

Real files are gigabytes, so :func:`check_dir` only hashes when asked; presence and size are free.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

REPO_ID = "si-pbc/hertz-dev"
"""The Hugging Face model repository that holds the official checkpoint files."""

Role = Literal["codec", "quantizer", "resynthesizer", "ar"]

# 8 MiB: large enough to hash at disk speed, small enough to stay flat in memory
_MD5_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class CheckpointFile:
    """One checkpoint file in the repository.

    Attributes:
        name: File name in the repository and on disk, e.g. ``"inference_volcano_3.pt"``.
        md5: Expected md5 hex digest of the whole file.
        role: Which part of the model the file holds.
        approx_bytes: Estimated size on disk, for messages and disk-space hints only: never compared
            exactly. Estimated as parameter count x 2 bytes (bfloat16 storage assumed).
    """

    name: str
    md5: str
    role: Role
    approx_bytes: int


@dataclass(frozen=True)
class Variant:
    """A set of checkpoint files that together make one runnable model.

    Attributes:
        name: Variant name, e.g. ``"hertz-dev"``.
        split: True for the two-channel (duplex) model, False for the one-channel models.
        files: The files, one per role: codec, quantizer, resynthesizer, ar.
        description: One line for humans.
    """

    name: str
    split: bool
    files: tuple[CheckpointFile, ...]
    description: str

    def file(self, role: Role) -> CheckpointFile:
        """Return the file that plays ``role`` in this variant.

        Raises:
            KeyError: If no file has that role.
        """
        for f in self.files:
            if f.role == role:
                return f
        raise KeyError(f"variant {self.name!r} has no {role!r} file")

    @property
    def filenames(self) -> list[str]:
        """The file names, in registry order."""
        return [f.name for f in self.files]

    @property
    def approx_bytes(self) -> int:
        """Estimated total download size in bytes (see :attr:`CheckpointFile.approx_bytes`)."""
        return sum(f.approx_bytes for f in self.files)

    def with_md5(self, overrides: Mapping[str, str]) -> Variant:
        """Return a copy whose files take their md5 from ``overrides`` where given.

        ``overrides`` maps a file name to its md5.

        Meant for tests and private mirrors that serve different bytes under the official names.

        Raises:
            KeyError: If ``overrides`` names a file that is not part of this variant.
        """
        unknown = set(overrides) - set(self.filenames)
        if unknown:
            raise KeyError(f"not files of variant {self.name!r}: {sorted(unknown)}")
        files = tuple(dataclasses.replace(f, md5=overrides.get(f.name, f.md5)) for f in self.files)
        return dataclasses.replace(self, files=files)


# Parameter counts from ../shared/reference/keys_full.json, times 2 bytes, rounded to MB.
_CODEC = CheckpointFile(
    "inference_apatosaurus_95000.pt", "ba876edb97b988e9196e449dd176ca97", "codec", 188_000_000
)
_QUANTIZER = CheckpointFile(
    "inference_volcano_3.pt", "d42bf674022c5f84b051d5d7794f6169", "quantizer", 101_000_000
)
_RESYN_SPLIT = CheckpointFile(
    "inference_care_50000.pt", "e4ff4fe5c7e9f066410d2a5673b7a935", "resynthesizer", 3_277_000_000
)
_AR_SPLIT = CheckpointFile(
    "inference_scion_54000.pt", "cb8bc484423922747b277ebc2933af5d", "ar", 13_490_000_000
)
_RESYN_MONO = CheckpointFile(
    "inference_whip_72000.pt", "5e7cee7316900737d55fc5d44cc7a8f7", "resynthesizer", 3_260_000_000
)
_AR_MONO_TEXT = CheckpointFile(
    "inference_caraway_112000.pt", "fcb8368ef8ebf7712f3e31e6856da580", "ar", 13_222_000_000
)
_AR_MONO_AUDIO = CheckpointFile(
    "inference_syrup_110000.pt", "353c48f553f1706824c11f3bb6a049e9", "ar", 13_222_000_000
)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "hertz-dev",
            split=True,
            files=(_CODEC, _QUANTIZER, _RESYN_SPLIT, _AR_SPLIT),
            description="two-channel (full-duplex) model: listens on one channel while speaking on "
            "the other",
        ),
        Variant(
            "hertz-dev-mono",
            split=False,
            files=(_CODEC, _QUANTIZER, _RESYN_MONO, _AR_MONO_TEXT),
            description="one-channel model, AR trunk initialised from a text language model",
        ),
        Variant(
            "hertz-dev-mono-audio",
            split=False,
            files=(_CODEC, _QUANTIZER, _RESYN_MONO, _AR_MONO_AUDIO),
            description="one-channel model, AR trunk trained on audio only",
        ),
    )
}
"""Every official variant, by name."""

CODEC_ONLY = Variant(
    "codec",
    split=False,
    files=(_CODEC,),
    description="the codec alone (95 M parameters): `encode`, `decode` and `load_codec()` only",
)
"""Only the official codec file: what ``hertz-agents download --variant codec`` fetches."""

DOWNLOADS: dict[str, Variant] = {**VARIANTS, CODEC_ONLY.name: CODEC_ONLY}
"""Everything ``hertz-agents download`` can fetch: the full variants and the codec alone."""

CODEC_FILE = _CODEC.name
"""The official codec file's name; a directory holding only it serves the codec."""


def get_variant(name: str) -> Variant:
    """Look up a downloadable set of official files by name.

    Args:
        name: One of the keys of :data:`DOWNLOADS` (the full variants of :data:`VARIANTS`, or
            ``"codec"``).

    Raises:
        KeyError: If the name is unknown; the message lists the known names.
    """
    try:
        return DOWNLOADS[name]
    except KeyError:
        known = ", ".join(DOWNLOADS)
        raise KeyError(f"unknown hertz-dev variant {name!r}; known variants: {known}") from None


def md5_file(path: str | Path, progress: bool = False) -> str:
    """Compute a file's md5 hex digest, reading it in chunks so memory stays flat.

    Args:
        path: The file to hash.
        progress: Show a tqdm bar (worth it for multi-GB checkpoints).

    Returns:
        The lowercase hex digest.
    """
    path = Path(path)
    digest = hashlib.md5(usedforsecurity=False)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"md5 {path.name}")
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_MD5_CHUNK):
                digest.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest()


FileState = Literal["missing", "present", "ok", "bad"]


@dataclass(frozen=True)
class FileStatus:
    """What :func:`check_dir` found for one checkpoint file.

    Attributes:
        file: The registry entry.
        path: Where the file should be.
        size: Size on disk in bytes, None when the file is missing.
        md5: The md5 actually computed, None when missing or not computed.
    """

    file: CheckpointFile
    path: Path
    size: int | None
    md5: str | None

    @property
    def present(self) -> bool:
        """Whether the file exists."""
        return self.size is not None

    @property
    def md5_ok(self) -> bool | None:
        """True or False once an md5 was computed, None when it was not."""
        return None if self.md5 is None else self.md5 == self.file.md5

    @property
    def state(self) -> FileState:
        """``missing``; ``present`` (not hashed); ``ok`` or ``bad`` (hashed)."""
        if not self.present:
            return "missing"
        if self.md5_ok is None:
            return "present"
        return "ok" if self.md5_ok else "bad"

    def describe(self) -> str:
        """One human-readable line, e.g. ``inference_volcano_3.pt: ok (101.2 MB)``."""
        text = f"{self.file.name}: {self.state}"
        if self.size is not None:
            text += f" ({self.size / 1e6:.1f} MB)"
        if self.state == "bad":
            text += f", md5 {self.md5}, expected {self.file.md5}"
        return text


def check_dir(
    path: str | Path, variant: str | Variant, *, md5: bool = False, progress: bool = False
) -> list[FileStatus]:
    """Report which of a variant's files are in a directory, optionally checking their md5.

    Args:
        path: The checkpoint directory.
        variant: A variant name or :class:`Variant`.
        md5: Hash every present file (reads every byte: minutes for the real files).
        progress: Show a progress bar while hashing.

    Returns:
        One :class:`FileStatus` per file, in registry order.
    """
    v = get_variant(variant) if isinstance(variant, str) else variant
    statuses = []
    for f in v.files:
        p = Path(path) / f.name
        size = p.stat().st_size if p.is_file() else None
        digest = md5_file(p, progress=progress) if md5 and size is not None else None
        statuses.append(FileStatus(file=f, path=p, size=size, md5=digest))
    return statuses
