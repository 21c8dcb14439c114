"""Runs that cannot destroy themselves: a fresh run refuses another run's folder, pruning
deletes only this run's own checkpoints (never the one `latest` names), a non-finite loss is
never applied (stop: nothing saved, good checkpoints kept; skip: the run goes on), and the
codec's posterior variance stays bounded in training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_fixtures import ar_overrides, codec_overrides, write_corpus

from hertz_agents.train.ar_trainer import NextStepObjective, train_ar
from hertz_agents.train.cli import main
from hertz_agents.train.codec_trainer import AutoEncoder, train_codec
from hertz_agents.train.config import load_ar_config, load_codec_config
from hertz_agents.train.logs import read_log
from hertz_agents.train.loop import Diverged
from hertz_agents.train.runfolder import RunFolderError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def codec_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("codec")
    return train_codec(load_codec_config("small_codec", codec_overrides(corpus, out, steps=2)))


def _cfg(corpus: Path, out: Path, codec_dir: Path, steps: int, *extra: str):
    return load_ar_config(
        "small_ar", [*ar_overrides(corpus, out, codec_dir, steps), "log.ckpt_every=1", *extra]
    )


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def test_a_fresh_run_refuses_a_folder_holding_another_run_unless_overwrite(
    corpus: Path, codec_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train_ar(_cfg(corpus, run, codec_dir, 4))
    assert _steps(run)[-1] == "step_0000004"
    with pytest.raises(RunFolderError, match="holds another run .*--overwrite"):
        train_ar(_cfg(corpus, run, codec_dir, 2))
    assert _steps(run)[-1] == "step_0000004"  # untouched
    # The command says it in one line, exit 2.
    argv = ["ar", "--config", "small_ar"]
    for item in ar_overrides(corpus, run, codec_dir, 2):
        argv += ["--set", item]
    assert main(argv) == 2
    assert "holds another run (checkpoints up to step_0000004)" in capsys.readouterr().err
    # --overwrite replaces it: only the new run's checkpoints, `latest` names one of them.
    assert main([*argv, "--overwrite"]) == 0
    assert _steps(run) == ["step_0000002"]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000002"
    assert main([*argv, "--resume"]) == 0  # and it resumes


def test_pruning_keeps_this_runs_newest_and_never_touches_others(
    corpus: Path, codec_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train_ar(_cfg(corpus, run, codec_dir, 4, "run.stop_at_step=2", "log.keep_checkpoints=2"))
    foreign = run / "checkpoints" / "step_0000040"  # e.g. copied in from another run
    foreign.mkdir()
    train_ar(_cfg(corpus, run, codec_dir, 4, "log.keep_checkpoints=2"), resume=run)
    assert _steps(run) == ["step_0000003", "step_0000004", "step_0000040"]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"
    # Resuming from an older checkpoint: the abandoned newer ones are not this run's records.
    train_ar(
        _cfg(corpus, run, codec_dir, 6, "log.keep_checkpoints=2"),
        resume=run / "checkpoints" / "step_0000003",
    )
    assert (run / "checkpoints" / "latest").read_text() == "step_0000006"
    assert {"step_0000005", "step_0000006", "step_0000040"} <= set(_steps(run))


def _nan_from(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    """Make the objective's loss NaN on the given forward calls (1-based), as a diverging
    model would; validation forwards run without gradients and are not counted."""
    forward = NextStepObjective.forward
    count = {"n": 0}

    def poisoned(self, latents):  # type: ignore[no-untyped-def]
        ce, nll, correct = forward(self, latents)
        if torch.is_grad_enabled():  # training, not validation
            count["n"] += 1
            if count["n"] in calls:
                ce = ce * float("nan")
        return ce, nll, correct

    monkeypatch.setattr(NextStepObjective, "forward", poisoned)


def test_non_finite_loss_stops_without_saving_or_deleting(
    corpus: Path, codec_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    _nan_from(monkeypatch, set(range(4, 100)))
    with pytest.raises(
        Diverged, match="step 4: loss or gradient not finite.*last good checkpoint: step_0000003"
    ):
        train_ar(_cfg(corpus, run, codec_dir, 8, "log.keep_checkpoints=2"))
    assert _steps(run) == ["step_0000002", "step_0000003"]
    assert not (run / "final").exists()
    state = torch.load(run / "checkpoints" / "step_0000003" / "trainer.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["modules"]["model"].values())
    assert [r["step"] for r in read_log(run / "log.jsonl") if r["split"] == "nonfinite"] == [4]
    monkeypatch.undo()
    final = train_ar(_cfg(corpus, run, codec_dir, 5, "log.keep_checkpoints=2"), resume=run)
    assert final.exists()


def test_non_finite_loss_is_skipped_when_asked(
    corpus: Path, codec_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    _nan_from(monkeypatch, {2})
    final = train_ar(_cfg(corpus, run, codec_dir, 4, 'run.on_nonfinite="skip"'))
    from hertz_agents.checkpoint import load_model

    net = load_model(str(final), device="cpu", dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    train = [r for r in read_log(run / "log.jsonl") if r["split"] == "train"]
    assert [r.get("skipped_steps", 0) for r in train] == [0, 1, 0, 0]
    assert all(isinstance(r["loss"], float) for r in train if r["step"] != 2)
    # Too many in a row still stops.
    _nan_from(monkeypatch, set(range(1, 100)))
    with pytest.raises(Diverged, match="3 steps in a row"):
        train_ar(
            _cfg(
                corpus,
                tmp_path / "b",
                codec_dir,
                6,
                'run.on_nonfinite="skip"',
                "run.max_skipped_steps=3",
            )
        )


def test_codec_posterior_variance_is_bounded_in_training(codec_dir: Path) -> None:
    from hertz_agents.train.export import load_codec

    codec = load_codec(codec_dir)
    with torch.no_grad():  # a young encoder whose log-variance runs away
        codec.compressor.proj_in.bias[32:] += 500.0
    audio = 0.1 * torch.randn(1, 1, 4000)
    _, mu, logvar = AutoEncoder(codec)(audio, sample=True)
    assert logvar.max() <= 4.0
    from hertz_agents.train.losses import gaussian_kl

    assert gaussian_kl(mu, logvar) < 30  # unbounded: about e^500


def test_ctrl_c_is_one_line_and_exit_130(
    corpus: Path,
    codec_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def interrupted(self, latents):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    argv = ["ar", "--config", "small_ar"]
    for item in ar_overrides(corpus, tmp_path / "run", codec_dir, 4):
        argv += ["--set", item]
    monkeypatch.setattr(NextStepObjective, "forward", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == "[rank 0] interrupted; continue with --resume from the last checkpoint"
