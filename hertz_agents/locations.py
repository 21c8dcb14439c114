"""Where models live: the default model, the official variants, and any other directory.

* ``default`` (hertz-small, the project's small CPU model) is found, in this order, in
  ``$HERTZ_AGENTS_CKPT/hertz-small``, in a source checkout's ``ckpt/hertz-small``, and in the
  ``hertz-agents-small`` distribution that every install of hertz-agents depends on (package
  data, so it works from a wheel in any directory with no network).
* The official variants (``hertz-dev``...) and the codec alone (``codec``) live in
  ``ckpt_root()/NAME``: ``$HERTZ_AGENTS_CKPT`` when set, else the checkout's ``ckpt/``, else
  ``~/.cache/hertz-agents/ckpt`` (``$XDG_CACHE_HOME`` honoured) for an installed package.
* Anything else is a checkpoint directory given by path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hertz_agents.errors import ModelNotFound
from hertz_agents.registry import DOWNLOADS, Variant

CKPT_ENV = "HERTZ_AGENTS_CKPT"
DEFAULT_MODEL = "default"
DEFAULT_DIR_NAME = "hertz-small"
DEFAULT_PACKAGE = "hertz-agents-small"

_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def checkout_ckpt() -> Path | None:
    """The ``ckpt/`` of the source checkout this code runs from, or None for an installed wheel."""
    if (_SOURCE_ROOT / "pyproject.toml").is_file() and (_SOURCE_ROOT / "ckpt").is_dir():
        return _SOURCE_ROOT / "ckpt"
    return None


def user_ckpt() -> Path:
    """Where an installed package keeps downloaded models: ``~/.cache/hertz-agents/ckpt``."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "hertz-agents" / "ckpt"


def ckpt_root() -> Path:
    """Where named models live: ``$HERTZ_AGENTS_CKPT``, the checkout's ``ckpt/``, or user_ckpt()."""
    env = os.environ.get(CKPT_ENV)
    if env:
        return Path(env).expanduser()
    return checkout_ckpt() or user_ckpt()


def _root_source() -> str:
    if os.environ.get(CKPT_ENV):
        return f"${CKPT_ENV}"
    return "the checkout's ckpt/" if checkout_ckpt() else "the user's model folder"


def bundled_default_dir() -> Path | None:
    """hertz-small inside the installed ``hertz-agents-small`` distribution, if installed."""
    try:
        from hertz_agents_small import MODEL_DIR
    except ImportError:
        return None
    return MODEL_DIR if MODEL_DIR.is_dir() else None


@dataclass(frozen=True)
class ModelLocation:
    """Where a model name points.

    Attributes:
        name: The name or path as given.
        directory: The checkpoint directory (it may not exist: see :attr:`present`).
        variant: The official file set the name refers to (a variant or the codec alone), or None.
        source: Why this directory, in words for ``hertz-agents info`` and error messages.
    """

    name: str
    directory: Path
    variant: Variant | None
    source: str

    @property
    def present(self) -> bool:
        """Whether the directory exists."""
        return self.directory.is_dir()


def _default_location() -> ModelLocation:
    candidates: list[tuple[Path | None, str]] = []
    if os.environ.get(CKPT_ENV):
        candidates.append((ckpt_root() / DEFAULT_DIR_NAME, f"${CKPT_ENV}"))
    checkout = checkout_ckpt()
    candidates.append((checkout / DEFAULT_DIR_NAME if checkout else None, "the checkout's ckpt/"))
    candidates.append((bundled_default_dir(), f"the {DEFAULT_PACKAGE} package"))
    for directory, source in candidates:
        if directory is not None and directory.is_dir():
            return ModelLocation(DEFAULT_MODEL, directory, None, source)
    return ModelLocation(DEFAULT_MODEL, ckpt_root() / DEFAULT_DIR_NAME, None, "not installed")


def locate(model: str | os.PathLike[str]) -> ModelLocation:
    """Find where a model name or path points (without loading anything).

    Args:
        model: ``"default"``, an official variant name, ``"codec"``, or a directory.

    Raises:
        ModelNotFound: Neither a known name nor an existing directory.
    """
    name = str(model)
    if name == DEFAULT_MODEL:
        return _default_location()
    if name in DOWNLOADS:
        return ModelLocation(name, ckpt_root() / name, DOWNLOADS[name], _root_source())
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelLocation(name, path, None, "a directory")
    known = ", ".join([DEFAULT_MODEL, *DOWNLOADS])
    if path.exists():
        raise ModelNotFound(
            f"{name} is a file, not a model: give a checkpoint directory or one of {known}"
        )
    raise ModelNotFound(f"no model {name!r}: give a checkpoint directory or one of: {known}")


def missing_hint(location: ModelLocation) -> str:
    """What to do when a named model's directory does not exist, as one sentence."""
    if location.name == DEFAULT_MODEL:
        return (
            f"the default model is not installed: `pip install {DEFAULT_PACKAGE}` (hertz-agents "
            f"depends on it), point ${CKPT_ENV} at a folder holding {DEFAULT_DIR_NAME}/, or "
            "train it with `hertz-agents train small`"
        )
    if location.variant is not None:
        return (
            f"download it with `hertz-agents download --variant {location.variant.name}` "
            f"(it goes to {location.directory}; ${CKPT_ENV} changes where)"
        )
    return "give an existing checkpoint directory"
