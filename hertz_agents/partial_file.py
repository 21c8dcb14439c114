"""Where an unfinished download of one file waits for the next run (``dest/.partial``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
"""Sub-directory of the destination that holds interrupted transfers for a later run to finish."""


@dataclass(frozen=True)
class PartialFile:
    """Where an unfinished transfer of one file lives between runs.

    Attributes:
        data: The bytes received so far, ``dest/.partial/<name>.part``.
        sidecar: JSON ``{"etag": ..., "size": ...}`` of the remote file those bytes belong to.
        lock: Keeps two processes from appending to the same ``data`` at once.
    """

    data: Path
    sidecar: Path
    lock: Path

    @classmethod
    def of(cls, dest: Path, name: str) -> PartialFile:
        """The partial transfer of file ``name`` downloading into ``dest``."""
        folder = dest / PARTIAL_DIR
        return cls(folder / f"{name}.part", folder / f"{name}.json", folder / f"{name}.lock")

    def size(self) -> int:
        """Bytes kept so far (0 when there is no partial file)."""
        return self.data.stat().st_size if self.data.is_file() else 0

    def resume_offset(self, etag: str, size: int | None) -> int:
        """How many kept bytes to resume from for the remote file ``(etag, size)``.

        Bytes recorded for another remote file (its etag or size changed), or more bytes than the
        file has, are discarded and 0 is returned; the sidecar then names the new remote file.
        """
        try:
            recorded = json.loads(self.sidecar.read_text())
        # No sidecar, or one torn by a crash: its bytes cannot be trusted.
        except (OSError, ValueError):
            recorded = None
        have = self.size()
        if recorded == {"etag": etag, "size": size} and (size is None or have <= size):
            return have
        if have:
            logger.info(
                "%s: the remote file changed; discarding %d bytes of an earlier transfer",
                self.data.stem,
                have,
            )
        self.data.unlink(missing_ok=True)
        self.sidecar.write_text(json.dumps({"etag": etag, "size": size}))
        return 0

    def discard(self) -> None:
        """Delete the kept bytes and their sidecar."""
        self.data.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)

    def tidy(self) -> None:
        """Once the lock is released: remove the lock file and a sidecar without bytes.

        ``.partial`` itself goes once it is empty.

        Best effort. Kept bytes and their sidecar stay for the next run.
        """
        if not self.data.exists():
            self.sidecar.unlink(missing_ok=True)
        self.lock.unlink(missing_ok=True)
        try:
            self.data.parent.rmdir()
        except OSError:  # other files still in progress, or another process is using it
            pass


def kept_note(partial: PartialFile) -> str:
    """A sentence for error messages: how much of the file was kept for the next run, if any."""
    have = partial.size()
    if not have:
        return ""
    amount = (
        f"{have / 1e9:.2f} GB"
        if have >= 1e9
        else f"{have / 1e6:.1f} MB"
        if have >= 1e6
        else f"{have} bytes"
    )
    return (
        f" The {amount} received so far are kept in {partial.data}; "
        "the next run resumes from there."
    )
