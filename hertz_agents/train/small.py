"""``hertz-agents train small``: the project's small CPU model, from nothing, in one command.

1. Synthetic two-speaker conversations with espeak-ng (:mod:`hertz_agents.train.synth`), unless
   the corpus is already there.
2. The codec phase with ``configs/small_codec.toml``.
3. The AR phase with ``configs/small_ar.toml`` on the frozen codec.
4. The model, its measured quality and its per-step cost, written to ``ckpt/hertz-small``.

Every phase resumes: run the command again after an interruption and it continues from the
last checkpoint; a phase whose result exists is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hertz_agents.checkpoint import CONFIG_FILE, load_model, save_model
from hertz_agents.train.config import load_ar_config, load_codec_config, to_dict
from hertz_agents.train.loop import CHECKPOINTS, LATEST

log = logging.getLogger(__name__)

NOTES = (
    "hertz-small: the hertz-agents project's own small CPU model (codec + two-channel AR), trained "
    "on synthetic espeak-ng conversations only. It is NOT a conversational model: it continues "
    "audio with speech-like sounds and turn-taking rhythm, not words. Use it to run and test the "
    "engine on a CPU; use hertz-dev for real conversations."
)


def _resume_point(out_dir: Path) -> Path | None:
    return out_dir if (out_dir / CHECKPOINTS / LATEST).exists() else None


def run_small(
    data: str = "data/synth",
    out: str = "runs/small",
    ckpt: str = "ckpt/hertz-small",
    synth_train: int = 4000,
    synth_val: int = 16,
    synth_workers: int = 1,
    codec_overrides: Sequence[str] = (),
    ar_overrides: Sequence[str] = (),
    real_speech: str = "",
    img: str = "",
) -> Path:
    """Run every phase (see the module docstring); returns the model directory."""
    root, runs = Path(data), Path(out)
    if (
        len(list((root / "train").glob("*.wav"))) < synth_train
        or len(list((root / "val").glob("*.wav"))) < synth_val
    ):
        from hertz_agents.train.synth import generate_corpus

        generate_corpus(root, synth_train, synth_val, workers=synth_workers)

    data_paths = [f'data.train="{root / "train"}"', f'data.val="{root / "val"}"']
    codec_cfg = load_codec_config(
        "small_codec", [*data_paths, f'run.out_dir="{runs / "codec"}"', *codec_overrides]
    )
    codec_dir = runs / "codec" / "final"
    if not (codec_dir / CONFIG_FILE).exists():
        from hertz_agents.train.codec_trainer import train_codec

        # overwrite: a phase stopped before its first checkpoint starts over in its own folder.
        train_codec(codec_cfg, resume=_resume_point(runs / "codec"), overwrite=True)

    ar_cfg = load_ar_config(
        "small_ar",
        [
            *data_paths,
            f'run.out_dir="{runs / "ar"}"',
            f'model.codec_from="{codec_dir}"',
            *ar_overrides,
        ],
    )
    ar_dir = runs / "ar" / "final"
    if not (ar_dir / CONFIG_FILE).exists():
        from hertz_agents.train.ar_trainer import train_ar

        train_ar(ar_cfg, resume=_resume_point(runs / "ar"), overwrite=True)

    tune_cfg = load_ar_config(
        "small_ar_tune",
        [
            *data_paths,
            f'run.out_dir="{runs / "ar_tune"}"',
            f'model.init_from="{ar_dir}"',
            f'data.latent_cache="{runs / "ar" / "latents"}"',
        ],
    )
    tune_dir = runs / "ar_tune" / "final"
    if not (tune_dir / CONFIG_FILE).exists():
        from hertz_agents.train.ar_trainer import train_ar

        train_ar(tune_cfg, resume=_resume_point(runs / "ar_tune"), overwrite=True)

    return export_small(tune_dir, Path(ckpt), runs, codec_cfg, [ar_cfg, tune_cfg], real_speech, img)


def export_small(
    ar_dir: Path,
    ckpt: Path,
    runs: Path,
    codec_cfg: Any,
    ar_cfgs: list[Any],
    real_speech: str = "",
    img: str = "",
) -> Path:
    """Measure the trained model and write it, with its recipe and numbers, to ``ckpt``."""
    from hertz_agents.train.bench import measure_step
    from hertz_agents.train.evaluate import evaluate
    from hertz_agents.train.logs import plot_curves

    torch.manual_seed(0)
    net = load_model(str(ar_dir), device="cpu", dtype=torch.float32)
    report = evaluate(
        net,
        codec_cfg.data.val,
        real_speech,
        str(runs / "ar" / "latents" / "val.pt"),
        str(runs / "ar" / "latents" / "train.pt"),
        img,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cost = {f"batch_{b}": measure_step(net, b).as_dict() for b in (1, 8)}
    torch.set_num_threads(threads)
    if img:
        for phase in ("codec", "ar", "ar_tune"):
            plot_curves(
                runs / phase / "log.jsonl",
                Path(img) / f"small_{phase}_curves.png",
                title=f"hertz-small: {phase} phase",
                keys=["mel", "spectral", "kl", "mel_distance", "si_snr"]
                if phase == "codec"
                else ["ce", "nll", "accuracy"],
            )
    extra = {
        "notes": NOTES,
        "training": {
            "recipe": "hertz-agents train small (docs/training.md)",
            "data": "synthetic espeak-ng stereo conversations (hertz_agents.train.synth)",
            "codec": {
                "config": to_dict(codec_cfg),
                "log_tail": _last(runs / "codec" / "log.jsonl"),
            },
            "ar": {"config": to_dict(ar_cfgs[0]), "log_tail": _last(runs / "ar" / "log.jsonl")},
            "ar_tune": {
                "config": to_dict(ar_cfgs[1]),
                "log_tail": _last(runs / "ar_tune" / "log.jsonl"),
            },
            "quality": report,
            "step_cost_ms_one_thread": cost,
        },
    }
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(net, tmp, extra=extra)
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(tmp, ckpt)
    size = (ckpt / "model.safetensors").stat().st_size
    log.info("wrote %s (%.1f MB): %s", ckpt, size / 1e6, json.dumps(report))
    return ckpt


def _last(log_path: Path) -> dict[str, Any]:
    """The last train and val records of a run's log."""
    if not log_path.exists():
        return {}
    out: dict[str, Any] = {}
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        out[record["split"]] = record
    return out
