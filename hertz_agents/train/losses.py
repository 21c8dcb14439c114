"""Reconstruction and regularisation losses of the codec, and quality metrics for reports.

All functions take audio as ``[B, 1, N]`` or ``[B, N]`` float tensors at the codec's rate and
compute in float32 whatever the autocast context, because spectra of quiet audio underflow in
bfloat16.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hertz_agents.timing import SAMPLE_RATE


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).float()


def stft_magnitude(x: Tensor, n_fft: int, hop: int | None = None) -> Tensor:
    """|STFT| with a Hann window, ``[B, n_fft // 2 + 1, frames]``."""
    hop = hop or n_fft // 4
    window = torch.hann_window(n_fft, device=x.device)
    spec = torch.stft(
        _flat(x), n_fft, hop, window=window, return_complex=True, center=True, pad_mode="reflect"
    )
    return spec.abs()


@functools.lru_cache(maxsize=16)
def _mel_basis(n_fft: int, n_mels: int, sample_rate: int) -> Tensor:
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]`` (HTK mel scale), built once."""

    def hz_to_mel(f: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def mel_to_hz(m: Tensor) -> Tensor:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(
        torch.linspace(0, float(hz_to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2)
    )
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    return torch.clamp(torch.minimum(up, down), min=0).float()


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence + log-magnitude L1 + log-mel L1, averaged over FFT sizes.

    Returns (spectral loss, mel loss). The mel term weighs frequencies as hearing does; the
    linear terms keep the high band honest.
    """

    def __init__(
        self, fft_sizes: tuple[int, ...], sample_rate: int = SAMPLE_RATE, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.fft_sizes, self.sample_rate, self.eps = tuple(fft_sizes), sample_rate, eps

    def forward(self, fake: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        """Return (spectral loss, mel loss) of ``fake`` against ``real``."""
        spectral = fake.new_zeros((), dtype=torch.float32)
        mel = fake.new_zeros((), dtype=torch.float32)
        for n_fft in self.fft_sizes:
            f, r = stft_magnitude(fake, n_fft), stft_magnitude(real, n_fft)
            convergence = torch.linalg.norm(r - f) / (torch.linalg.norm(r) + self.eps)
            log_mag = F.l1_loss(torch.log(f + self.eps), torch.log(r + self.eps))
            spectral = spectral + convergence + log_mag
            n_mels = min(80, n_fft // 8)
            basis = _mel_basis(n_fft, n_mels, self.sample_rate).to(f.device)
            mel = mel + F.l1_loss(torch.log(basis @ f + self.eps), torch.log(basis @ r + self.eps))
        n = len(self.fft_sizes)
        return spectral / n, mel / n


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)), mean over batch, frames and dimensions."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()


# -- metrics for reports (no gradients needed) ------------------------------------------------


def si_snr(estimate: Tensor, reference: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant signal-to-noise ratio in dB, per row ``[B]``."""
    est, ref = _flat(estimate), _flat(reference)
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    scale = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = scale * ref
    noise = est - target
    return 10 * torch.log10((target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))


def log_spectral_distance(
    estimate: Tensor, reference: Tensor, n_fft: int = 512, eps: float = 1e-5
) -> Tensor:
    """RMS difference of log10 power spectra in dB, averaged over frames, per row ``[B]``."""
    e = 20 * torch.log10(stft_magnitude(estimate, n_fft) + eps)
    r = 20 * torch.log10(stft_magnitude(reference, n_fft) + eps)
    return (e - r).pow(2).mean(1).sqrt().mean(-1)


def mel_distance(
    estimate: Tensor, reference: Tensor, n_fft: int = 1024, n_mels: int = 80, eps: float = 1e-5
) -> Tensor:
    """Mean |log mel(estimate) - log mel(reference)| (natural log), per row ``[B]``."""
    basis = _mel_basis(n_fft, n_mels, SAMPLE_RATE).to(estimate.device)
    e = torch.log(basis @ stft_magnitude(estimate, n_fft) + eps)
    r = torch.log(basis @ stft_magnitude(reference, n_fft) + eps)
    return (e - r).abs().mean((1, 2))
