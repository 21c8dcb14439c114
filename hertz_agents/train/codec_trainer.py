"""The codec phase: train the VAE that turns 16 kHz audio into 32-dim latents at 8 Hz.

Losses: multi-resolution spectral (convergence + log magnitude), multi-resolution log-mel,
waveform L1, KL of the posterior to N(0, 1), and, from ``loss.adversarial_start`` on, hinge
(or LSGAN) adversarial and feature-matching losses against multi-period and multi-resolution
STFT discriminators. The decoder reconstructs a posterior sample (the VAE's reparameterisation)
so the latents the AR phase models are robust to noise; validation decodes the mean.

Stereo corpora are split into their channels (each speaker is encoded alone at inference).
The result is a codec directory (:func:`hertz_agents.train.export.save_codec`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hertz_agents.codec.model import WaveCodec
from hertz_agents.train.checks import check_codec_recipe
from hertz_agents.train.config import CodecTrainConfig
from hertz_agents.train.data import AudioSegmentDataset
from hertz_agents.train.discriminators import Discriminators, discriminator_loss, generator_losses
from hertz_agents.train.export import load_codec, save_codec
from hertz_agents.train.loop import (
    BatchStream,
    Trainer,
    guarded_step,
    make_optimizer,
    make_scheduler,
)
from hertz_agents.train.losses import (
    MultiResolutionSTFTLoss,
    gaussian_kl,
    log_spectral_distance,
    mel_distance,
    si_snr,
)
from hertz_agents.train.runfolder import refuse_other_run
from hertz_agents.train.runtime import (
    Runtime,
    no_sync_unless,
    seed_everything,
    setup,
    teardown,
    wrap_ddp,
)

log = logging.getLogger(__name__)

LOGVAR_MAX = 4.0
"""Training keeps the posterior's log-variance below 4 (variance below e^4 = 55, a KL term below
about 25 per dimension): unbounded, a young encoder's variance can run away and its KL with it
(spikes of 7e5 were seen). A smooth bound (softplus) keeps gradients everywhere and moves a
log-variance of 0 by 0.02; small variances are left alone. Inference reads the codec unchanged."""


def bounded_logvar(logvar: Tensor) -> Tensor:
    return LOGVAR_MAX - F.softplus(LOGVAR_MAX - logvar)


ACTIVE_RMS = 1e-3
"""Validation scores only segments louder than this (a silent channel has no SI-SNR)."""


class AutoEncoder(nn.Module):
    """The codec's round trip as one ``forward`` (what DDP wraps)."""

    def __init__(self, codec: WaveCodec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, audio: Tensor, sample: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``audio`` [B, 1, N] -> (reconstruction [B, 1, N], mu, logvar [B, N / hop, 32])."""
        mu, logvar = self.codec.posterior(audio)
        logvar = bounded_logvar(logvar)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.codec.decode(z), mu, logvar


def split_channels(batch: Tensor) -> Tensor:
    """``[B, C, N]`` -> ``[B * C, 1, N]``: every channel is a separate mono example."""
    return batch.reshape(-1, 1, batch.shape[-1])


class CodecTask:
    """Codec + discriminators, their optimizers, one GAN step per call."""

    def __init__(self, cfg: CodecTrainConfig, rt: Runtime) -> None:
        self.cfg, self.rt = cfg, rt
        codec = load_codec(cfg.init_from) if cfg.init_from else WaveCodec(cfg.codec)
        if cfg.init_from and codec.config != cfg.codec:
            log.info("init_from %s: using its codec sizes %s", cfg.init_from, codec.config)
        self.codec = codec.to(rt.device)
        self.disc = Discriminators(cfg.discriminator).to(rt.device)
        self.g = wrap_ddp(AutoEncoder(self.codec), rt)
        self.d = wrap_ddp(self.disc, rt)
        self.modules: dict[str, nn.Module] = {"codec": self.codec, "disc": self.disc}
        opt = cfg.optim
        self.opt_g = make_optimizer(list(self.codec.parameters()), opt)
        self.opt_d = make_optimizer(
            list(self.disc.parameters()), opt, lr=cfg.discriminator.lr or opt.lr
        )
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "codec": self.opt_g,
            "disc": self.opt_d,
        }
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {
            "codec": make_scheduler(self.opt_g, opt),
            # stepped only on adversarial steps: its warm-up starts when the critic does
            "disc": make_scheduler(
                self.opt_d, opt, total=max(1, opt.steps - cfg.loss.adversarial_start)
            ),
        }
        self.recon = MultiResolutionSTFTLoss(cfg.loss.fft_sizes, cfg.codec.sample_rate)

    def _uses_adversary(self, step: int) -> bool:
        w = self.cfg.loss
        return step >= w.adversarial_start and (w.adversarial > 0 or w.feature > 0)

    def train_step(self, batches: list[Tensor], step: int) -> dict[str, Tensor]:
        """Generator (and, once adversarial, discriminator) steps over one step's micro-batches."""
        w, rt = self.cfg.loss, self.rt
        adversary = self._uses_adversary(step)
        n = len(batches)
        totals: dict[str, Tensor] = {}
        for i, batch in enumerate(batches):
            audio = split_channels(batch)
            with no_sync_unless(i == n - 1, self.g, self.d):
                with rt.autocast():
                    fake, mu, logvar = self.g(audio, w.sample_latents)
                fake = fake.float()
                parts: dict[str, Tensor] = {}
                if adversary:
                    with rt.autocast():
                        both = self.d(torch.cat((audio, fake.detach())))
                    real_out = [
                        (lg[: len(audio)], [f[: len(audio)] for f in fs]) for lg, fs in both
                    ]
                    fake_out = [
                        (lg[len(audio) :], [f[len(audio) :] for f in fs]) for lg, fs in both
                    ]
                    parts["disc"] = discriminator_loss(
                        real_out, fake_out, self.cfg.discriminator.loss
                    )
                    (parts["disc"] / n).backward()
                parts["spectral"], parts["mel"] = self.recon(fake, audio)
                parts["waveform"] = F.l1_loss(fake, audio.float())
                parts["kl"] = gaussian_kl(mu, logvar)
                loss = (
                    w.stft * parts["spectral"]
                    + w.mel * parts["mel"]
                    + w.waveform * parts["waveform"]
                    + w.kl * parts["kl"]
                )
                if adversary:
                    self.disc.requires_grad_(
                        False
                    )  # the generator's loss must not train the critic
                    with rt.autocast():
                        judged = self.disc(
                            fake
                        )  # the raw module: DDP syncs only the critic's own loss
                    real_feats = [(lg.detach(), [f.detach() for f in fs]) for lg, fs in real_out]
                    parts["adversarial"], parts["feature"] = generator_losses(
                        real_feats, judged, self.cfg.discriminator.loss
                    )
                    self.disc.requires_grad_(True)
                    loss = (
                        loss + w.adversarial * parts["adversarial"] + w.feature * parts["feature"]
                    )
                parts["loss"] = loss
                (loss / n).backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0) + v.detach() / n
        clip = self.cfg.optim.grad_clip
        totals["grad_norm"], applied = guarded_step(
            self.opt_g, list(self.codec.parameters()), clip, totals["loss"]
        )
        if adversary:
            totals["disc_grad_norm"], disc_applied = guarded_step(
                self.opt_d, list(self.disc.parameters()), clip, totals["disc"]
            )
            applied = applied and disc_applied
        if not applied:
            totals["skipped"] = torch.ones(())
        self.schedulers["codec"].step()
        if adversary:
            self.schedulers["disc"].step()
        return totals

    @torch.no_grad()
    def validate_batch(self, batch: Tensor) -> dict[str, Tensor]:
        """Reconstruction metrics of one validation batch, one value per item."""
        audio = split_channels(batch).float()
        mu, logvar = self.codec.posterior(audio)
        logvar = bounded_logvar(logvar)
        fake = self.codec.decode(mu).float()
        active = audio.pow(2).mean((1, 2)).sqrt() > ACTIVE_RMS
        metrics = {"kl": 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean((1, 2))}
        if active.any():
            a, f = audio[active], fake[active]
            metrics.update(
                si_snr=si_snr(f, a),
                mel_distance=mel_distance(f, a),
                lsd_db=log_spectral_distance(f, a),
            )
        return metrics

    sharded = False
    best_metric = "mel_distance"

    @torch.no_grad()
    def write_samples(self, directory: Path, item: Tensor) -> None:
        """The first channel of a validation segment and its round trip (posterior mean)."""
        directory.mkdir(parents=True, exist_ok=True)
        audio = split_channels(item[None].to(self.rt.device))[:1].float()
        mu, _ = self.codec.posterior(audio)
        fake = self.codec.decode(mu).float()
        rate = self.codec.config.sample_rate
        for name, x in (("original", audio), ("roundtrip", fake)):
            sf.write(
                directory / f"{name}.wav",
                x.view(-1).clamp(-1, 1).cpu().numpy(),
                rate,
                subtype="PCM_16",
            )

    def export(self, directory: Path, info: dict[str, Any], states: dict[str, Any]) -> None:
        """Write the trained codec to ``directory``."""
        save_codec(self.codec, directory, {"training": {"phase": "codec", **info}})


def codec_trainer(cfg: CodecTrainConfig, rt: Runtime) -> Trainer:
    """The codec phase's :class:`Trainer` (data, task and loop), for a runtime already set up."""
    seed_everything(cfg.run.seed)  # every rank builds the same initial weights
    d = cfg.data
    Path(cfg.run.out_dir).mkdir(parents=True, exist_ok=True)

    def train_set() -> AudioSegmentDataset:
        return AudioSegmentDataset(
            d.train,
            d.channels,
            d.segment_seconds,
            cfg.codec.sample_rate,
            random_crop=True,
            seed=cfg.run.seed,
        )

    def val_set() -> AudioSegmentDataset | None:
        if not d.val:
            return None
        return AudioSegmentDataset(
            d.val, d.channels, d.segment_seconds, cfg.codec.sample_rate, random_crop=False
        )

    stream = BatchStream(train_set, cfg.optim.batch_size, rt, cfg.run.seed, d.workers, d.rescan)
    if rt.is_main:
        log.info("codec: %d training segments", len(stream.dataset))  # type: ignore[arg-type]
    return Trainer(CodecTask(cfg, rt), stream, val_set, rt, cfg.run, cfg.optim, cfg.log, cfg)


def train_codec(
    cfg: CodecTrainConfig, resume: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Run the phase; returns the codec directory it wrote (``<out_dir>/final``).

    The recipe and the run folder are checked first (:class:`RecipeError`,
    :class:`RunFolderError`), before the model loads or the corpus is read.
    """
    check_codec_recipe(cfg)
    refuse_other_run(Path(cfg.run.out_dir), resuming=bool(resume), overwrite=overwrite)
    rt = setup(cfg.run)
    try:
        out = codec_trainer(cfg, rt).fit(resume, overwrite=overwrite)
    except BaseException:
        teardown(clean=False)
        raise
    teardown()
    return out


__all__ = ["AutoEncoder", "CodecTask", "codec_trainer", "train_codec"]
