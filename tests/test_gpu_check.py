"""benchmarks/gpu_check.py runs end to end on the CPU in its --dry-run mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1500)  # every part of the check, tiny, on a busy 2-core machine
def test_gpu_check_dry_run_reports_every_part(tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--dry-run",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    for key in ("1_eager", "2_eager", "1_compiled"):
        assert report["ticks"][key]["median_ms"] > 0
    assert report["memory"]["1"]["bytes_per_session"] > 0
    assert report["quantized"]["weights_int8"]["weights_bytes"] < report["weights_bytes"]
    assert (
        report["quantized"]["kv_int8"]["bytes_per_session"]
        < report["memory"]["1"]["bytes_per_session"]
    )
    assert report["agreement"]["token_agreement"] > 0.8
    refill, ring = report["rollover"]["refill"], report["rollover"]["ring"]
    assert refill["rollovers"] >= 2 and ring["rollovers"] >= 2
    assert ring["bytes_per_session"] < refill["bytes_per_session"]  # no shadow cache


def test_gpu_check_without_a_gpu_says_so():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "--dry-run" in result.stderr and "Traceback" not in result.stderr
