"""A run folder belongs to one run: claiming it, and the run's own list of its checkpoints.

A fresh run never writes into a folder that holds another run's checkpoints, log or result
(unless ``overwrite``, which clears them first), so it cannot prune the other run's checkpoints
or point ``latest`` at them. Each checkpoint the run writes is recorded in
``checkpoints/index.json``; pruning deletes only recorded checkpoints, oldest step first, and
never the one ``latest`` names. A resumed run keeps the records up to the step it resumed from
(later ones belong to the future it abandoned and are left alone).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest"
INDEX = "index.json"
MARKER = "run.json"
OWNED = ("checkpoints", "log.jsonl", "final", "curves.png", "samples", "best", MARKER)
"""What a run writes in its folder and ``overwrite`` clears (``latents/`` is a cache keyed by
its contents and stays)."""


class RunFolderError(RuntimeError):
    """The folder holds another run, or has no checkpoint to resume (one line, what to do)."""


def step_of(name: str) -> int:
    """``step_0000040`` -> 40."""
    return int(name.rsplit("_", 1)[1])


def has_checkpoint(out_dir: Path) -> bool:
    """Whether the run folder ``out_dir`` names a latest checkpoint."""
    return (out_dir / CHECKPOINTS / LATEST).exists()


def other_run(out_dir: Path) -> str:
    """What in ``out_dir`` shows another run was there ("" when nothing)."""
    ckpts = (
        sorted((out_dir / CHECKPOINTS).glob("step_*")) if (out_dir / CHECKPOINTS).is_dir() else []
    )
    if ckpts:
        return f"checkpoints up to {ckpts[-1].name}"
    for name in ("final", "log.jsonl", MARKER):
        if (out_dir / name).exists():
            return name
    return ""


def refuse_other_run(out_dir: Path, *, resuming: bool, overwrite: bool = False) -> None:
    """Raise :class:`RunFolderError` when a fresh run would share ``out_dir`` with another run.

    Not with ``overwrite``. Touches nothing: safe before any work.
    """
    found = "" if resuming or overwrite else other_run(out_dir)
    if found:
        raise RunFolderError(
            f"{out_dir} holds another run ({found}): continue it with --resume, choose another "
            "run.out_dir, or pass --overwrite to replace it"
        )


def claim(out_dir: Path, *, resuming: bool, overwrite: bool = False) -> None:
    """Make ``out_dir`` this run's (rank 0 only).

    Fresh: refuse a folder with another run in it unless ``overwrite`` (which clears it);
    resumed: keep it.
    """
    refuse_other_run(out_dir, resuming=resuming, overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        for name in OWNED:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        (out_dir / MARKER).write_text(json.dumps({"run": uuid.uuid4().hex, "started": time.time()}))
    elif not (out_dir / MARKER).exists():
        (out_dir / MARKER).write_text(json.dumps({"run": uuid.uuid4().hex, "started": time.time()}))


class CheckpointIndex:
    """The steps this run checkpointed, in ``<out_dir>/checkpoints/index.json``."""

    def __init__(self, out_dir: Path) -> None:
        self.root = out_dir / CHECKPOINTS
        self.path = self.root / INDEX

    def steps(self) -> list[int]:
        """The steps of this run's checkpoints, in order."""
        if not self.path.exists():
            return []
        return sorted(json.loads(self.path.read_text())["steps"])

    def _write(self, steps: list[int]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"steps": sorted(set(steps))}))
        tmp.replace(self.path)

    def resumed_at(self, step: int) -> None:
        """Forget records after ``step``: a resumed run rewrites that future itself."""
        self._write([s for s in self.steps() if s <= step] + [step])

    def add(self, step: int) -> None:
        """Record a checkpoint written at ``step``."""
        self._write([*self.steps(), step])

    def prune(self, keep: int) -> list[Path]:
        """Delete this run's oldest checkpoints beyond ``keep``; never the one ``latest`` names."""
        latest = (self.root / LATEST).read_text().strip() if (self.root / LATEST).exists() else ""
        steps = self.steps()
        doomed = [s for s in steps[: -max(1, keep)] if f"step_{s:07d}" != latest]
        removed = []
        for s in doomed:
            path = self.root / f"step_{s:07d}"
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        self._write([s for s in steps if s not in doomed])
        return removed


def resolve_resume(arg: str | None, out_dir: Path, *, if_any: bool = False) -> Path | None:
    """The checkpoint or run folder to resume from.

    ``"latest"``: this run folder's latest checkpoint, an error when there is none unless
    ``if_any`` (then a fresh start).
    """
    if arg is None:
        return None
    if arg == LATEST:
        if has_checkpoint(out_dir):
            return out_dir
        if if_any:
            return None
        raise RunFolderError(
            f"--resume: {out_dir} has no checkpoint to resume; drop --resume to start fresh, "
            "or pass --resume-if-any to start fresh when there is none"
        )
    path = Path(arg)
    if not ((path / "trainer.pt").exists() or has_checkpoint(path)):
        raise RunFolderError(
            f"--resume {arg}: not a checkpoint folder (no trainer.pt) nor a run folder"
        )
    return path
