"""Benchmark of confidence_kernel.token_confidence against the usual ways of computing the same thing.

Side by side, in one run, for each shape: our fused Triton kernel; eager PyTorch
(`F.cross_entropy(reduction="none")` then `exp(-nll)`); `torch.compile` of that same function; and
Liger-Kernel's cross entropy (+ exp) when `liger_kernel` is importable. Each is timed for the
forward alone and for forward + backward (upstream gradients for both outputs). Reported: median
time, peak extra memory (beyond the inputs, outputs and gradient included), achieved bandwidth
against the 3-pass floor (forward reads N x V once; backward reads it again and writes the N x V
gradient), and the ratio to that floor at the device's copy bandwidth, measured here by timing a
large device-to-device copy (bytes read + written / time).

Every implementation is first checked against eager PyTorch on the same inputs; the script exits
non-zero if one disagrees, so a fast wrong kernel cannot produce a good-looking table.

Shapes: (16384, 32000) and (4096, 151936) in bf16 (LLaVA-1.5 and Qwen-class vocabularies), and
NRCA's own case, 16 samples x 64 answer tokens over LLaVA's 32064 ids, in bf16.

Run (GPU):      python bench/bench_kernel.py
Run (CPU test): TRITON_INTERPRET=1 python bench/bench_kernel.py --smoke
    --smoke uses tiny shapes on CPU and prints only ratios to eager PyTorch: CPU (let alone
    interpreter) timings say nothing about a GPU. In smoke mode torch.compile uses the
    "aot_eager" backend (tracing without C++ code generation) to keep the run short.
What it does not do: autotune, compare accuracy beyond the sanity check, or write BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from confidence_kernel import kernel_backend, token_confidence  # noqa: E402

GPU_SHAPES = [(16384, 32000, torch.bfloat16), (4096, 151936, torch.bfloat16), (16 * 64, 32064, torch.bfloat16)]
SMOKE_SHAPES = [(8, 1000, torch.float32), (4, 5003, torch.bfloat16)]
IGNORE = -100
LIGER = "Liger-Kernel CE"


# ----------------------------------------------------------------------------------------------
# The implementations: each maps (logits (N, V), targets (N,)) -> (confidence (N,), nll (N,))
# ----------------------------------------------------------------------------------------------
def ours(logits, targets):
    return token_confidence(logits, targets, validate=False)  # no host sync in the timed region


def eager(logits, targets):
    nll = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE)  # (N,) logits' dtype
    return torch.exp(-nll), nll


def make_liger():
    """Liger-Kernel's cross entropy + exp, or None when liger_kernel is not installed.

    Liger computes the gradient during the forward and stores it in the logits' memory; the
    benchmark therefore gives it its own copy of the logits."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerCrossEntropyLoss(reduction="none", ignore_index=IGNORE)

    def liger(logits, targets):
        nll = loss(logits, targets)
        return torch.exp(-nll), nll

    return liger


def implementations(device, smoke):
    impls = {"ours (fused Triton)": ours, "eager PyTorch": eager}
    backend = "aot_eager" if smoke else "inductor"
    impls[f"torch.compile ({backend})"] = torch.compile(eager, backend=backend)
    liger = make_liger() if device.type == "cuda" else None
    if liger is not None:
        impls[LIGER] = liger
    return impls


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup, repeats):
    """Median wall time of fn() (CUDA events on a GPU; launch overhead included, as in training)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_time = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start_time)
    return statistics.median(times)


def peak_extra_bytes(fn, device):
    """Peak memory allocated while fn runs, above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def copy_bandwidth(device, n_bytes=1 << 30, repeats=20):
    """Device copy bandwidth in bytes/s: (read + write) bytes of a large copy / median time."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, warmup=3, repeats=repeats)
    return 2 * n_bytes / seconds


@dataclass
class Row:
    shape: str
    impl: str
    mode: str
    seconds: float
    floor_bytes: int
    extra_bytes: int | None
    rows: int


def bench_shape(impls, rows, vocab, dtype, device, warmup, repeats):
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(rows, vocab, generator=generator).to(dtype).to(device)  # (N, V)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)  # (N,)
    grad_confidence = torch.randn(rows, generator=generator).to(device)  # (N,)
    grad_nll = torch.randn(rows, generator=generator).to(device)  # (N,)
    shape = f"({rows}, {vocab}) {str(dtype).replace('torch.', '')}"
    with torch.no_grad():
        _, expected_nll = eager(logits.float(), targets)  # (N,) fp32 ground truth for the sanity check

    results = []
    for name, fn in impls.items():
        overwrites_input = name == LIGER  # Liger stores its gradient in the logits it is given
        # Sanity check before timing: the same nll as fp32 PyTorch, to the precision of its output.
        try:
            with torch.no_grad():
                _, nll = fn(logits.clone() if overwrites_input else logits, targets)
        except Exception as error:  # an optional third-party kernel may not support this case
            if name != LIGER:
                raise
            print(f"{name}: failed on {shape} ({type(error).__name__}: {error}), left out")
            continue
        tolerance = 1e-4 if nll.dtype == torch.float32 else 1e-2
        if not torch.allclose(nll.float(), expected_nll, rtol=tolerance, atol=tolerance):
            error = (nll.float() - expected_nll).abs().max().item()
            raise SystemExit(f"bench_kernel: {name} disagrees with PyTorch on {shape}: max |nll diff| {error:.3g}")

        # A leaf that aliases the logits (a copy only for Liger): training-style autograd recording.
        leaf = (logits.clone() if overwrites_input else logits).detach().requires_grad_(True)

        def forward(fn=fn, leaf=leaf):
            fn(leaf, targets)  # outputs and whatever autograd saves are dropped at return

        def forward_backward(fn=fn, leaf=leaf):
            leaf.grad = None
            confidence, nll = fn(leaf, targets)
            torch.autograd.backward([confidence, nll], [grad_confidence.to(confidence.dtype), grad_nll.to(nll.dtype)])

        for mode, run, passes in (("forward", forward, 1), ("forward+backward", forward_backward, 3)):
            extra = peak_extra_bytes(run, device)
            seconds = median_seconds(run, device, warmup, repeats)
            floor_bytes = passes * logits.numel() * logits.element_size()
            results.append(Row(shape, name, mode, seconds, floor_bytes, extra, rows))
        leaf.grad = None
    return results


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def print_table(results, bandwidth, smoke):
    eager_seconds = {(r.shape, r.mode): r.seconds for r in results if r.impl == "eager PyTorch"}
    if smoke:
        header = ["shape", "implementation", "mode", "time / eager"]
    else:
        header = ["shape", "implementation", "mode", "median ms", "GB/s", "x 3-pass floor", "x eager",
                  "extra MiB", "extra B/row"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        vs_eager = f"{r.seconds / eager_seconds[(r.shape, r.mode)]:.2f}"
        if smoke:
            cells = [r.shape, r.impl, r.mode, vs_eager]
        else:
            floor_seconds = r.floor_bytes / bandwidth
            extra_mib = "n/a" if r.extra_bytes is None else f"{r.extra_bytes / 2**20:.1f}"
            extra_row = "n/a" if r.extra_bytes is None else f"{r.extra_bytes / r.rows:.0f}"
            cells = [r.shape, r.impl, r.mode, f"{r.seconds * 1e3:.3f}", f"{r.floor_bytes / r.seconds / 1e9:.0f}",
                     f"{r.seconds / floor_seconds:.2f}", vs_eager, extra_mib, extra_row]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, ratios only (for tests)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls; the median is reported")
    args = parser.parse_args(argv)

    if args.smoke:
        device, shapes = torch.device("cpu"), SMOKE_SHAPES
        warmup, repeats = args.warmup or 1, args.repeats or 3
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_kernel: needs a CUDA GPU (use --smoke for a tiny CPU run)")
        device, shapes = torch.device("cuda"), GPU_SHAPES
        warmup, repeats = args.warmup or 5, args.repeats or 20

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run: ratios only)"
    print(f"device: {name}; our kernel runs as: {kernel_backend(device)}")
    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}, commit {git_commit()}, "
          f"{datetime.date.today().isoformat()}")
    bandwidth = None
    if args.smoke:
        print("smoke run: checks that every implementation runs and agrees; CPU ratios say nothing about a GPU")
    else:
        bandwidth = copy_bandwidth(device)
        print(f"measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write of a 1 GiB copy)")

    impls = implementations(device, args.smoke)
    if LIGER not in impls:
        print("Liger-Kernel: not importable here, left out")
    results = []
    for rows, vocab, dtype in shapes:
        results += bench_shape(impls, rows, vocab, dtype, device, warmup, repeats)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(results, bandwidth, args.smoke)


if __name__ == "__main__":
    main()
