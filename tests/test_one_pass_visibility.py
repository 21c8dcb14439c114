"""The one-pass ``visible`` mask: causal by default, and a window changes only what it hides.

A ring KV cache keeps the last positions of a call; the same attention is scored in one pass by
handing the trunk and the resynthesizer a [T, T] visibility mask. These tests pin what that mask
may change: a causal mask is today's one pass, and a sliding window changes nothing before
its width and something after it.
"""

from __future__ import annotations

import pytest
import torch

from hertz_agents.checkpoint import load_model

T = 24
WINDOW = 8


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def latents(model):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, T, model.channels * 32, generator=generator)


def causal() -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()


def sliding_window(width: int) -> torch.Tensor:
    """Key j visible to query i when i - width < j <= i (a ring of ``width`` positions)."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & (i - j < width)


def outputs(model, latents, visible):
    """Trunk logits and resynthesizer mixture parameters of every channel, as one list."""
    with torch.no_grad():
        logits = model.ar(latents, visible=visible)
        mixtures = model.resynthesizer(latents, None, visible=visible)
    return [*logits, *(p for m in mixtures for p in m)]


def test_a_causal_mask_gives_the_default_one_pass(model, latents):
    for masked, default in zip(
        outputs(model, latents, causal()), outputs(model, latents, None), strict=True
    ):
        torch.testing.assert_close(masked, default, rtol=1e-5, atol=1e-5)


def test_a_sliding_window_changes_outputs_only_past_its_width(model, latents):
    windowed = outputs(model, latents, sliding_window(WINDOW))
    default = outputs(model, latents, None)
    for w, d in zip(windowed, default, strict=True):
        # Before the window is full every query sees what it sees causally.
        torch.testing.assert_close(w[:, :WINDOW], d[:, :WINDOW], rtol=1e-5, atol=1e-5)
        # From there on the first keys are out of sight: every later position moves.
        moved = (w[:, WINDOW:] - d[:, WINDOW:]).abs().flatten(2).amax(-1)  # [B, T - WINDOW]
        assert bool((moved > 1e-4).all()), moved


def test_the_cached_path_refuses_a_visibility_mask(model, latents):
    cache = model.ar.new_cache(latents.shape[0], T, "cpu", torch.float32)
    with pytest.raises(ValueError, match="one-pass"):
        model.ar(latents, cache=cache, visible=causal())
