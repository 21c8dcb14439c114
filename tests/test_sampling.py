"""The sampler: greedy at temperature 0, top-p and min-p filters, per-row reproducibility."""

from __future__ import annotations

import torch

from hertz_agents.sampling import (
    SamplingSettings,
    SamplingTensors,
    filter_logits,
    sample_latent,
    sample_token,
)


def _tensors(*settings: SamplingSettings) -> SamplingTensors:
    return SamplingTensors.from_settings(list(settings))


def test_temperature_zero_is_argmax():
    logits = torch.randn(3, 50)
    tokens = sample_token(logits, _tensors(*[SamplingSettings(0, 0, 0)] * 3))
    assert torch.equal(tokens, logits.argmax(-1))


def test_top_p_keeps_the_smallest_nucleus_and_min_p_the_likely_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = filter_logits(logits, torch.tensor([0.7]), torch.tensor([0.0])).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 covers 0.7
    kept = filter_logits(logits, torch.tensor([1.0]), torch.tensor([0.25])).isfinite()
    assert kept.tolist() == [[True, True, True, False]]  # >= 0.25 * 0.5
    settings = _tensors(SamplingSettings(token_temp=1.0, top_p=0.7))
    assert settings.filtered
    draws = {int(sample_token(logits, settings)) for _ in range(200)}
    assert draws <= {0, 1} and draws == {0, 1}


def test_unfiltered_settings_skip_the_filter_and_sample_the_full_distribution():
    settings = _tensors(SamplingSettings(token_temp=1.0))
    assert not settings.filtered
    logits = torch.zeros(1, 4)
    draws = {int(sample_token(logits, settings)) for _ in range(300)}
    assert draws == {0, 1, 2, 3}


def test_rows_with_their_own_generators_are_reproducible_and_independent():
    logits = torch.randn(2, 100)
    settings = _tensors(SamplingSettings(), SamplingSettings())

    def draw(seed_a: int, seed_b: int):
        gens = [torch.Generator().manual_seed(seed_a), torch.Generator().manual_seed(seed_b)]
        return [sample_token(logits, settings, gens) for _ in range(5)]

    first, again, other_b = draw(1, 2), draw(1, 2), draw(1, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(
        a[0] == b[0] for a, b in zip(first, other_b)
    )  # row 0 does not depend on row 1's seed


def test_latent_sampling_picks_a_component_and_scales_noise_by_the_gaussian_temperature():
    locs = torch.stack([torch.zeros(2, 4), torch.full((2, 4), 5.0)], dim=1)  # [B=2, K=2, Z=4]
    scales = torch.ones(2, 2, 4)
    weights = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    exact = sample_latent((locs, scales, weights), _tensors(*[SamplingSettings(0.8, 0.5, 0.0)] * 2))
    assert torch.equal(exact, torch.stack([torch.zeros(4), torch.full((4,), 5.0)]))
    noisy = sample_latent((locs, scales, weights), _tensors(*[SamplingSettings(0.8, 0.5, 1.0)] * 2))
    assert not torch.equal(noisy, exact)
