"""hertz-codec: a causal convolutional VAE, 16 kHz mono <-> one 32-dim latent per 2000 samples.

Module names follow the official checkpoint (``encoder.res_stack.N.res_block.M...``) so the
official weights load after weight norm is folded into plain weights.

Encoder: a 7-tap conv, then one block per stride (three dilated residual units, 1/3/9, then a
strided conv when the width changes or an average pool when it does not), then a linear
Gaussian posterior (mu, logvar). The decoder mirrors it with nearest upsampling or transposed
convs. Audio is divided by ``norm_stddev`` before encoding and multiplied after decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hertz_agents.codec.conv import (
    CausalConv1d,
    CausalConvTranspose1d,
    StreamCursor,
    stateful_layers,
)
from hertz_agents.config import CodecConfig

DILATIONS = (1, 3, 9)


class ELU(nn.Module):
    """ELU (alpha 1), computed without gradients as ``max(x, exp(min(x, 0)) - 1)``.

    The same function (``e^x - 1 >= x`` everywhere), within float rounding of ``expm1``. On the CPU
    it is about a quarter faster than torch's ELU, and a narrow codec's ELUs run over megabytes
    per tick (32 hertz-small calls: [32, 8, 2000] each, a fifth of the tick). With gradients it
    is torch's ELU, whose backward needs no rewritten inputs.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Apply the ELU to ``x``."""
        if torch.is_grad_enabled() and x.requires_grad:
            return F.elu(x)
        return torch.maximum(x, torch.clamp_max(x, 0).exp_().sub_(1))


class ResidualUnit(nn.Module):
    """A dilated causal conv and a 1x1 conv, each after an ELU, added back to the input.

    Args:
        channels: Input and output width.
        kernel: Kernel size of the dilated conv.
        dilation: Dilation of the dilated conv.
    """

    def __init__(self, channels: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.activation = ELU()
        self.conv1 = CausalConv1d(channels, channels, kernel, dilation=dilation, bias=False)
        self.conv2 = nn.Conv1d(channels, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the unit to the whole signal ``x`` [B, channels, T]."""
        return x + self._pointwise(self.activation(self.conv1(self.activation(x))))

    def stream(self, x: Tensor, cursor: StreamCursor) -> Tensor:
        """Apply the unit to a new chunk ``x``, its conv state taken from/given to ``cursor``."""
        return x + self._pointwise(self.activation(self.conv1.stream(self.activation(x), cursor)))

    def _pointwise(self, h: Tensor) -> Tensor:
        # conv2 is a 1x1 conv, i.e. one matrix product per time step. As a matmul it is the same
        # sum, and on the CPU about 10x faster than oneDNN's conv for narrow codecs (hertz-small:
        # 8-64 channels), where these convs took a fifth of a 16-session tick.
        return torch.matmul(self.conv2.weight.squeeze(-1), h)


class ResNetBlock(nn.Module):
    """One resolution step; ``res_block`` indices match the official layout."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, mode: str) -> None:
        super().__init__()
        width = cin if mode == "encoder" else cout
        units = [ResidualUnit(width, kernel, d) for d in DILATIONS]
        resample: list[nn.Module]
        if mode == "encoder":
            if cin == cout:
                resample = [nn.AvgPool1d(stride, stride), nn.Identity()]
            else:
                resample = [CausalConv1d(cin, cout, 2 * stride, stride=stride)]
            self.res_block = nn.Sequential(*units, *resample)
        else:
            if cin == cout:
                resample = [nn.Upsample(scale_factor=stride, mode="nearest"), nn.Identity()]
            else:
                resample = [CausalConvTranspose1d(cin, cout, stride)]
            self.res_block = nn.Sequential(*resample, *units)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to the whole signal ``x`` [B, cin, T]."""
        return self.res_block(x)

    def stream(self, x: Tensor, cursor: StreamCursor) -> Tensor:
        """Apply the block to a new chunk ``x``, streaming the layers that have state."""
        for layer in self.res_block:
            x = layer.stream(x, cursor) if hasattr(layer, "stream") else layer(x)
        return x


class ResNetStack(nn.Module):
    """The encoder or decoder: a stem conv and one :class:`ResNetBlock` per stride.

    Args:
        c: The codec's sizes.
        mode: ``"encoder"`` (audio to features) or ``"decoder"`` (features to audio, blocks in
            reverse order, after a 1x1 channel multiplier).
    """

    def __init__(self, c: CodecConfig, mode: str) -> None:
        super().__init__()
        ratios = (1,) + tuple(c.channel_ratios)
        strides = tuple(c.strides)
        multiplier = c.decode_channel_multiplier if mode == "decoder" else 1
        if mode == "decoder":
            ratios, strides = ratios[::-1], strides[::-1]
        widths = [c.encode_channels * r * multiplier for r in ratios]
        blocks = [
            ResNetBlock(widths[i], widths[i + 1], s, c.kernel_size, mode)
            for i, s in enumerate(strides)
        ]
        if mode == "encoder":
            self.res_stack = nn.Sequential(
                CausalConv1d(1, c.encode_channels, c.kernel_size, bias=False), *blocks
            )
        else:
            middle = c.encode_channels * c.channel_ratios[-1]
            self.multiplier_proj = nn.Conv1d(middle, middle * multiplier, 1)
            self.res_stack = nn.Sequential(
                *blocks, CausalConv1d(widths[-1], 1, c.kernel_size, bias=False)
            )
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        """Run the stack over the whole signal ``x``."""
        if self.mode == "decoder":
            x = self.multiplier_proj(x)
        return self.res_stack(x)

    def stream(self, x: Tensor, cursor: StreamCursor) -> Tensor:
        """Run the stack over a new chunk ``x``, layer state taken from/given to ``cursor``."""
        if self.mode == "decoder":
            x = self.multiplier_proj(x)
        for layer in self.res_stack:
            x = layer.stream(x, cursor)
        return x


class GaussianPosterior(nn.Module):
    """Linear projections to (mu, logvar) and back (official key: ``compressor``)."""

    def __init__(self, dim: int, latent_dim: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * latent_dim)
        self.proj_out = nn.Linear(latent_dim, dim)


class WaveCodec(nn.Module):
    """Audio [B, 1, N] (N a multiple of the hop) <-> latents [B, N / hop, 32]."""

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ResNetStack(config, "encoder")
        self.compressor = GaussianPosterior(
            config.encode_channels * config.channel_ratios[-1], config.latent_dim
        )
        self.decoder = ResNetStack(config, "decoder")

    # -- one pass -------------------------------------------------------------------------
    def posterior(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar), each [B, frames, 32]."""
        features = self.encoder(audio / self.config.norm_stddev).transpose(1, 2)
        mu, logvar = self.compressor.proj_in(features).chunk(2, dim=-1)
        return mu, logvar

    def encode(
        self, audio: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Encode audio [B, 1, N] to latents [B, N / hop, 32]: the posterior mean, or a sample.

        Args:
            audio: The audio to encode.
            sample: Draw from the posterior instead of returning its mean.
            generator: Random generator for the sample.
        """
        mu, logvar = self.posterior(audio)
        if not sample:
            return mu
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + noise * torch.exp(logvar / 2)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, T, 32] -> audio [B, 1, T * hop]."""
        features = self.compressor.proj_out(latents).transpose(1, 2)
        return self.decoder(features) * self.config.norm_stddev

    # -- streaming ------------------------------------------------------------------------
    def initial_encoder_state(self, batch: int, device=None, dtype=None) -> list[Tensor]:
        """Return the encoder's streaming state before any audio, one row per batch item."""
        return _initial_state(self.encoder, batch, device, dtype)

    def initial_decoder_state(self, batch: int, device=None, dtype=None) -> list[Tensor]:
        """Return the decoder's streaming state before any latents, one row per batch item."""
        return _initial_state(self.decoder, batch, device, dtype)

    def encode_step(self, audio: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """New audio [B, 1, k*hop] -> (mu [B, k, 32], new state)."""
        cursor = StreamCursor(state)
        features = self.encoder.stream(audio / self.config.norm_stddev, cursor).transpose(1, 2)
        mu, _ = self.compressor.proj_in(features).chunk(2, dim=-1)
        return mu, cursor.new_states

    def decode_step(self, latents: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """New latents [B, k, 32] -> (audio [B, 1, k*hop], new state)."""
        cursor = StreamCursor(state)
        features = self.compressor.proj_out(latents).transpose(1, 2)
        audio = self.decoder.stream(features, cursor) * self.config.norm_stddev
        return audio, cursor.new_states


def _initial_state(stack: nn.Module, batch: int, device, dtype) -> list[Tensor]:
    param = next(stack.parameters())
    device = device or param.device
    dtype = dtype or param.dtype
    return [layer.initial_state(batch, device, dtype) for layer in stateful_layers(stack)]
