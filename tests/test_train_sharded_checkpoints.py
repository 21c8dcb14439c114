"""FSDP checkpoints are sharded per rank (torch distributed checkpoint): under a real torchrun
(two CPU processes, gloo, the `hertz_agents.train.cli` command a user runs) each rank writes its
own shards and rank 0 writes no weights; two processes resume them exactly; one process reads
them back (weights and optimizer, resharded) and trains on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import ar_overrides, codec_overrides, write_corpus

from hertz_agents.checkpoint import load_model
from hertz_agents.train.ar_trainer import ar_trainer, train_ar
from hertz_agents.train.codec_trainer import train_codec
from hertz_agents.train.config import load_ar_config, load_codec_config
from hertz_agents.train.logs import read_log
from hertz_agents.train.runtime import setup

ROOT = Path(__file__).resolve().parents[1]


def _torchrun_ar(overrides: list[str], *args: str) -> None:
    """``torchrun --nproc_per_node 2 -m hertz_agents.train.cli ar`` on the small_ar recipe."""
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "hertz_agents.train.cli", "ar", "--config", "small_ar", *sets, *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A corpus and a one-step codec (the AR's frozen front end)."""
    root = tmp_path_factory.mktemp("sharded")
    corpus = write_corpus(root / "corpus", files=4)
    codec = train_codec(load_codec_config("small_codec", codec_overrides(corpus, root / "c", 1)))
    return corpus, codec


def _overrides(corpus: Path, codec: Path, out: Path, steps: int = 4) -> list[str]:
    return [*ar_overrides(corpus, out, codec, steps=steps), 'run.strategy="fsdp"']


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run / "log.jsonl") if r["split"] == "train"}


@pytest.mark.timeout(400)
def test_fsdp_checkpoints_are_sharded_and_resume_in_two_processes_or_one(
    setup_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    corpus, codec = setup_dirs
    run = tmp_path / "run"
    _torchrun_ar(_overrides(corpus, codec, run))  # 4 steps, checkpoints at 2 and 4

    # Each rank wrote its own shard; rank 0's trainer.pt holds no weights.
    step2 = run / "checkpoints" / "step_0000002"
    shards = sorted((step2 / "shards").glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [p.stat().st_size for p in shards]
    assert max(sizes) < 0.7 * sum(sizes), f"one rank wrote most of the state: {sizes}"
    state = torch.load(step2 / "trainer.pt", weights_only=False)
    assert "modules" not in state and "optimizers" not in state and state["sharded"] == "shards"
    assert (step2 / "trainer.pt").stat().st_size < min(sizes) / 4
    n_params = sum(v.numel() for v in load_model(str(run / "final")).state_dict().values())
    assert sum(sizes) > 4 * n_params * 2  # weights and AdamW's two moments, float32, all there

    # Two processes again, from step 2: exactly the losses and weights of the unbroken run.
    again = tmp_path / "again"
    shutil.copytree(run, again)
    _torchrun_ar(_overrides(corpus, codec, again), "--resume", str(again / step2.relative_to(run)))
    assert _losses(again) == _losses(run)
    a = load_model(str(run / "final")).state_dict()
    b = load_model(str(again / "final")).state_dict()
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0, msg=k)

    # One process reads the same shards: every weight and the optimizer's moments, resharded.
    cfg = load_ar_config("small_ar", _overrides(corpus, codec, tmp_path / "one"))
    trainer = ar_trainer(cfg, setup(cfg.run))
    fresh = {k: v.clone() for k, v in trainer.task.net.state_dict().items()}  # type: ignore[attr-defined]
    trainer.load_checkpoint(step2)
    loaded = trainer.task.net.state_dict()  # type: ignore[attr-defined]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step2 / "shards", tmp_path / "whole.pt")  # PyTorch's own reader
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    for k, v in whole["modules"]["model"].items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(fresh[k], loaded[k]) for k in loaded)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    opt = get_optimizer_state_dict(trainer.task.net, trainer.task.opt)  # type: ignore[attr-defined]
    saved = whole["optimizers"]["model"]["state"]
    assert opt["state"].keys() == saved.keys() and saved
    for name, moments in saved.items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt["state"][name][k], moments[k], rtol=0, atol=0)
    assert trainer.step == 2

    # ... and trains on from it, alone.
    one = tmp_path / "alone"
    shutil.copytree(run, one)
    cfg = load_ar_config("small_ar", _overrides(corpus, codec, one, steps=3))
    train_ar(cfg, resume=one / step2.relative_to(run))
    assert sorted(_losses(one)) == [1, 2, 3]
