"""Run under torchrun by tests/test_train_distributed.py: both phases on a tiny recipe, then
each rank writes a digest of its weights so the test can check the replicas agree."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from train_fixtures import ar_overrides, codec_overrides  # noqa: E402

from hertz_agents.train.ar_trainer import ar_trainer  # noqa: E402
from hertz_agents.train.codec_trainer import codec_trainer  # noqa: E402
from hertz_agents.train.config import load_ar_config, load_codec_config  # noqa: E402
from hertz_agents.train.runtime import setup, teardown  # noqa: E402


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        if hasattr(v, "full_tensor"):  # FSDP: a shard; the whole tensor is gathered
            v = v.full_tensor()
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def main(corpus: Path, out: Path, strategy: str) -> None:
    codec_cfg = load_codec_config("small_codec", codec_overrides(corpus, out / "codec", steps=3))
    rt = setup(codec_cfg.run)
    trainer = codec_trainer(codec_cfg, rt)
    codec_dir = trainer.fit()
    (out / f"codec_rank{rt.rank}.txt").write_text(digest(trainer.task.codec))  # type: ignore[attr-defined]

    # Extra AR overrides, ";"-separated: to bisect a difference between strategies by hand.
    extra = [s for s in os.environ.get("HERTZ_TEST_AR_EXTRA", "").split(";") if s]
    ar_cfg = load_ar_config(
        "small_ar",
        [
            *ar_overrides(corpus, out / "ar", codec_dir, steps=3),
            f'run.strategy="{strategy}"',
            *extra,
        ],
    )
    trainer = ar_trainer(ar_cfg, rt)
    trainer.fit()
    (out / f"ar_rank{rt.rank}.txt").write_text(digest(trainer.task.net))  # type: ignore[attr-defined]
    teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "ddp")
