"""bench/gpu_check.sh --dry-run: the GPU script's CPU-possible steps at tiny shapes (the compile step is left out
here: tests/test_kernel_compile.py runs it in CI already).

    python -m pytest -q tests/test_gpu_check.py
"""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


def test_dry_run_writes_every_step_and_a_summary(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--skip", "compile"], capture_output=True, text=True,
                          env=env, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "--dry-run (CPU, tiny shapes" in summary and "| compile | skipped |" in summary
    for step in ("bench_kernel", "bench_step", "testbed"):
        assert f"| {step} | 0 |" in summary, summary
        assert (tmp_path / f"{step}.log").stat().st_size > 0
    assert "our kernel runs as: triton-interpreter" in (tmp_path / "bench_kernel.log").read_text()
    assert (tmp_path / "bench_step.json").is_file() and (tmp_path / "testbed-nrca-metrics.jsonl").is_file()
    assert "every step passed" in summary
