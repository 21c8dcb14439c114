"""Parity with the original hertz-dev computation, on every tensor in shared/reference.

The reference tensors were produced by the original code in float32 on the CPU; a faithful
implementation differs only by rounding, so tolerances are 1e-4 of each tensor's scale.
"""

from __future__ import annotations

import pytest
import torch
from reference import assert_close, load_reference, weights

from hertz_agents.codec.model import WaveCodec
from hertz_agents.config import HertzConfig
from hertz_agents.model.ar import HertzAR
from hertz_agents.model.resynthesizer import Resynthesizer
from hertz_agents.weights import check_and_load, official_codec_state

AR_CASES = ["ar_mono_tiny_a", "ar_split_tiny_a"]


def _codec():
    meta, t = load_reference("codec_tiny_a")
    codec = WaveCodec(HertzConfig.from_dict({"codec": meta["config"]}).codec)
    check_and_load(codec, official_codec_state(weights(t)), "codec_tiny_a")
    return codec, t


def _ar_model(name: str):
    meta, t = load_reference(name)
    blocks = {k: meta["config"][k] for k in ("ar", "resynthesizer", "quantizer")}
    config = HertzConfig.from_dict(blocks, split=meta["split"])
    ar, resynth = (
        HertzAR(config.ar, config.split),
        Resynthesizer(config.resynthesizer, config.quantizer, config.split),
    )
    w = weights(t)
    check_and_load(ar, {k: v for k, v in w.items() if not k.startswith("resynthesizer.")}, name)
    check_and_load(resynth, weights(w, "resynthesizer."), name)
    suffixes = ["_1", "_2"] if config.split else [""]
    return meta, t, ar.eval(), resynth.eval(), suffixes


def test_codec_posterior_and_decoder_match_reference():
    codec, t = _codec()
    with torch.no_grad():
        mu, logvar = codec.posterior(t["input.audio"])
        decoded = codec.decode(t["output.mu"])
    assert_close(mu, t["output.mu"])
    assert_close(logvar, t["output.logvar"])
    assert_close(decoded, t["output.decoded_from_mu"])


@pytest.mark.parametrize("name", AR_CASES)
def test_one_pass_logits_tokens_and_mixtures_match_reference(name):
    _, t, ar, resynth, suffixes = _ar_model(name)
    latents = t["input.latents"]
    with torch.no_grad():
        logits = ar(latents)
        for channel, suffix in zip(latents.chunk(len(suffixes), dim=-1), suffixes):
            quantized, tokens = resynth.quantizer(channel)
            assert torch.equal(tokens, t["output.tokens" + suffix])
            assert_close(quantized, t["output.quantized" + suffix])
        next_tokens = torch.cat(
            [t["input.next_token_1"], t["input.next_token_2"]][: len(suffixes)], dim=1
        )
        mixtures = resynth(latents, next_tokens)
    for lg, suffix in zip(logits, suffixes):
        assert_close(lg, t["output.logits_full" + suffix])
    for (locs, scales, mix_weights), suffix in zip(mixtures, suffixes):
        prefix = "output.resynth_full_" + (suffix[1:] + "_" if suffix else "")
        assert_close(locs, t[prefix + "locs"])
        assert_close(scales, t[prefix + "scales"])
        assert_close(mix_weights, t[prefix + "weights"])


@pytest.mark.parametrize("name", AR_CASES)
def test_cached_steps_match_reference_step_outputs(name):
    """Feed 0 is the prefix at once, then one latent per feed, through preallocated caches."""
    meta, t, ar, resynth, suffixes = _ar_model(name)
    latents, prefix = t["input.latents"], meta["steps_prefix"]
    ar_cache = ar.new_cache(1, 64, "cpu", torch.float32)
    rs_cache = resynth.new_cache(1, 64, "cpu", torch.float32)
    feeds = [(0, prefix)] + [(i, i + 1) for i in range(prefix, latents.shape[1])]
    assert len(feeds) == t["output.step_logits"].shape[0]
    with torch.no_grad():
        for f, (start, end) in enumerate(feeds):
            chunk = latents[:, start:end]
            positions = torch.arange(start, end)[None]
            logits = ar(chunk, positions, ar_cache, last_only=True)
            for head, lg in enumerate(logits):
                assert_close(lg[:, -1], t["output.step_logits"][f, head])
            tokens = torch.cat(
                [t[f"input.step_next_token_{c + 1}.{f}"] for c in range(len(suffixes))], dim=1
            )
            mixtures = resynth(chunk, tokens, positions, rs_cache, last_only=True)
            for head, (locs, scales, mix_weights) in enumerate(mixtures):
                flat = torch.cat(
                    [locs.flatten(2), scales.flatten(2), mix_weights.flatten(2)], dim=-1
                )
                assert_close(flat[:, -1], t["output.step_resynth_params"][f, head, 0][None])


@pytest.mark.parametrize("name", AR_CASES)
def test_cached_steps_equal_one_pass(name):
    """Stepping one latent at a time through the cache reproduces the one-pass logits."""
    _, t, ar, resynth, suffixes = _ar_model(name)
    latents = t["input.latents"]
    cache = ar.new_cache(1, 32, "cpu", torch.float32)
    with torch.no_grad():
        full = ar(latents)
        for i in range(latents.shape[1]):
            stepped = ar(latents[:, i : i + 1], torch.tensor([[i]]), cache)
            for head in range(len(suffixes)):
                assert_close(stepped[head][:, 0], full[head][:, i], rel=1e-5)
