"""The AR phase: train the quantizer, the AR trunk and the resynthesizer on a frozen codec.

Each training example is a run of latents ``[T, C*32]`` (C = 2 for the duplex model: each
channel of a stereo recording encoded alone; C = 1: the recording mixed down). Losses:

* ``ce``: the trunk's logits at position t against the FSQ token of latent t+1, per channel.
  Tokens are the quantizer's own, computed on the fly, so they follow the quantizer as it
  learns (their index carries no gradient).
* ``nll``: the resynthesizer's mixture at position t (which sees the code of latent t+1,
  rolled in at its injection layer) against latent t+1, per latent dimension. The last
  position, whose rolled code wraps around, is cropped. This loss reaches the quantizer
  through FSQ's straight-through codes: the quantizer learns codes that say most about the
  next latent, which is what makes its tokens worth predicting.

The result is one :class:`HertzModel` (codec + quantizer + trunk + resynthesizer) written with
:func:`hertz_agents.checkpoint.save_model`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hertz_agents.checkpoint import load_model, save_model
from hertz_agents.config import HertzConfig, usable_context
from hertz_agents.lora import LoRAAdapters, save_adapter
from hertz_agents.model.hertz import HertzModel
from hertz_agents.model.resynthesizer import gmm_nll
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP
from hertz_agents.train.checks import check_ar_recipe
from hertz_agents.train.config import ARTrainConfig, RecipeError
from hertz_agents.train.data import AudioSegmentDataset
from hertz_agents.train.export import load_codec
from hertz_agents.train.latents import LatentSet, cached_latents, encode_audio, sample_posterior
from hertz_agents.train.loop import (
    BatchStream,
    Trainer,
    guarded_step,
    make_optimizer,
    make_scheduler,
    too_few_items,
)
from hertz_agents.train.lora_train import checkpoint_blocks, prepare_lora, trainable_summary
from hertz_agents.train.runfolder import refuse_other_run
from hertz_agents.train.runtime import (
    Runtime,
    all_reduce_sum,
    no_sync_unless,
    seed_everything,
    setup,
    teardown,
    wrap_ddp,
)
from hertz_agents.train.samples import continue_latents, write_wavs

log = logging.getLogger(__name__)

PARTS = ("codec", "quantizer", "ar", "resynthesizer")


class NextStepObjective(nn.Module):
    """Next-step losses of latents: per position, averaged over channels.

    ``latents`` [B, T, C*32] -> (ce [B, T-1], nll [B, T-1], correct [B, T-1]). One ``forward`` so
    DDP/FSDP see one graph; the codec is not part of it (it is frozen, and stays whole under FSDP).
    """

    def __init__(self, net: HertzModel) -> None:
        super().__init__()
        self.ar, self.resynthesizer = net.ar, net.resynthesizer
        self.channels = net.channels

    def forward(self, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return (ce, nll, correct), each ``[B, T-1]``, for ``latents`` ``[B, T, C*32]``."""
        channels = latents.chunk(self.channels, dim=-1)
        with torch.no_grad():
            tokens = [self.resynthesizer.quantizer(ch)[1] for ch in channels]  # [B, T] each
        # Kept for the codebook-usage metric: read here, inside the (FSDP) forward, where the
        # quantizer's weights are whole.
        self.last_tokens = torch.stack(tokens, dim=-1).detach()  # [B, T, C]
        logits = self.ar(latents)
        mixtures = self.resynthesizer(latents, None)
        ce, nll, correct = [], [], []
        for c, ch in enumerate(channels):
            lg = logits[c][:, :-1].float()
            target = tokens[c][:, 1:]
            ce.append(F.cross_entropy(lg.transpose(1, 2), target, reduction="none"))
            correct.append((lg.argmax(-1) == target).float())
            params = tuple(p[:, :-1].float() for p in mixtures[c])
            nll.append(gmm_nll(ch[:, 1:].float(), params) / ch.shape[-1])  # type: ignore[arg-type]
        n = len(channels)
        return sum(ce) / n, sum(nll) / n, sum(correct) / n  # type: ignore[return-value]


def build_model(cfg: ARTrainConfig, log_info: bool = True) -> HertzModel:
    """The model to train.

    From ``init_from`` (its sizes) or the config's sizes, with the codec of ``codec_from`` when
    given.
    """
    m = cfg.model
    codec = load_codec(m.codec_from) if m.codec_from else None
    if m.init_from:
        # The loaded model itself is trained (no second copy: the full-size one is 34 GB in fp32).
        net = (
            load_model(m.init_from, device="cpu", dtype=torch.float32).train().requires_grad_(True)
        )
        if not cfg.lora.rank:  # trained in place: own memory, not the file's mapping
            for t in [*net.parameters(), *net.buffers()]:
                t.data = t.data.clone()
        config = net.config
        if codec is not None and codec.config != config.codec:
            config = dataclasses.replace(config, codec=codec.config)
            net.config = config
            net.codec = type(net.codec)(codec.config)
        if config.split != m.split:
            raise ValueError(
                f"init_from {m.init_from} is split={config.split} but model.split={m.split}"
            )
        if log_info:
            log.info("starting from %s", m.init_from)
    else:
        if codec is None:
            raise ValueError(
                "model.codec_from is required when not starting from a full model (model.init_from)"
            )
        config = HertzConfig(
            m.split, codec.config, cfg.ar, cfg.resynthesizer, cfg.quantizer, cfg.serving
        )
        net = HertzModel(config)
    if config.ar.vocab_size != config.quantizer.codebook_size:
        raise ValueError(
            f"ar.vocab_size {config.ar.vocab_size} != quantizer codebook "
            f"{config.quantizer.codebook_size} (the product of fsq_levels "
            f"{config.quantizer.fsq_levels})"
        )
    steps = int(cfg.data.segment_seconds * SAMPLE_RATE) // SAMPLES_PER_STEP
    if steps > usable_context(config):
        raise RecipeError(
            f"data.segment_seconds ({cfg.data.segment_seconds} s, {steps} steps) is longer than "
            f"the model's context ({usable_context(config)} steps, seq_len): shorten the segments"
            + ("" if m.init_from else ", or raise ar.seq_len and resynthesizer.seq_len")
        )
    if codec is not None:
        net.codec.load_state_dict(codec.state_dict())
    return net


def freeze(net: HertzModel, parts: tuple[str, ...]) -> None:
    """Stop gradients to the named parts; the codec is always frozen in this phase."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"model.freeze has unknown parts {sorted(unknown)}; known: {list(PARTS)}")
    net.codec.requires_grad_(False)
    if "ar" in parts:
        net.ar.requires_grad_(False)
    if "resynthesizer" in parts:
        for name, child in net.resynthesizer.named_children():
            if name != "quantizer":
                child.requires_grad_(False)
    if "quantizer" in parts:
        net.resynthesizer.quantizer.requires_grad_(False)


class ARTask:
    """Quantizer + trunk + resynthesizer on a frozen codec; one optimizer."""

    best_metric = "ce"

    def __init__(self, cfg: ARTrainConfig, rt: Runtime, net: HertzModel, cached: bool) -> None:
        self.cfg, self.rt, self.cached = cfg, rt, cached
        self.sharded = rt.distributed and cfg.run.strategy == "fsdp"
        self.adapters: LoRAAdapters | None = None
        if cfg.lora.rank:  # frozen base, adapters only (see lora_train)
            self.net = net
            self.adapters = prepare_lora(net, cfg, rt.device, cached)
            if rt.is_main:
                log.info(trainable_summary(net, self.adapters))
            self.modules: dict[str, nn.Module] = {"lora": self.adapters}
        else:
            freeze(net, cfg.model.freeze)
            self.net = net.to(rt.device)
            self.modules = {"model": self.net}
        self.net.codec.eval()
        if cfg.model.checkpointing:
            checkpoint_blocks(self.net)
        objective = NextStepObjective(self.net)
        if self.adapters is not None:
            objective.lora = self.adapters  # a child, so DDP sees (and averages) their gradients
        self.objective = self._wrap(objective)
        # After wrapping: FSDP replaces the parameters with sharded ones.
        source = self.adapters if self.adapters is not None else self.net
        trainable = [p for p in source.parameters() if p.requires_grad]
        if not trainable:
            raise RecipeError("model.freeze leaves nothing to train")
        self.trainable = trainable
        self.val_tokens = torch.zeros(net.config.quantizer.codebook_size, dtype=torch.long)
        self.opt = make_optimizer(trainable, cfg.optim)
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            name: self.opt for name in self.modules
        }
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {
            name: make_scheduler(self.opt, cfg.optim) for name in self.modules
        }

    def _wrap(self, objective: NextStepObjective) -> nn.Module:
        if self.sharded:
            # FSDP2: each transformer block is one unit (gathered for its forward, freed after);
            # the root unit holds the rest (projections, heads, quantizer, frozen codec).
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = (
                MixedPrecisionPolicy(param_dtype=self.rt.autocast_dtype)
                if self.rt.autocast_dtype
                else MixedPrecisionPolicy()
            )
            for block in [*self.net.ar.layers, *self.net.resynthesizer.stack.layers]:
                fully_shard(block, mp_policy=mp)
            fully_shard(objective, mp_policy=mp)
            return objective
        # LoRA: the base is frozen, its buffers (an int8 base's weights among them) never change.
        return wrap_ddp(objective, self.rt, broadcast_buffers=self.adapters is None)

    def latents_of(self, batch: Tensor) -> Tensor:
        """A batch as latents ``[B, T, C*32]``: cached (mu or mu/logvar) or audio to encode."""
        sample = self.cfg.model.latents == "sample"
        if not self.cached:
            batch = encode_audio(self.net.codec, batch, with_logvar=sample)
        return sample_posterior(batch) if sample else batch

    def train_step(self, batches: list[Tensor], step: int) -> dict[str, Tensor]:
        """Forward, backward and optimizer step over the micro-batches ``batches`` of one step."""
        w, n = self.cfg.loss, len(batches)
        totals: dict[str, Tensor] = {}
        for i, batch in enumerate(batches):
            latents = self.latents_of(batch)
            with no_sync_unless(i == n - 1, self.objective):
                with self.rt.autocast():
                    ce, nll, correct = self.objective(latents)
                ce, nll = ce.mean(), nll.mean()
                loss = w.ce * ce + w.nll * nll
                (loss / n).backward()
            for k, v in (("loss", loss), ("ce", ce), ("nll", nll), ("accuracy", correct.mean())):
                totals[k] = totals.get(k, 0) + v.detach() / n
        clip = self.cfg.optim.grad_clip
        totals["grad_norm"], applied = guarded_step(self.opt, self.trainable, clip, totals["loss"])
        if not applied:
            totals["skipped"] = torch.ones(())
        for scheduler in self.schedulers.values():
            scheduler.step()
        return totals

    @torch.no_grad()
    def validate_batch(self, batch: Tensor) -> dict[str, Tensor]:
        """Scores the posterior mean, through the unwrapped net (no DDP hooks)."""
        if not self.cached:
            latents = encode_audio(self.net.codec, batch)
        else:
            latents = batch[:, 0] if batch.dim() == 4 else batch  # (mu, logvar) caches: the mean
        objective = self.objective if self.sharded else NextStepObjective(self.net)
        ce, nll, correct = objective(latents)
        tokens = objective.last_tokens.flatten().cpu()
        vocab = self.net.config.quantizer.codebook_size
        self.val_tokens += torch.bincount(tokens, minlength=vocab)
        return {"ce": ce.mean(1), "nll": nll.mean(1), "accuracy": correct.mean(1)}

    def validation_summary(self, rt: Runtime) -> dict[str, float]:
        """How much of the codebook the validation latents use.

        Returns the tokens used, and the perplexity of their distribution (exp of its entropy; the
        codebook size at best).
        """
        counts = all_reduce_sum(self.val_tokens.double(), rt)
        self.val_tokens = torch.zeros_like(self.val_tokens)
        if counts.sum() == 0:
            return {}
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * p.log()).sum())
        return {"tokens_used": float((counts > 0).sum()), "token_perplexity": math.exp(entropy)}

    @torch.no_grad()
    def write_samples(self, directory: Path, item: Tensor) -> None:
        """Write a prompt continuation and a codec round trip of ``item`` as stereo WAVs.

        The continuation is the first half of a validation conversation, then the model's; the
        round trip covers the whole conversation.
        """
        latents = item.to(self.rt.device)[None]
        if not self.cached:
            latents = encode_audio(
                self.net.codec, item[None].to(next(self.net.codec.parameters()).device)
            )
        elif latents.dim() == 4:  # (mu, logvar) caches: the mean
            latents = latents[:, 0]
        latents = latents[0].to(self.rt.device)
        half = latents.shape[0] // 2
        continued = continue_latents(
            self.net, latents[:half], latents.shape[0] - half, seed=self.cfg.run.seed
        )
        write_wavs(directory, self.net.codec, {"continuation": continued, "roundtrip": latents})

    def export(self, directory: Path, info: dict[str, Any], states: dict[str, Any]) -> None:
        """Write the trained model (or its LoRA adapter) to ``directory``."""
        net = self.net
        # The recorded recipe describes the model saved: its own sizes, not the recipe's
        # tables (which init_from overrides).
        sizes = net.config.to_dict()
        own = ("ar", "resynthesizer", "quantizer", "serving")
        recipe = {**info["config"], **{k: sizes[k] for k in own}}
        info = {**info, "config": recipe}
        if self.adapters is not None:
            base = self.cfg.model.init_from or self.cfg.model.codec_from
            save_adapter(
                self.adapters,
                directory,
                base_model=base,
                extra={"training": {"phase": "ar", **info}},
            )
            return
        if self.sharded:  # a plain model from the gathered weights
            # Built on the meta device: no random initialisation (which would also draw from the
            # training RNG when the best step is exported mid-run) and no second copy in memory.
            with torch.device("meta"):
                net = HertzModel(self.net.config)
            net.load_state_dict(states["model"], assign=True)
        save_model(
            net,
            directory,
            extra={"training": {"phase": "ar", **info}, "notes": self.cfg.run.run_name},
        )


def ar_trainer(cfg: ARTrainConfig, rt: Runtime) -> Trainer:
    """The AR phase's :class:`Trainer` (model, data, task and loop), for a set-up runtime."""
    seed_everything(cfg.run.seed)  # every rank builds the same initial weights
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = build_model(cfg, log_info=rt.is_main)
    d, m = cfg.data, cfg.model
    channels = 2 if net.config.split else 1
    rate = net.config.codec.sample_rate
    if m.latents not in ("mean", "sample"):
        raise ValueError(f"model.latents must be 'mean' or 'sample', got {m.latents!r}")
    with_logvar = m.latents == "sample"
    codec = net.codec.to(rt.device).eval()

    def audio(root: str, crop: bool) -> AudioSegmentDataset:
        return AudioSegmentDataset(
            root, channels, d.segment_seconds, rate, random_crop=crop, seed=cfg.run.seed
        )

    def latent_set(root: str, name: str, limit: int) -> LatentSet:
        path = Path(d.latent_cache or out / "latents") / f"{name}.pt"
        segments = audio(root, False)
        if name == "train" and len(segments) < cfg.optim.batch_size * rt.world:
            raise RecipeError(too_few_items(segments, cfg.optim.batch_size, rt.world))
        # Every rank encodes its share (no rank idles on a collective while one encodes all).
        latents = cached_latents(path, codec, segments, limit, with_logvar, cfg.log.progress, rt)
        if not with_logvar and latents.dim() == 4:  # a cache that also holds log-variances
            latents = latents[:, 0]
        return LatentSet(latents)

    stream: BatchStream
    if m.cache_latents:
        train_latents = latent_set(d.train, "train", d.max_items)
        stream = BatchStream(
            lambda: train_latents, cfg.optim.batch_size, rt, cfg.run.seed, d.workers
        )
    else:
        stream = BatchStream(
            lambda: audio(d.train, True),
            cfg.optim.batch_size,
            rt,
            cfg.run.seed,
            d.workers,
            d.rescan,
        )

    val_latents = latent_set(d.val, "val", d.val_items) if m.cache_latents and d.val else None

    def val_set() -> Any:
        if not d.val:
            return None
        return val_latents if m.cache_latents else audio(d.val, False)

    if rt.is_main:
        log.info(
            "ar: %d training items of %.1f s, model %s",
            len(stream.dataset),  # type: ignore[arg-type]
            d.segment_seconds,
            {
                k: f"{sum(p.numel() for p in v.parameters()) / 1e6:.2f}M"
                for k, v in net.named_children()
            },
        )
    task = ARTask(cfg, rt, net, cached=m.cache_latents)
    return Trainer(task, stream, val_set, rt, cfg.run, cfg.optim, cfg.log, cfg)


def train_ar(cfg: ARTrainConfig, resume: str | Path | None = None, overwrite: bool = False) -> Path:
    """Run the phase; returns the model directory it wrote (``<out_dir>/final``).

    The recipe and the run folder are checked first (:class:`RecipeError`,
    :class:`RunFolderError`), before the model loads or the corpus is read.
    """
    check_ar_recipe(cfg)
    if cfg.lora.rank and cfg.lora.base_dtype != "fp32" and cfg.run.precision == "auto":
        cfg.run.precision = "bf16"  # a bf16 or int8 base runs under bf16 autocast, on a CPU too
    refuse_other_run(Path(cfg.run.out_dir), resuming=bool(resume), overwrite=overwrite)
    rt = setup(cfg.run)
    try:
        out = ar_trainer(cfg, rt).fit(resume, overwrite=overwrite)
    except BaseException:
        teardown(clean=False)
        raise
    teardown()
    return out


def unigram_entropy(tokens: Tensor, vocab: int) -> float:
    """Entropy in nats of the tokens' empirical distribution (the loss of a context-free guess)."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum()) if len(p) else math.nan


__all__ = [
    "ARTask",
    "NextStepObjective",
    "ar_trainer",
    "build_model",
    "freeze",
    "train_ar",
    "unigram_entropy",
]
