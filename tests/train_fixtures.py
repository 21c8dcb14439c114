"""Tiny corpora and tiny recipes for the training tests (seconds on two CPU cores).

The corpus is made here, not with espeak-ng: two channels of harmonic bursts with gaps, so a
test needs no external program and the data is the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from hertz_agents.timing import SAMPLE_RATE


def write_corpus(root: Path, files: int = 3, seconds: float = 3.0, seed: int = 0) -> Path:
    """``root/train`` and ``root/val`` of stereo WAVs, one 'speaker' per channel taking turns."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", files), ("val", 1)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            n = int(seconds * SAMPLE_RATE)
            audio = np.zeros((n, 2), np.float32)
            t = np.arange(n) / SAMPLE_RATE
            pos, ch = 0, 0
            while pos < n:
                length = int(rng.uniform(0.3, 0.8) * SAMPLE_RATE)
                f0 = rng.uniform(90, 250)
                seg = slice(pos, min(n, pos + length))
                burst = sum(np.sin(2 * np.pi * f0 * h * t[seg]) / h for h in range(1, 6))
                audio[seg, ch] = 0.1 * burst * np.hanning(seg.stop - seg.start)
                pos += length + int(rng.uniform(0.05, 0.3) * SAMPLE_RATE)
                ch = 1 - ch
            sf.write(root / split / f"c{k}.wav", audio, SAMPLE_RATE, subtype="PCM_16")
    return root


def codec_overrides(root: Path, out: Path, steps: int = 4) -> list[str]:
    """A 0.02 M-parameter codec recipe over ``root``; adversarial from step 1."""
    return [
        f'run.out_dir="{out}"',
        f'data.train="{root / "train"}"',
        f'data.val="{root / "val"}"',
        "run.threads=1",
        "data.segment_seconds=0.25",
        "data.val_items=4",
        f"optim.steps={steps}",
        "optim.batch_size=2",
        "optim.warmup_steps=2",
        "log.every=1",
        "log.val_every=2",
        "log.ckpt_every=2",
        "log.keep_checkpoints=5",
        "log.progress=false",
        "log.plot=false",
        "codec.encode_channels=2",
        "codec.channel_ratios=[1,2,2,4,4,4]",
        "loss.adversarial_start=1",
        "loss.fft_sizes=[256,128,64]",
        "discriminator.periods=[2,3]",
        "discriminator.period_channels=2",
        "discriminator.stft_ffts=[128]",
        "discriminator.stft_channels=2",
    ]


def ar_overrides(root: Path, out: Path, codec_dir: Path, steps: int = 4) -> list[str]:
    """A tiny two-channel AR recipe (vocab 16) over ``root`` on the codec in ``codec_dir``."""
    return [
        f'run.out_dir="{out}"',
        f'data.train="{root / "train"}"',
        f'data.val="{root / "val"}"',
        f'model.codec_from="{codec_dir}"',
        "run.threads=1",
        "data.segment_seconds=1.0",
        "data.val_items=2",
        "data.max_items=0",
        f"optim.steps={steps}",
        "optim.batch_size=2",
        "optim.warmup_steps=2",
        "log.every=1",
        "log.val_every=2",
        "log.ckpt_every=2",
        "log.keep_checkpoints=5",
        "log.progress=false",
        "log.plot=false",
        "ar.dim=32",
        "ar.layers=1",
        "ar.heads=2",
        "ar.ff_dim=64",
        "ar.vocab_size=16",
        "ar.seq_len=64",
        "resynthesizer.dim=32",
        "resynthesizer.layers=2",
        "resynthesizer.heads=2",
        "resynthesizer.kv_heads=2",
        "resynthesizer.ff_dim=64",
        "resynthesizer.seq_len=64",
        "resynthesizer.gmm_components=2",
        "quantizer.dim=16",
        "quantizer.ff_dim=32",
        "quantizer.fsq_levels=[4,4]",
    ]
