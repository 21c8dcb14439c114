"""The streaming codec: chunked processing equals one pass; output never depends on the future."""

from __future__ import annotations

import pytest
import torch
from reference import assert_close, load_reference, weights

from hertz_agents.codec.model import WaveCodec
from hertz_agents.config import HertzConfig
from hertz_agents.weights import check_and_load, official_codec_state


@pytest.fixture(scope="module")
def codec():
    meta, t = load_reference("codec_tiny_a")
    model = WaveCodec(HertzConfig.from_dict({"codec": meta["config"]}).codec).eval()
    check_and_load(model, official_codec_state(weights(t)), "codec_tiny_a")
    return model


def _audio(frames: int, hop: int, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return 0.1 * torch.randn(batch, 1, frames * hop, generator=g)


@pytest.mark.parametrize("chunk_frames", [1, 2, 3, 12])
def test_chunked_encoding_equals_one_pass(codec, chunk_frames):
    hop = codec.config.hop
    audio = _audio(12, hop)
    with torch.no_grad():
        full = codec.encode(audio)
        state = codec.initial_encoder_state(audio.shape[0])
        parts = []
        for start in range(0, audio.shape[-1], chunk_frames * hop):
            mu, state = codec.encode_step(audio[..., start : start + chunk_frames * hop], state)
            parts.append(mu)
    assert_close(torch.cat(parts, dim=1), full, rel=1e-5)


@pytest.mark.parametrize("chunk_frames", [1, 2, 5])
def test_chunked_decoding_equals_one_pass(codec, chunk_frames):
    latents = torch.randn(
        2, 10, codec.config.latent_dim, generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        full = codec.decode(latents)
        state = codec.initial_decoder_state(latents.shape[0])
        parts = []
        for start in range(0, latents.shape[1], chunk_frames):
            audio, state = codec.decode_step(latents[:, start : start + chunk_frames], state)
            parts.append(audio)
    assert_close(torch.cat(parts, dim=-1), full, rel=1e-5)


def test_encoder_and_decoder_are_causal(codec):
    hop = codec.config.hop
    audio = _audio(8, hop, batch=1)
    changed = audio.clone()
    changed[..., 5 * hop :] += 0.5  # change only the future from frame 5 on
    with torch.no_grad():
        a, b = codec.encode(audio), codec.encode(changed)
        assert torch.equal(a[:, :5], b[:, :5])
        assert not torch.allclose(a[:, 5:], b[:, 5:])
        la = torch.randn(1, 8, codec.config.latent_dim)
        lb = la.clone()
        lb[:, 5:] += 1.0
        da, db = codec.decode(la), codec.decode(lb)
        assert torch.equal(da[..., : 5 * hop], db[..., : 5 * hop])


def test_rows_keep_separate_state(codec):
    """Two sessions interleaved in one batch give the same output as each run alone."""
    hop = codec.config.hop
    audio = _audio(4, hop)
    with torch.no_grad():
        together = codec.encode(audio)
        alone = torch.cat([codec.encode(audio[i : i + 1]) for i in range(2)], dim=0)
    assert_close(together, alone, rel=1e-6)


def test_the_codecs_elu_is_torchs_elu_with_and_without_gradients():
    from hertz_agents.codec.model import ELU

    x = torch.cat((torch.linspace(-30, 30, 20001), torch.tensor([0.0, -0.0, -1e-30, 1e-30])))
    with torch.no_grad():
        torch.testing.assert_close(ELU()(x), torch.nn.functional.elu(x), rtol=0, atol=2e-7)
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ELU()(ours).sum().backward()  # the training path: torch's own, gradients included
    torch.nn.functional.elu(theirs).sum().backward()
    assert torch.equal(ours.grad, theirs.grad)
