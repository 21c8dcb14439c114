r"""Measuring a trained model: codec reconstruction, AR loss, and pictures.

Codec reconstruction is measured against baselines, AR loss against the unigram entropy of its
tokens, and pictures (spectrograms of reconstructions and of a prompt and its continuation).

    python -m hertz_agents.train.evaluate --model ckpt/hertz-small --val data/synth/val \
        --real ../shared/audio --train-latents runs/small/ar/latents/train.pt --img docs/img
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hertz_agents.audio import read_audio
from hertz_agents.codec.model import WaveCodec
from hertz_agents.model.hertz import HertzModel
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEPS_PER_SECOND
from hertz_agents.train.ar_trainer import NextStepObjective, unigram_entropy
from hertz_agents.train.latents import encode_audio
from hertz_agents.train.losses import log_spectral_distance, mel_distance, si_snr
from hertz_agents.train.samples import continue_latents, decode_channels

ACTIVE_RMS = 1e-3


# -- codec ------------------------------------------------------------------------------------


def mu_law(x: Tensor, bits: int = 8) -> Tensor:
    """Round trip through ``bits``-bit mu-law (telephony's G.711 at 8 bits)."""
    mu = 2**bits - 1
    y = torch.sign(x) * torch.log1p(mu * x.abs().clamp(max=1)) / math.log1p(mu)
    y = torch.round((y + 1) / 2 * mu) / mu * 2 - 1
    return torch.sign(y) * ((1 + mu) ** y.abs() - 1) / mu


def low_pass(x: Tensor, cutoff_hz: float) -> Tensor:
    """Brick-wall low-pass (zeroing FFT bins above ``cutoff_hz``)."""
    spec = torch.fft.rfft(x.float(), dim=-1)
    freqs = torch.fft.rfftfreq(x.shape[-1], 1 / SAMPLE_RATE)
    return torch.fft.irfft(spec * (freqs <= cutoff_hz), n=x.shape[-1], dim=-1)


BASELINES = {
    "silence": lambda x: torch.zeros_like(x),
    "low-pass 1 kHz": lambda x: low_pass(x, 1000),
    "low-pass 4 kHz (telephone band)": lambda x: low_pass(x, 4000),
    "mu-law 8 bit (64 kbit/s)": mu_law,
}


@torch.no_grad()
def reconstruct(codec: WaveCodec, clip: Tensor) -> Tensor:
    """Mono ``[N]`` -> the codec's round trip of it through the posterior mean, ``[N]``."""
    n = clip.shape[-1] - clip.shape[-1] % codec.config.hop
    audio = clip[:n].view(1, 1, n).to(next(codec.parameters()).dtype)
    return codec.decode(codec.encode(audio)).view(-1).float()


def score(estimate: Tensor, reference: Tensor) -> dict[str, float]:
    """SI-SNR, mel distance and log-spectral distance of ``estimate`` against ``reference``."""
    e, r = estimate.view(1, -1).float(), reference.view(1, -1).float()
    return {
        "si_snr_db": float(si_snr(e, r)),
        "mel_distance": float(mel_distance(e, r)),
        "lsd_db": float(log_spectral_distance(e, r)),
    }


def codec_report(codec: WaveCodec, clips: list[Tensor]) -> dict[str, dict[str, float]]:
    """Mean scores of the codec and of each baseline over ``clips`` (mono ``[N]`` each)."""
    rows: dict[str, list[dict[str, float]]] = {"codec": [], **{k: [] for k in BASELINES}}
    for clip in clips:
        n = clip.shape[-1] - clip.shape[-1] % codec.config.hop
        ref = clip[:n]
        rows["codec"].append(score(reconstruct(codec, ref), ref))
        for name, fn in BASELINES.items():
            rows[name].append(score(fn(ref), ref))
    return {
        name: {k: round(float(np.mean([s[k] for s in scores])), 3) for k in scores[0]}
        for name, scores in rows.items()
        if scores
    }


def real_speech_clips(folder: str | Path) -> list[Tensor]:
    """Every distinct speaker channel of the recordings in ``folder``, mono ``[N]`` at 16 kHz."""
    clips = []
    for path in sorted(Path(folder).glob("*.wav")):
        audio = read_audio(path)
        channels = (
            [audio[0]]
            if audio.shape[0] == 1 or np.allclose(audio[0], audio[-1], atol=1e-3)
            else list(audio)
        )
        clips += [
            torch.from_numpy(np.ascontiguousarray(c))
            for c in channels
            if np.sqrt(np.mean(c**2)) > ACTIVE_RMS
        ]
    return clips


def synthetic_clips(folder: str | Path, count: int = 32, seconds: float = 4.0) -> list[Tensor]:
    """Active one-speaker ``seconds`` segments from the stereo files of ``folder``."""
    clips: list[Tensor] = []
    n = int(seconds * SAMPLE_RATE)
    for path in sorted(Path(folder).glob("*.wav")):
        audio = read_audio(path)
        for start in range(0, audio.shape[1] - n + 1, n):
            for ch in audio[:, start : start + n]:
                if np.sqrt(np.mean(ch**2)) > 10 * ACTIVE_RMS and len(clips) < count:
                    clips.append(torch.from_numpy(np.ascontiguousarray(ch)))
    return clips


# -- AR ---------------------------------------------------------------------------------------


@torch.no_grad()
def ar_report(
    net: HertzModel, val_latents: Tensor, train_latents: Tensor | None = None
) -> dict[str, float]:
    """Next-token cross-entropy and mixture NLL on ``val_latents`` [N, T, C*32].

    Measured against the entropy of a unigram model of the tokens (fitted on ``train_latents`` when
    given).
    """
    q = net.resynthesizer.quantizer
    vocab = net.config.quantizer.codebook_size
    ce, nll, acc = [], [], []
    for batch in val_latents.split(8):
        c, n, a = NextStepObjective(net)(batch)
        ce.append(c.mean())
        nll.append(n.mean())
        acc.append(a.mean())

    def tokens_of(latents: Tensor) -> Tensor:
        return torch.cat(
            [q(ch)[1].flatten() for b in latents.split(32) for ch in b.chunk(net.channels, -1)]
        )

    val_tokens = tokens_of(val_latents)[:]
    report = {
        "ce_nats": float(torch.stack(ce).mean()),
        "nll_per_dim": float(torch.stack(nll).mean()),
        "accuracy": float(torch.stack(acc).mean()),
        "val_token_entropy_nats": unigram_entropy(val_tokens, vocab),
        "codebook_used": int(torch.unique(val_tokens).numel()),
        "codebook_size": vocab,
    }
    if train_latents is not None:
        # add-half smoothing
        counts = torch.bincount(tokens_of(train_latents), minlength=vocab).double() + 0.5
        logp = (counts / counts.sum()).log()
        report["unigram_ce_nats"] = float(-logp[val_tokens].mean())
    return report


# -- pictures ---------------------------------------------------------------------------------


def _spectrogram(ax: Any, audio: Tensor, title: str, mark_s: float | None = None) -> None:
    spec = torch.stft(
        audio.float(), 512, 128, window=torch.hann_window(512), return_complex=True
    ).abs()
    db = 20 * torch.log10(spec + 1e-5)
    seconds = audio.shape[-1] / SAMPLE_RATE
    ax.imshow(
        db.numpy(),
        origin="lower",
        aspect="auto",
        cmap="magma",
        vmin=-80,
        vmax=float(db.max()),
        extent=(0, seconds, 0, SAMPLE_RATE / 2000),
    )
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("kHz", fontsize=8)
    ax.tick_params(labelsize=7)
    if mark_s is not None:
        ax.axvline(mark_s, color="cyan", linewidth=1.5, linestyle="--")


def plot_spectrograms(
    panels: list[tuple[Tensor, str]], png: str | Path, mark_s: float | None = None
) -> Path:
    """Draw a spectrogram per (audio, title) panel, stacked, into ``png``; return its path.

    ``mark_s`` draws a line at that many seconds in every panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.7 * len(panels)), squeeze=False)
    for ax, (audio, title) in zip(axes[:, 0], panels, strict=True):
        _spectrogram(ax, audio, title, mark_s)
    axes[-1, 0].set_xlabel("seconds", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=72)
    plt.close(fig)
    return Path(png)


def continuation_picture(
    net: HertzModel,
    conversation: Tensor,
    png: str | Path,
    prompt_s: float = 4.0,
    continue_s: float = 6.0,
    seed: int = 0,
) -> Path:
    """Draw a stereo conversation's continuation beside the real one.

    Encodes the first ``prompt_s`` seconds, continues both channels for ``continue_s`` seconds,
    and draws the real conversation over the same span beside it.
    """
    p = int(prompt_s * STEPS_PER_SECOND)
    g = int(continue_s * STEPS_PER_SECOND)
    n = (p + g) * SAMPLES_PER_STEP
    real = conversation[:, :n]
    prompt = encode_audio(net.codec, real[None, :, : p * SAMPLES_PER_STEP])[0]
    generated = decode_channels(net.codec, continue_latents(net, prompt, g, seed))
    panels = []
    for c in range(real.shape[0]):
        panels.append((real[c], f"channel {c + 1}: the real conversation"))
        panels.append(
            (generated[c], f"channel {c + 1}: {prompt_s:g} s prompt, then the model's continuation")
        )
    return plot_spectrograms(panels, png, mark_s=prompt_s)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation from the command line (see the module docstring)."""
    from hertz_agents.checkpoint import load_model

    p = argparse.ArgumentParser(
        prog="hertz_agents.train.evaluate", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--model", default="default")
    p.add_argument(
        "--val", default="data/synth/val", help="folder of stereo validation conversations"
    )
    p.add_argument("--real", default="", help="folder of real speech recordings (read only)")
    p.add_argument("--val-latents", default="", help="cached validation latents (from the AR run)")
    p.add_argument(
        "--train-latents", default="", help="cached training latents, for the unigram baseline"
    )
    p.add_argument("--img", default="", help="write pictures into this folder")
    p.add_argument("--out", default="", help="write the report as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    net = load_model(args.model, device="cpu", dtype=torch.float32)
    report = evaluate(net, args.val, args.real, args.val_latents, args.train_latents, args.img)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def evaluate(
    net: HertzModel,
    val: str,
    real: str = "",
    val_latents: str = "",
    train_latents: str = "",
    img: str = "",
) -> dict[str, Any]:
    """Every number and picture of the model's report (see :func:`main`)."""
    report: dict[str, Any] = {"codec_synthetic_val": codec_report(net.codec, synthetic_clips(val))}
    if real:
        report["codec_real_speech"] = codec_report(net.codec, real_speech_clips(real))
    if val_latents:
        vl = torch.load(val_latents, weights_only=False)["latents"]
        vl = vl[:, 0] if vl.dim() == 4 else vl
        tl = None
        if train_latents:
            tl = torch.load(train_latents, weights_only=False)["latents"]
            tl = (tl[:, 0] if tl.dim() == 4 else tl)[:512]
        report["ar_val"] = ar_report(net, vl, tl)
    if img:
        out = Path(img)
        out.mkdir(parents=True, exist_ok=True)
        conv = sorted(Path(val).glob("*.wav"))[0]
        audio = torch.from_numpy(read_audio(conv))
        continuation_picture(net, audio, out / "small_continuation.png")
        clip = synthetic_clips(val, 1, 3.0)[0]
        panels = [
            (clip, "synthetic speech (held out)"),
            (reconstruct(net.codec, clip), "small codec round trip"),
        ]
        if real:
            speech = real_speech_clips(real)[-1][: 3 * SAMPLE_RATE]
            panels += [
                (speech, "real speech"),
                (reconstruct(net.codec, speech), "small codec round trip"),
            ]
        plot_spectrograms(panels, out / "small_codec_reconstruction.png")
    return report


if __name__ == "__main__":
    raise SystemExit(main())
