"""Tests for bench/bench_kernel.py: the --smoke run works end to end, and the sanity check that
guards every timing rejects an implementation that computes the wrong numbers."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_kernel.py"


def test_smoke_run_prints_a_table_with_every_implementation():
    env = dict(os.environ, TRITON_INTERPRET="1")  # the smoke run times the interpreted kernel on CPU
    result = subprocess.run([sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "our kernel runs as: triton-interpreter" in out
    for name in ["ours (fused Triton)", "eager PyTorch", "torch.compile (aot_eager)"]:
        assert out.count(f"| {name} |") == 4, f"{name}: expected 2 shapes x 2 modes in\n{out}"
    assert "| ms" not in out and "TB/s" not in out  # no absolute timings from a CPU run


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernel", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_kernel", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_sanity_check_rejects_a_wrong_implementation(monkeypatch):
    bench = load_bench(monkeypatch)

    def off_by_one(logits, targets):  # the nll of the neighbouring class
        confidence, nll = bench.eager(logits, (targets + 1) % logits.shape[-1])
        return confidence, nll

    impls = {"eager PyTorch": bench.eager, "off by one": off_by_one}
    with pytest.raises(SystemExit, match="off by one disagrees"):
        bench.bench_shape(impls, 4, 50, torch.float32, torch.device("cpu"), warmup=0, repeats=1)


def test_full_table_formatting(monkeypatch, capsys):
    """The GPU report's code path (bandwidth, floor ratio, columns), exercised on CPU numbers that
    are only printed to pytest's captured output, never reported."""
    bench = load_bench(monkeypatch)
    cpu = torch.device("cpu")
    results = bench.bench_shape({"eager PyTorch": bench.eager}, 4, 50, torch.float32, cpu, warmup=0, repeats=1)
    bench.print_table(results, bench.copy_bandwidth(cpu, n_bytes=1 << 20, repeats=2), smoke=False)
    out = capsys.readouterr().out
    assert "| median ms | GB/s | x 3-pass floor | x eager | extra MiB | extra B/row |" in out
    assert out.count("| eager PyTorch |") == 2 and "| n/a | n/a |" in out
