"""A ring KV cache computes what one pass with a ring's visibility computes.

Stepping a call through ring caches one latent at a time, far past the cache's length, must give
the trunk's logits and the resynthesizer's mixtures of one pass over the whole call whose
attention sees, from each position, the pinned first ``sink`` positions and the last
``context - sink`` (``visible``). That is what ``benchmarks/rollover_quality.py`` scores, so the
quality it measures is the engine's.
"""

from __future__ import annotations

import pytest
import torch

from hertz_agents.checkpoint import load_model
from hertz_agents.model.kv_cache import ring_index

CONTEXT, STEPS = 16, 50  # the ring wraps three times


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32).eval()


def ring_visibility(steps: int, context: int, sink: int) -> torch.Tensor:
    """Key j visible to query i: j <= i, and j pinned or among the last ``context - sink``."""
    i, j = torch.arange(steps)[:, None], torch.arange(steps)[None, :]
    return (j <= i) & ((i - j < context - sink) | (j < sink))


@torch.no_grad()
def stepped_through_a_ring(model, latents: torch.Tensor, sink: int) -> list[torch.Tensor]:
    """Logits and mixtures at each position, fed one latent at a time into ring caches."""
    channels = tuple(range(model.channels))
    caches = model.new_caches(1, CONTEXT, "cpu", torch.float32, channels=channels)
    caches.as_ring(sink)
    for rotary in (model.ar.rotary, model.resynthesizer.rotary):
        rotary.extend(STEPS)
    quantizer = model.resynthesizer.quantizer
    next_tokens = torch.stack(
        [quantizer(ch)[1] for ch in latents.chunk(model.channels, dim=-1)], dim=-1
    )  # [1, T, C]: the teacher-forced tokens, as one pass takes them from the next latent
    per_step = []
    for t in range(STEPS - 1):
        x, positions = latents[:, t : t + 1], torch.tensor([[t]])
        length = min(t + 1, CONTEXT)
        logits = model.ar(x, positions, caches.ar, last_only=True, heads=channels, length=length)
        mixtures = model.resynthesizer(
            x, next_tokens[:, t + 1], positions, caches.resynthesizer, last_only=True, length=length
        )
        per_step.append(torch.cat([*logits, *(p.flatten(2) for m in mixtures for p in m)], -1))
    return per_step


@torch.no_grad()
def one_pass(model, latents: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    logits = model.ar(latents, visible=visible)
    mixtures = model.resynthesizer(latents, None, visible=visible)
    return torch.cat([*logits, *(p.flatten(2) for m in mixtures for p in m)], -1)


@pytest.mark.parametrize("sink", [0, 4])
def test_a_ring_steps_as_one_pass_over_its_window(model, sink):
    latents = torch.randn(1, STEPS, model.channels * 32, generator=torch.Generator().manual_seed(1))
    stepped = torch.cat(stepped_through_a_ring(model, latents, sink), dim=1)
    expected = one_pass(model, latents, ring_visibility(STEPS, CONTEXT, sink))[:, : STEPS - 1]
    torch.testing.assert_close(stepped, expected, rtol=1e-4, atol=1e-4)
    # It can fail: past the first wrap, plain causal attention over everything differs.
    causal = one_pass(model, latents, None)[:, : STEPS - 1]
    torch.testing.assert_close(stepped[:, :CONTEXT], causal[:, :CONTEXT], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stepped[:, CONTEXT:], causal[:, CONTEXT:], rtol=1e-4, atol=1e-4)


def test_ring_positions_pin_the_sink_and_cycle_the_rest():
    positions = torch.tensor([0, 3, 4, 15, 16, 17, 28, 29])
    assert ring_index(positions, 4, 16).tolist() == [0, 3, 4, 15, 4, 5, 4, 5]
    assert ring_index(positions, 0, 16).tolist() == [0, 3, 4, 15, 0, 1, 12, 13]


def test_the_rotary_table_extends_with_attention_still_relative():
    """Past the model's table, positions come from float64 angles: a query and a key hours into
    a call score as they do at the start (a float32 angle table drifts: about 2e-4 in cos at
    position 5,000 already)."""
    from hertz_agents.model.layers import Rotary

    rotary = Rotary(64, 2048, 10000.0)
    before = rotary.cos.clone()
    far = 8 * 3600 * 8  # eight hours of 125 ms steps
    rotary.extend(far + 10)
    assert rotary.positions == far + 10 and torch.equal(rotary.cos[:2048], before)
    q, k = torch.randn(2, 1, 1, 1, 64, generator=torch.Generator().manual_seed(0)).unbind(0)

    def score(query_at: int, key_at: int) -> torch.Tensor:
        rq = rotary(q, torch.tensor([[query_at]]))
        rk = rotary(k, torch.tensor([[key_at]]))
        return (rq * rk).sum()

    torch.testing.assert_close(score(far + 7, far), score(7, 0), rtol=0, atol=1e-4)


def test_turning_int8_keys_is_turning_the_float_keys_within_a_quantization_step():
    """A rebase of int8 caches dequantizes, turns and quantizes again: the keys stay what the
    float cache's turned keys are, within int8's rounding; the sink's keys do not move."""
    from hertz_agents.model.kv_cache import KVCache
    from hertz_agents.model.layers import Rotary

    keys = torch.randn(1, 1, 12, 2, 16, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(12)[None]
    exact, quantized = KVCache(1, 1, 12, 2, 16), KVCache(1, 1, 12, 2, 16, dtype=torch.int8)
    for cache in (exact, quantized):
        cache.layer(0).write(keys[0], keys[0], positions)
    cos, sin = Rotary(16, 64, 10000.0).turn(-10)
    for cache in (exact, quantized):
        cache.turn_keys(0, 3, cos, sin)
    turned, _ = exact.layer(0).read(12, torch.float32)
    dequantized, _ = quantized.layer(0).read(12, torch.float32)
    step = turned.abs().amax(-1, keepdim=True) / 127
    assert ((dequantized - turned).abs() <= step).all()
    torch.testing.assert_close(turned[:, :, :3], keys[0].transpose(1, 2)[:, :, :3])
    assert not torch.allclose(turned[:, :, 3:], keys[0].transpose(1, 2)[:, :, 3:])
