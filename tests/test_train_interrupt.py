"""Ctrl-C under a real torchrun (two CPU processes, gloo): SIGINT to the launcher's process group
once training is under way (what a terminal's Ctrl-C does) stops the run with one line per
process and no traceback. With ``python -m hertz_agents.train.launch`` (torchrun's launcher and
arguments) that includes the launcher's line and exit code 130; with stock torchrun the workers
still print one line each, and the launcher adds its own traceback (torchrun's, not ours)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import ar_overrides, codec_overrides, write_corpus

from hertz_agents.train.codec_trainer import train_codec
from hertz_agents.train.config import load_codec_config
from hertz_agents.train.logs import read_log

ROOT = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ \[rank \d\] hertz_agents\.")  # the runs' logging
WORKER_LINE = "[rank {}] interrupted; continue with --resume from the last checkpoint"


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("interrupt")
    corpus = write_corpus(root / "corpus", files=4)
    codec = train_codec(load_codec_config("small_codec", codec_overrides(corpus, root / "c", 1)))
    return corpus, codec


def _interrupt(launcher: list[str], corpus: Path, codec: Path, out: Path) -> tuple[int, str]:
    """Start a long 2-process AR run, Ctrl-C it after its first logged step; (rc, output)."""
    overrides = [*ar_overrides(corpus, out, codec, steps=100_000), "log.ckpt_every=100000"]
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [
        sys.executable, "-m", *launcher, "--standalone", "--nproc_per_node", "2",
        "-m", "hertz_agents.train.cli", "ar", "--config", "small_ar", *sets,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (out / "log.jsonl").exists() or not [
            r for r in read_log(out / "log.jsonl") if r["split"] == "train"
        ]:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output


def _not_logging(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip() and not LOG_LINE.match(line)]


@pytest.mark.timeout(300)
def test_ctrl_c_under_the_launcher_is_one_line_per_process_and_exit_130(
    setup_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    rc, output = _interrupt(["hertz_agents.train.launch"], *setup_dirs, tmp_path / "run")
    assert "Traceback" not in output, output[-3000:]
    lines = _not_logging(output)
    assert sorted(lines) == sorted(
        [
            WORKER_LINE.format(0),
            WORKER_LINE.format(1),
            "[launcher] SIGINT: stopped the 2 local processes; "
            "continue with --resume from the last checkpoint",
        ]
    ), output[-3000:]
    assert rc == 130


@pytest.mark.timeout(300)
def test_ctrl_c_under_stock_torchrun_prints_one_line_per_worker(
    setup_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    rc, output = _interrupt(["torch.distributed.run"], *setup_dirs, tmp_path / "run")
    lines = _not_logging(output)
    for rank in (0, 1):
        assert lines.count(WORKER_LINE.format(rank)) == 1, output[-3000:]
    # The only traceback is the launcher's own (torchrun lets its SignalException escape main).
    assert output.count("Traceback") == 1 and "SignalException" in output, output[-3000:]
    assert "KeyboardInterrupt" not in output and "hertz_agents" not in output.split("Traceback")[1]
    assert rc == 1


def test_an_error_after_ctrl_c_is_the_ctrl_c(
    setup_dirs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Under torchrun a peer stopped by the same Ctrl-C breaks the collective this process waits
    in: a RuntimeError ("Connection closed by peer") may surface instead of KeyboardInterrupt.
    Stand-in for that race: the step gets SIGINT, something swallows it, then a collective
    error comes. The run still ends with the one line and 130."""
    from hertz_agents.train.ar_trainer import NextStepObjective
    from hertz_agents.train.cli import main

    def broken_collective(self, latents):  # type: ignore[no-untyped-def]
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            pass
        raise RuntimeError("[gloo] Connection closed by peer")

    monkeypatch.setattr(NextStepObjective, "forward", broken_collective)
    corpus, codec = setup_dirs
    argv = ["ar", "--config", "small_ar"]
    for item in ar_overrides(corpus, tmp_path / "run", codec, 4):
        argv += ["--set", item]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == WORKER_LINE.format(0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
