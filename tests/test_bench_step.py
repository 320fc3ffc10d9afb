"""Tests for bench/bench_step.py: one configuration (partial fine-tuning, LoRA) runs end to end on CPU and reports a
measured peak and the planner's estimate of the same quantity (live tensor bytes), and the tables print every ratio.

    python -m pytest -q tests/test_bench_step.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_step.py"


@pytest.mark.parametrize("config", ["nrca", "nrca-lora"])
def test_one_configuration_reports_measured_and_planned_peaks(config):
    command = [sys.executable, str(BENCH), "--one", config, "--model", "tiny-llava", "--batch", "2",
               "--micro-batch", "2", "--steps", "1", "--warmup", "0", "--checkpointing"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["config"] == config and result["checkpointing"] is True and result["device"] == "cpu"
    assert result["peak_bytes"] > sum(result["breakdown"].get(k, 0) for k in ("param", "opt"))  # + activations
    # Same unit and same quantity (not a target: a mix-up of GiB and bytes or of what is counted would be 1000x).
    assert 0.5 < result["planned_bytes"] / result["peak_bytes"] < 2


def test_tables_print_every_ratio(capsys):
    sys.path.insert(0, str(BENCH.parent))
    import bench_step

    results = {(config, checkpointing): {"device": "cpu", "step_s": step * (2 if checkpointing else 1),
                                         "tokens_per_s": 100.0, "peak_bytes": peak * 2**30,
                                         "planned_bytes": peak * 2**30, "breakdown": {"act": peak * 2**30}}
               for config, step, peak in (("full", 1.0, 1.0), ("nrca", 2.0, 1.5), ("nrca-released", 4.0, 3.0))
               for checkpointing in (False, True)}
    args = SimpleNamespace(model="llava-narrow", batch=16, micro_batch=4, prompt_tokens=54, answer_tokens=24)
    bench_step.print_tables(args, results)
    printed = capsys.readouterr().out
    assert "| NRCA (ours) / Full FT, step time | 2.00x | 2.00x |" in printed
    assert "| NRCA (ours) / NRCA (released), peak memory | 0.50x | 0.50x |" in printed
    assert "| nrca-released | yes | 8.00 s |" in printed
    assert "NRCA's extra peak over Full FT (without checkpointing): 0.500 GiB" in printed
