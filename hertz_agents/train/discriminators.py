"""Discriminators for the codec's adversarial losses, and the losses themselves.

Two families, as in most neural audio codecs:

* multi-period: the waveform folded into ``[frames, period]`` images, 2-D convs along time,
  one discriminator per period (catches periodic artefacts: buzz, missing harmonics);
* multi-resolution STFT: 2-D convs over the log-magnitude spectrogram at several FFT sizes
  (catches smeared or noisy spectra).

Every discriminator returns its logits and its intermediate feature maps, which the generator
matches (feature-matching loss). These modules are used only for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from hertz_agents.train.config import DiscriminatorConfig

Features = list[Tensor]


class PeriodDiscriminator(nn.Module):
    """Judges audio folded into frames of ``period`` samples (2-D convolutions across frames)."""

    def __init__(self, period: int, channels: int) -> None:
        super().__init__()
        self.period = period
        widths = [1, channels, 2 * channels, 4 * channels, 4 * channels]
        self.convs = nn.ModuleList(
            weight_norm(
                nn.Conv2d(widths[i], widths[i + 1], (5, 1), (3 if i < 3 else 1, 1), padding=(2, 0))
            )
            for i in range(len(widths) - 1)
        )
        self.out = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, x: Tensor) -> tuple[Tensor, Features]:
        """``x`` [B, 1, N] -> (logits [B, ...], features)."""
        b, c, n = x.shape
        pad = (-n) % self.period
        x = F.pad(x, (0, pad), mode="reflect" if pad < n else "constant")
        x = x.view(b, c, -1, self.period)  # [B, 1, frames, period]
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        x = self.out(x)
        features.append(x)
        return x.flatten(1), features


class STFTDiscriminator(nn.Module):
    """Judges the complex STFT of audio with an ``n_fft``-point window."""

    def __init__(self, n_fft: int, channels: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        c = channels
        self.convs = nn.ModuleList(
            [
                weight_norm(nn.Conv2d(1, c, (3, 9), (1, 2), padding=(1, 4))),
                weight_norm(nn.Conv2d(c, c, (3, 9), (2, 2), padding=(1, 4))),
                weight_norm(nn.Conv2d(c, c, (3, 9), (2, 2), padding=(1, 4))),
                weight_norm(nn.Conv2d(c, c, (3, 3), padding=(1, 1))),
            ]
        )
        self.out = weight_norm(nn.Conv2d(c, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: Tensor) -> tuple[Tensor, Features]:
        """Return the logits and the feature maps of every layer for audio ``x``."""
        window: Tensor = self.window  # type: ignore[assignment]
        spec = torch.stft(
            x.squeeze(1).float(), self.n_fft, self.n_fft // 4, window=window, return_complex=True
        )
        h = torch.log(spec.abs() + 1e-5).unsqueeze(1).transpose(2, 3)  # [B, 1, frames, bins]
        features = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.1)
            features.append(h)
        h = self.out(h)
        features.append(h)
        return h.flatten(1), features


class Discriminators(nn.Module):
    """All discriminators of a config; ``forward`` returns one (logits, features) per member."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.members = nn.ModuleList(
            [PeriodDiscriminator(p, config.period_channels) for p in config.periods]
            + [STFTDiscriminator(n, config.stft_channels) for n in config.stft_ffts]
        )

    def forward(self, x: Tensor) -> list[tuple[Tensor, Features]]:
        """Return (logits, features) of every member for audio ``x``."""
        return [m(x) for m in self.members]


def discriminator_loss(
    real: list[tuple[Tensor, Features]], fake: list[tuple[Tensor, Features]], kind: str
) -> Tensor:
    """Mean over members of the real/fake classification loss (``fake`` on detached audio)."""
    total = real[0][0].new_zeros((), dtype=torch.float32)
    for (r, _), (f, _) in zip(real, fake, strict=True):
        r, f = r.float(), f.float()
        if kind == "hinge":
            total = total + F.relu(1 - r).mean() + F.relu(1 + f).mean()
        else:
            total = total + (r - 1).pow(2).mean() + f.pow(2).mean()
    return total / len(real)


def generator_losses(
    real: list[tuple[Tensor, Features]], fake: list[tuple[Tensor, Features]], kind: str
) -> tuple[Tensor, Tensor]:
    """(adversarial loss, feature-matching loss), each a mean over members.

    Feature matching is L1 between the discriminators' features on real and generated audio,
    each layer divided by the mean magnitude of its real features so every layer counts alike.
    """
    adversarial = fake[0][0].new_zeros((), dtype=torch.float32)
    matching = fake[0][0].new_zeros((), dtype=torch.float32)
    for (_, real_feats), (f, fake_feats) in zip(real, fake, strict=True):
        f = f.float()
        adversarial = adversarial + (-f.mean() if kind == "hinge" else (f - 1).pow(2).mean())
        member = fake[0][0].new_zeros((), dtype=torch.float32)
        for rf, ff in zip(real_feats, fake_feats, strict=True):
            rf = rf.detach().float()
            member = member + F.l1_loss(ff.float(), rf) / (rf.abs().mean() + 1e-5)
        matching = matching + member / len(real_feats)
    return adversarial / len(fake), matching / len(fake)
