"""Fused token confidence: p_y = softmax(z)[y] and nll = -log p_y in one pass, with its backward.

NRCA (paper Sec. 3.2) needs, for every answer token t, the ground-truth confidence
p_t = softmax(z_t)[y_t] (Eq. 3-4) and the cross-entropy -log p_t (Eq. 5a), on the clean and on the
noisy branch, over a 32k-152k vocabulary. The plain way materialises N x V fp32 probabilities;
this file computes both numbers with one online-softmax pass over each row, keeping only four
fp32 numbers per row, and recomputes the probabilities in the backward pass.

Read it in this order:
  1. `reference_token_confidence`: the definition in plain PyTorch.
  2. `_forward_kernel`, `_backward_kernel`: the Triton kernels (one program per row).
  3. `_forward`, `_backward`: launch wrappers (row layout, allocation, grid).
  4. `_TokenConfidence`: the autograd Function that ties them together.
  5. `token_confidence`: the one public function (checks, dispatch).

Dispatch: CUDA tensors run the compiled Triton kernels; CPU tensors run the same kernels in the
Triton interpreter when TRITON_INTERPRET=1 was set before triton was imported (that is how the
tests run), otherwise the reference. `kernel_backend(device)` says which one runs.

What it does not do: label smoothing, class weights, z-loss, reductions over tokens (nrca.py does
those), float64 logits, double backward, or writing the gradient into the logits (the backward
allocates a fresh gradient; it never touches the caller's tensor).

Run the tests:      TRITON_INTERPRET=1 python -m pytest -q tests/test_confidence_kernel.py
Run the benchmark:  python bench/bench_kernel.py            (GPU; `--smoke` for a tiny CPU run)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when the kernels below are decorated (at import), so the
# value at import time is the one that decides whether they are interpreted.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TARGET_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------
# 1. Reference: the definition, in plain PyTorch
# ----------------------------------------------------------------------------------------------
def reference_token_confidence(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """confidence = softmax(logits)[target] (Eq. 3-4), nll = logsumexp(logits) - logits[target] (Eq. 5a).

    Same contract as `token_confidence`: both outputs are shaped like `targets`, exactly 0 where
    `targets == ignore_index`, and NaN where a target lies outside [0, V) (when `validate` is False;
    when it is True such a target raises ValueError; the reference's gradient on such rows is not
    meaningful). Computed in float32, or in float64 for float64 logits so that tests and gradcheck
    can use it as the ground truth.
    """
    _check_inputs(logits, targets, allow_float64=True)
    if validate:
        check_targets(targets, logits.shape[-1], ignore_index)
    vocab_size = logits.shape[-1]
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ignored = targets == ignore_index
    in_range = (targets >= 0) & (targets < vocab_size) & ~ignored
    # Ignored rows are replaced by zeros before any arithmetic so that they get exactly zero
    # gradient even if they hold -inf everywhere (log 0 would otherwise turn 0 * inf into NaN).
    z = logits.to(compute_dtype).masked_fill(ignored.unsqueeze(-1), 0.0)  # (..., V)
    # The result does not depend on the shift m, so it is detached (its gradient is exactly 0).
    m = z.amax(dim=-1, keepdim=True).detach()  # (..., 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row: shift by 0
    d = torch.exp(z - m).sum(dim=-1)  # (...,)  d = sum_j exp(z_j - m)
    safe_targets = torch.where(in_range, targets, torch.zeros_like(targets)).long()
    z_y = z.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (...,)
    # nll = (m - z_y) + log d: the two large terms cancel before anything is rounded.
    nll = (m.squeeze(-1) - z_y) + torch.log(d)
    nll = torch.where(in_range, nll, torch.full_like(nll, float("nan")))
    nll = torch.where(ignored, torch.zeros_like(nll), nll)
    confidence = torch.where(ignored, torch.zeros_like(nll), torch.exp(-nll))
    return confidence, nll


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels: one program per row, the row read in blocks of BLOCK_V columns
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_pointer(logits_ptr, row, rows_inner, stride_outer, stride_inner):
    # Rows are addressed as (outer, inner) pairs so that a transposed (B, T, V) view needs no copy.
    # `row` is int64, so every offset below is computed in int64 (N * V may exceed 2^31).
    return logits_ptr + (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner


@triton.jit
def _forward_kernel(
    logits_ptr, targets_ptr,  # (rows, V) any strides, (rows,) int32/int64
    confidence_ptr, nll_ptr, row_max_ptr, row_sum_ptr,  # (rows,) float32 outputs
    rows_inner, stride_outer, stride_inner, stride_col, vocab_size, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_start = _row_pointer(logits_ptr, row, rows_inner, stride_outer, stride_inner)
    target = tl.load(targets_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < vocab_size) & (target != ignore_index)
    # Ignored rows are never read: their loads cover 0 columns.
    cols_to_read = tl.where(ignored, 0, vocab_size)

    # Online softmax over the row (all in fp32):
    #   m_new = max(m, max_j z_j),  d_new = d * exp(m - m_new) + sum_j exp(z_j - m_new)
    # so that at the end m = max_j z_j and d = sum_j exp(z_j - m).
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.full((), 0.0, tl.float32)
    for block_start in range(0, vocab_size, BLOCK_V):
        cols = block_start + tl.arange(0, BLOCK_V)
        z = tl.load(row_start + cols.to(tl.int64) * stride_col, mask=cols < cols_to_read, other=float("-inf"))
        z = z.to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every logit seen so far is -inf, m_new is -inf and z - m_new would be
        # -inf - (-inf) = NaN; shift by 0 instead (every term is exp(-inf) = 0 either way).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new

    z_target = tl.load(row_start + tl.where(in_range, target, 0) * stride_col, mask=in_range, other=0.0)
    z_target = z_target.to(tl.float32)
    # nll = lse - z_y = (m - z_y) + log d. Subtracting m - z_y first keeps the result exact when
    # every logit carries a large common offset (1e6 in fp32); lse = m + log d would round it away.
    nll = (m - z_target) + tl.log(tl.where(ignored, 1.0, d))  # ignored rows summed nothing: d = 0
    # A target outside [0, V) gets NaN so nothing plausible comes out when validation is skipped.
    nll = tl.where(in_range, nll, float("nan"))
    nll = tl.where(ignored, 0.0, nll)
    confidence = tl.where(ignored, 0.0, tl.exp(-nll))  # Eq. (3)-(4): p_y = exp(-nll)
    tl.store(confidence_ptr + row, confidence)
    tl.store(nll_ptr + row, nll)
    tl.store(row_max_ptr + row, m)
    tl.store(row_sum_ptr + row, d)


# Gradient. With p = softmax(z), nll = lse(z) - z_y and p_y = exp(-nll):
#   d nll / d z_j = p_j - [j == y]                        (d lse / d z_j = p_j)
#   d p_y / d z_j = -p_y * d nll / d z_j = p_y ([j == y] - p_j)
# For upstream gradients g_conf (of the confidence) and g_nll (of the nll) of the same row:
#   grad_z_j = g_nll (p_j - [j == y]) + g_conf p_y ([j == y] - p_j)
#            = (g_nll - g_conf p_y) (p_j - [j == y])  =  coef * (p_j - onehot_j)
# The backward recomputes p_j = exp(z_j - m) / d from the saved per-row m and d (never lse, which
# would lose z_j - lse to rounding at large offsets) and is zero on ignored rows.
@triton.jit
def _backward_kernel(
    logits_ptr, targets_ptr,  # (rows, V) any strides, (rows,)
    confidence_ptr, row_max_ptr, row_sum_ptr,  # (rows,) float32, saved by the forward
    grad_confidence_ptr, grad_nll_ptr,  # (rows,) float32 upstream gradients
    grad_logits_ptr,  # (rows, V) contiguous, the logits' dtype, freshly allocated
    rows_inner, stride_outer, stride_inner, stride_col, vocab_size, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_start = _row_pointer(logits_ptr, row, rows_inner, stride_outer, stride_inner)
    grad_row_start = grad_logits_ptr + row * vocab_size
    target = tl.load(targets_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    cols_to_read = tl.where(ignored, 0, vocab_size)  # ignored rows are never read

    p_target = tl.load(confidence_ptr + row)
    coef = tl.load(grad_nll_ptr + row) - tl.load(grad_confidence_ptr + row) * p_target
    m = tl.load(row_max_ptr + row)
    shift = tl.where(m == float("-inf"), 0.0, m)  # as in the forward
    inv_d = 1.0 / tl.where(ignored, 1.0, tl.load(row_sum_ptr + row))  # ignored rows summed nothing
    for block_start in range(0, vocab_size, BLOCK_V):
        cols = block_start + tl.arange(0, BLOCK_V)
        in_row = cols < vocab_size
        z = tl.load(row_start + cols.to(tl.int64) * stride_col, mask=cols < cols_to_read, other=float("-inf"))
        p = tl.exp(z.to(tl.float32) - shift) * inv_d  # p_j = exp(z_j - m) / d
        # The target column's "- 1" is applied in fp32 before rounding to the logits' dtype:
        # when p_y -> 1, bf16 cannot hold p_y - 1 if p_y is rounded first.
        onehot = tl.where(cols == target, 1.0, 0.0)
        grad = tl.where(ignored, 0.0, coef * (p - onehot))
        tl.store(grad_row_start + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------
# 3. Launch wrappers
# ----------------------------------------------------------------------------------------------
def launch_config(vocab_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): the one block-size heuristic, no autotuning.

    Blocks of up to 4096 columns (16 KiB of fp32 in registers over 8 warps = 16 values a thread)
    are wide enough to keep loads in flight for a memory-bound kernel; small vocabularies use one
    power-of-two block that covers the row.
    """
    block_v = min(triton.next_power_of_2(vocab_size), 4096)
    num_warps = 8 if block_v >= 2048 else 4
    return block_v, num_warps


def row_layout(logits: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows_inner, stride_outer, stride_inner) addressing the rows of `logits` without a copy.

    Row r lives at (r // rows_inner) * stride_outer + (r % rows_inner) * stride_inner. The leading
    dimensions are merged where they are laid out one inside the other; None when more than two
    groups remain (then the caller makes the tensor contiguous).
    """
    groups: list[tuple[int, int]] = []  # (size, stride), outermost first
    for size, stride in zip(logits.shape[:-1], logits.stride()[:-1], strict=True):
        if size == 1:
            continue
        if groups and groups[-1][1] == size * stride:
            groups[-1] = (groups[-1][0] * size, stride)
        else:
            groups.append((size, stride))
    if not groups:
        return 1, 0, 0
    if len(groups) == 1:
        return groups[0][0], 0, groups[0][1]
    if len(groups) == 2:
        return groups[1][0], groups[0][1], groups[1][1]
    return None


def _forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Launch the forward kernel. targets: (rows,). Returns four (rows,) float32 tensors."""
    rows, vocab_size = targets.numel(), logits.shape[-1]
    confidence = torch.empty(rows, dtype=torch.float32, device=logits.device)  # (N,)
    nll = torch.empty(rows, dtype=torch.float32, device=logits.device)  # (N,)
    row_max = torch.empty(rows, dtype=torch.float32, device=logits.device)  # (N,)
    row_sum = torch.empty(rows, dtype=torch.float32, device=logits.device)  # (N,)
    if rows == 0:
        return confidence, nll, row_max, row_sum
    rows_inner, stride_outer, stride_inner = row_layout(logits)
    block_v, num_warps = launch_config(vocab_size)
    _forward_kernel[(rows,)](
        logits, targets, confidence, nll, row_max, row_sum,
        rows_inner, stride_outer, stride_inner, logits.stride(-1), vocab_size, ignore_index,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return confidence, nll, row_max, row_sum


def _backward(logits, targets, confidence, row_max, row_sum, grad_confidence, grad_nll, ignore_index):
    """Launch the backward kernel. Returns a new contiguous gradient shaped and typed like logits."""
    rows, vocab_size = targets.numel(), logits.shape[-1]
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # (..., V)
    if rows == 0:
        return grad_logits
    # Upstream gradients may be expanded (stride 0) or another dtype: make them (rows,) fp32.
    grad_confidence = grad_confidence.reshape(rows).to(torch.float32).contiguous()  # (N,)
    grad_nll = grad_nll.reshape(rows).to(torch.float32).contiguous()  # (N,)
    rows_inner, stride_outer, stride_inner = row_layout(logits)
    block_v, num_warps = launch_config(vocab_size)
    _backward_kernel[(rows,)](
        logits, targets, confidence, row_max, row_sum, grad_confidence, grad_nll, grad_logits,
        rows_inner, stride_outer, stride_inner, logits.stride(-1), vocab_size, ignore_index,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return grad_logits


# ----------------------------------------------------------------------------------------------
# 4. Autograd Function
# ----------------------------------------------------------------------------------------------
class _TokenConfidence(torch.autograd.Function):
    """(logits (..., V), targets (rows,)) -> (confidence (rows,), nll (rows,)); O(rows) saved state."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        confidence, nll, row_max, row_sum = _forward(logits, targets, ignore_index)
        # Saved: the logits themselves (a reference, not a copy) and 3 floats per row.
        ctx.save_for_backward(logits, targets, confidence, row_max, row_sum)
        ctx.ignore_index = ignore_index
        return confidence, nll

    @staticmethod
    def backward(ctx, grad_confidence, grad_nll):
        logits, targets, confidence, row_max, row_sum = ctx.saved_tensors
        grad_logits = _backward(
            logits, targets, confidence, row_max, row_sum, grad_confidence, grad_nll, ctx.ignore_index
        )
        return grad_logits, None, None


# ----------------------------------------------------------------------------------------------
# 5. Public function
# ----------------------------------------------------------------------------------------------
def kernel_backend(device: torch.device | str) -> str:
    """Which implementation `token_confidence` runs for tensors on `device`:
    "triton" (compiled, CUDA), "triton-interpreter" (CPU with TRITON_INTERPRET=1) or "reference"."""
    device = torch.device(device)
    if device.type == "cuda" and not _INTERPRETED:
        return "triton"
    if device.type in ("cpu", "cuda") and _INTERPRETED:
        return "triton-interpreter"
    return "reference"


def token_confidence(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token confidence p_y = softmax(logits)[y] (Eq. 3-4) and nll = -log p_y (Eq. 5a).

    logits:  (..., V) float16 / bfloat16 / float32, any strides. Never modified.
    targets: (...) int32 / int64, the leading shape of `logits`; `ignore_index` marks rows to skip.
    validate: check that every target is in [0, V) or ignore_index (raises ValueError naming the
        value and position). This reads the targets on the host (one device sync); pass False
        under torch.compile / CUDA graphs, where out-of-range rows come out as NaN instead.
    Returns (confidence, nll): float32, shaped like `targets`, exactly 0 on ignored rows,
    differentiable w.r.t. `logits` (both at once; the gradient has the logits' dtype).
    """
    _check_inputs(logits, targets)
    if validate:
        check_targets(targets, logits.shape[-1], ignore_index)
    if kernel_backend(logits.device) == "reference":
        return reference_token_confidence(logits, targets, ignore_index, validate=False)
    if row_layout(logits) is None:  # > 2 non-mergeable leading dims: rare, costs one copy
        logits = logits.contiguous()
    confidence, nll = _TokenConfidence.apply(logits, targets.reshape(-1), ignore_index)
    return confidence.view(targets.shape), nll.view(targets.shape)


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, allow_float64: bool = False) -> None:
    """Shape / dtype / device checks that need no device sync."""
    allowed = LOGITS_DTYPES + ((torch.float64,) if allow_float64 else ())
    if logits.dtype not in allowed:
        raise TypeError(f"token_confidence: logits must have dtype in {allowed}, got {logits.dtype}")
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(f"token_confidence: targets must be int32 or int64, got {targets.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"token_confidence: logits must be (..., V) with V >= 1, got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"token_confidence: targets must have the leading shape of logits {tuple(logits.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.device != logits.device:
        raise ValueError(f"token_confidence: targets on {targets.device} but logits on {logits.device}")


def check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise ValueError naming the first target outside [0, V) that is not ignore_index (host sync)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        position = tuple(bad.nonzero()[0].tolist())
        value = int(targets[position])
        raise ValueError(
            f"token_confidence: targets{list(position)} = {value} is outside [0, {vocab_size}) "
            f"and is not ignore_index ({ignore_index}); {int(bad.sum())} such target(s) in total"
        )
