"""torchrun: two CPU processes (gloo) train both phases as one. With DDP the replicas end
identical; with FSDP the sharded AR follows the same losses and exports a whole model. Rank 0
writes the logs, checkpoints (with every rank's RNG) and the exported models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import write_corpus

from hertz_agents.checkpoint import load_model
from hertz_agents.train.export import load_codec
from hertz_agents.train.logs import read_log

WORKER = Path(__file__).parent / "train_dist_worker.py"


def _torchrun(corpus: Path, out: Path, strategy: str) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(corpus),
        str(out),
        strategy,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), files=4)


@pytest.fixture(scope="module")
def ddp_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _torchrun(corpus, tmp_path_factory.mktemp("ddp"), "ddp")


def _train_losses(run: Path, phase: str) -> list[float]:
    return [r["loss"] for r in read_log(run / phase / "log.jsonl") if r["split"] == "train"]


@pytest.mark.timeout(200)
def test_two_process_ddp_trains_both_phases_with_identical_replicas(ddp_run: Path) -> None:
    for phase in ("codec", "ar"):
        digests = [(ddp_run / f"{phase}_rank{r}.txt").read_text() for r in (0, 1)]
        assert digests[0] == digests[1], f"{phase}: the two replicas differ"
        ckpt = ddp_run / phase / "checkpoints"
        latest = ckpt / (ckpt / "latest").read_text()
        assert {p.name for p in latest.iterdir()} == {"trainer.pt", "rng_rank0.pt", "rng_rank1.pt"}
        assert [
            r["step"] for r in read_log(ddp_run / phase / "log.jsonl") if r["split"] == "train"
        ] == [1, 2, 3]
    load_codec(ddp_run / "codec" / "final")
    load_model(str(ddp_run / "ar" / "final"))


@pytest.mark.timeout(200)
def test_two_process_fsdp_matches_ddp_and_exports_a_whole_model(
    corpus: Path, ddp_run: Path, tmp_path: Path
) -> None:
    fsdp_run = _torchrun(corpus, tmp_path / "fsdp", "fsdp")
    digests = [(fsdp_run / f"ar_rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1], "the gathered FSDP weights differ between ranks"
    torch.testing.assert_close(
        torch.tensor(_train_losses(fsdp_run, "ar")), torch.tensor(_train_losses(ddp_run, "ar"))
    )
    a = load_model(str(fsdp_run / "ar" / "final")).state_dict()
    b = load_model(str(ddp_run / "ar" / "final")).state_dict()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_two_process_checkpoint_resumes_in_one_process(
    corpus: Path, ddp_run: Path, tmp_path: Path
) -> None:
    """Another process count continues from the weights, optimizer and step (not bit-exact:
    the data order depends on the process count)."""
    import shutil

    from train_fixtures import ar_overrides

    from hertz_agents.train.ar_trainer import train_ar
    from hertz_agents.train.config import load_ar_config

    run = tmp_path / "ar"
    shutil.copytree(ddp_run / "ar", run)
    codec = ddp_run / "codec" / "final"
    cfg = load_ar_config("small_ar", [*ar_overrides(corpus, run, codec, steps=4)])
    final = train_ar(cfg, resume=run / "checkpoints" / "step_0000002")
    steps = [r["step"] for r in read_log(run / "log.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]  # the log continues from the two-process run's step 2
    tuned = load_model(str(final), device="cpu", dtype=torch.float32).state_dict()
    start = torch.load(run / "checkpoints" / "step_0000002" / "trainer.pt", weights_only=False)
    assert any(not torch.equal(tuned[k], v) for k, v in start["modules"]["model"].items())
