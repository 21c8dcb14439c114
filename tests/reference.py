"""Access to the parity vectors in ../shared/reference (produced by the original hertz-dev code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"


def load_reference(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(description json, tensors) of one parity file; skips when shared/ is absent."""
    path = REFERENCE_DIR / f"{name}.safetensors"
    if not path.exists():
        pytest.skip(f"reference vectors not found at {path}")
    meta = json.loads((REFERENCE_DIR / f"{name}.json").read_text())
    return meta, load_file(str(path))


def weights(tensors: dict[str, torch.Tensor], prefix: str = "weights.") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Float32 parity: max abs error within ``rel`` of the reference tensor's scale."""
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual - expected).abs().max()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} * scale {scale:.3g}"
