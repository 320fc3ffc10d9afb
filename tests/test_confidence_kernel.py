"""Tests for confidence_kernel.py: the Triton kernels against a float64 reference, values and gradients.

On CPU these run the real Triton kernels through the interpreter, so they need
    TRITON_INTERPRET=1 python -m pytest -q tests/test_confidence_kernel.py
(every comparison asserts that the Triton path ran, not the reference). On a CUDA machine the same
tests run the compiled kernels, and the GPU-only tests at the end run too.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import confidence_kernel
from confidence_kernel import kernel_backend, launch_config, reference_token_confidence, token_confidence

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100

# Outputs are computed in fp32 from the (already rounded) inputs, so their tolerance does not depend
# on the logits' dtype. Gradients are rounded to the logits' dtype once, at the very end.
VALUE_TOL = {"rtol": 2e-5, "atol": 2e-6}
GRAD_TOL = {
    torch.float32: {"rtol": 2e-5, "atol": 1e-6},
    torch.float16: {"rtol": 2e-3, "atol": 1e-5},  # half an fp16 ulp is 2^-11 relative
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-5},  # half a bf16 ulp is 2^-8 relative
}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def assert_close_verbose(actual, expected, rtol, atol, name, max_report=5):
    """Like torch.testing.assert_close (NaN == NaN), but the failure lists the worst elements:
    position, actual, expected, absolute and relative difference, and how many elements fail."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    both_nan = actual.isnan() & expected.isnan()
    same_inf = torch.isinf(actual) & (actual == expected)
    diff = (actual - expected).abs()
    bad = ~(both_nan | same_inf | (diff <= atol + rtol * expected.abs()))
    if not bool(bad.any()):
        return
    diff = torch.where(bad, diff.nan_to_num(nan=math.inf), torch.zeros_like(diff))
    order = diff.flatten().argsort(descending=True)[: min(max_report, int(bad.sum()))]
    lines = [
        f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol}, atol={atol}); worst:"
    ]
    for flat_index in order.tolist():
        position = tuple(torch.unravel_index(torch.tensor(flat_index), actual.shape)) if actual.dim() else ()
        position = tuple(int(i) for i in position)
        a, e = actual[position].item(), expected[position].item()
        relative = abs(a - e) / abs(e) if e != 0 else math.inf
        lines.append(f"  at {position}: actual {a:.9g}  expected {e:.9g}  |diff| {abs(a - e):.3g}  rel {relative:.3g}")
    raise AssertionError("\n".join(lines))


def run_kernel(logits, targets, grad_confidence=None, grad_nll=None, ignore_index=IGNORE, validate=True):
    """token_confidence forward (+ backward with the given upstream gradients) on the Triton path."""
    assert kernel_backend(logits.device) != "reference", (
        "these tests must exercise the Triton kernels: run them with TRITON_INTERPRET=1 on CPU"
    )
    logits = logits.detach().requires_grad_(True)
    confidence, nll = token_confidence(logits, targets, ignore_index=ignore_index, validate=validate)
    grad = None
    if grad_confidence is not None:
        (confidence * grad_confidence + nll * grad_nll).sum().backward()
        grad = logits.grad
    return confidence, nll, grad


def run_reference64(logits, targets, grad_confidence=None, grad_nll=None, ignore_index=IGNORE):
    """The float64 reference on the same (already rounded) logits: the ground truth."""
    logits64 = logits.detach().double().requires_grad_(True)
    confidence, nll = reference_token_confidence(logits64, targets, ignore_index=ignore_index, validate=False)
    grad = None
    if grad_confidence is not None:
        (confidence * grad_confidence.double() + nll * grad_nll.double()).sum().backward()
        grad = logits64.grad
    return confidence, nll, grad


def compare(logits, targets, ignore_index=IGNORE, seed=0):
    """Kernel vs float64 reference: values and gradients, with per-row upstream gradients for both
    outputs at once (non-unit, of both signs)."""
    generator = torch.Generator().manual_seed(seed)
    grad_confidence = torch.randn(targets.shape, generator=generator).to(logits.device)
    grad_nll = torch.randn(targets.shape, generator=generator).to(logits.device)
    confidence, nll, grad = run_kernel(logits, targets, grad_confidence, grad_nll, ignore_index)
    ref_confidence, ref_nll, ref_grad = run_reference64(logits, targets, grad_confidence, grad_nll, ignore_index)
    assert confidence.dtype == nll.dtype == torch.float32
    assert confidence.shape == nll.shape == targets.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert_close_verbose(confidence, ref_confidence, name="confidence", **VALUE_TOL)
    assert_close_verbose(nll, ref_nll, name="nll", **VALUE_TOL)
    assert_close_verbose(grad, ref_grad, name="grad_logits", **GRAD_TOL[logits.dtype])
    return confidence, nll, grad


def random_case(shape, dtype, seed=0, ignore_fraction=0.25, scale=3.0):
    """Logits (shape) ~ N(0, scale^2) in `dtype`; targets uniform in [0, V) with some ignored."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=generator) * scale).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    ignored = torch.rand(shape[:-1], generator=generator) < ignore_fraction
    targets[ignored] = IGNORE
    return logits.to(DEVICE), targets.to(DEVICE)


# ----------------------------------------------------------------------------------------------
# Which implementation runs
# ----------------------------------------------------------------------------------------------
def test_tests_run_the_triton_kernels():
    # On CPU the interpreter must run (TRITON_INTERPRET=1); on a GPU either compiled or interpreted.
    expected = "triton" if DEVICE.type == "cuda" and not confidence_kernel._INTERPRETED else "triton-interpreter"
    assert kernel_backend(DEVICE) == expected, "on CPU run the kernel tests with TRITON_INTERPRET=1"


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setattr(confidence_kernel, "_INTERPRETED", False)
    assert kernel_backend("cpu") == "reference"
    logits, targets = random_case((4, 9), torch.float32)
    logits, targets = logits.cpu(), targets.cpu()
    confidence, nll = token_confidence(logits, targets)
    ref_confidence, ref_nll = reference_token_confidence(logits, targets)
    assert torch.equal(confidence, ref_confidence) and torch.equal(nll, ref_nll)


# ----------------------------------------------------------------------------------------------
# Shapes and layouts
# ----------------------------------------------------------------------------------------------
SHAPES = {
    "realistic_2x16x32064": (2, 16, 32064),  # NRCA's (16 x 64 answer tokens, 32064) scaled to CPU
    "V1": (4, 1),
    "V7": (5, 7),
    "V32000": (3, 32000),
    "V32001": (3, 32001),
    "V65537": (2, 65537),
    "N0": (0, 7),
    "N1": (1, 32001),
    "3d": (2, 3, 7),
    "1d_single_row": (5003,),  # logits (V,), a 0-d target
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, dtype):
    logits, targets = random_case(shape, dtype)
    compare(logits, targets)


def _non_contiguous(kind, dtype):
    """Logits views that are not plain contiguous (rows, V) tensors, and matching targets."""
    generator = torch.Generator().manual_seed(1)
    vocab = 5003  # two blocks, the second one partial

    def base(*shape):  # a contiguous buffer in `dtype` on DEVICE that the views below look into
        return (torch.randn(shape, generator=generator) * 3).to(dtype).to(DEVICE)

    if kind == "row_stride_gt_V":  # a slice of a wider buffer: row stride 5003 + 17
        logits = base(6, vocab + 17)[:, :vocab]
    elif kind == "transposed_3d":  # (T, B, V) storage viewed as (B, T, V)
        logits = base(4, 3, vocab).transpose(0, 1)
    elif kind == "col_stride_2":  # every other column: last-dim stride 2
        logits = base(5, 2 * vocab)[:, ::2]
    elif kind == "column_major":  # (V, N) storage viewed as (N, V): row stride 1, column stride N
        logits = base(vocab, 4).t()
    elif kind == "permuted_4d":  # (2, 2, 3, 7) view whose leading dims merge into two groups
        logits = base(2, 3, 2, 7).permute(2, 0, 1, 3)
    elif kind == "permuted_4d_copy":  # leading dims that do not merge into two groups (one copy)
        logits = base(2, 3, 4, 7).permute(1, 0, 2, 3)
    else:
        raise ValueError(kind)
    targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=generator).to(DEVICE)
    targets.view(-1)[1] = IGNORE
    return logits, targets


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "kind", ["row_stride_gt_V", "transposed_3d", "col_stride_2", "column_major", "permuted_4d", "permuted_4d_copy"]
)
def test_non_contiguous_inputs(kind, dtype):
    logits, targets = _non_contiguous(kind, dtype)
    assert not logits.is_contiguous()
    compare(logits, targets)


def test_row_layout_needs_no_copy_for_three_dim_views():
    transposed = torch.empty(4, 3, 11).transpose(0, 1)  # (3, 4, 11), strides (11, 33, 1)
    assert confidence_kernel.row_layout(transposed) == (4, 11, 33)
    contiguous = torch.empty(2, 5, 11)
    assert confidence_kernel.row_layout(contiguous) == (10, 0, 11)
    assert confidence_kernel.row_layout(torch.empty(2, 3, 2, 7).permute(2, 0, 1, 3)) == (6, 7, 14)
    assert confidence_kernel.row_layout(torch.empty(2, 3, 4, 7).permute(1, 0, 2, 3)) is None


# ----------------------------------------------------------------------------------------------
# Ignore patterns
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["none", "mixed", "all", "valid_id_as_ignore_index", "int32_targets"])
def test_ignore_patterns(pattern, dtype):
    logits, targets = random_case((8, 5003), dtype, seed=2, ignore_fraction=0.0)
    ignore_index = IGNORE
    if pattern == "mixed":
        targets[::3] = IGNORE
    elif pattern == "all":
        targets[:] = IGNORE
    elif pattern == "valid_id_as_ignore_index":  # id 3 is a real class here, ignored by request
        ignore_index = 3
        targets[::2] = 3
    elif pattern == "int32_targets":
        targets[1] = IGNORE
        targets = targets.to(torch.int32)
    confidence, nll, grad = compare(logits, targets, ignore_index=ignore_index)
    ignored = targets == ignore_index
    assert torch.all(confidence[ignored] == 0) and torch.all(nll[ignored] == 0)
    assert torch.all(grad[ignored] == 0)
    assert torch.all(confidence[~ignored] > 0)


# ----------------------------------------------------------------------------------------------
# Hard numerics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_blocks_of_minus_inf(dtype):
    """-inf - (-inf) = NaN in a naive online max update when a whole block is -inf."""
    block, _ = launch_config(3 * 4096 + 5)
    vocab = 3 * block + 5  # three full blocks and a partial one
    logits, targets = random_case((4, vocab), dtype, seed=3, ignore_fraction=0.0)
    logits[0, :block] = -math.inf  # the first block: the running max stays -inf through it
    logits[1, : 2 * block] = -math.inf  # the first two blocks
    logits[2, block : 2 * block] = -math.inf  # a middle block
    logits[3, 3 * block :] = -math.inf  # the partial last block
    targets[:] = torch.tensor([2 * block + 1, 3 * block, 7, 5])
    confidence, nll, grad = compare(logits, targets)
    assert torch.isfinite(nll).all() and torch.isfinite(grad.float()).all()
    assert torch.all(grad[0, :block] == 0) and torch.all(grad[3, 3 * block :] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_minus_inf_except_target(dtype):
    vocab = 5003
    logits = torch.full((3, vocab), -math.inf, dtype=dtype, device=DEVICE)
    targets = torch.tensor([0, 4096, vocab - 1], device=DEVICE)
    logits[torch.arange(3), targets] = torch.tensor([-5.0, 0.0, 7.0], dtype=dtype, device=DEVICE)
    confidence, nll, grad = compare(logits, targets)
    assert torch.all(confidence == 1) and torch.all(nll == 0)
    assert torch.all(grad == 0)  # softmax(z) == onehot(y) exactly


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_common_offset_fp32(offset):
    """At 1e6 an fp32 ulp is 0.0625: lse = m + log d followed by lse - z_y would be off by that
    much; (m - z_y) + log d is not. The reference sees the same rounded inputs in float64."""
    logits, targets = random_case((4, 5003), torch.float32, seed=4, ignore_fraction=0.0)
    logits = logits + offset
    confidence, nll, _ = compare(logits, targets)
    centred_confidence, centred_nll, _ = run_reference64(logits - offset, targets)
    # Subtracting the offset is exact here, so the answer must not depend on it either.
    assert_close_verbose(nll, centred_nll, name="nll vs centred", **VALUE_TOL)
    assert_close_verbose(confidence, centred_confidence, name="confidence vs centred", **VALUE_TOL)


def test_bf16_true_class_gradient_when_confidence_near_one():
    """Target logit = row max + 10, so 1 - p_y is small and p_y - 1 is rounding-sensitive.
    Our true-class gradient error (vs float64 on the same bf16 inputs) must be no worse than
    4x that of PyTorch's bf16 cross-entropy, and within one bf16 rounding of the truth."""
    generator = torch.Generator().manual_seed(5)
    rows, vocab = 6, 5003
    logits = torch.randn(rows, vocab, generator=generator)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    logits[torch.arange(rows), targets] = logits.max(dim=1).values + 10
    logits = logits.to(torch.bfloat16).to(DEVICE)
    targets = targets.to(DEVICE)
    ones, zeros = torch.ones(rows, device=DEVICE), torch.zeros(rows, device=DEVICE)
    _, _, grad = run_kernel(logits, targets, zeros, ones)
    _, _, ref_grad = run_reference64(logits, targets, zeros, ones)
    torch_logits = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(torch_logits, targets, reduction="sum").backward()
    row_index = torch.arange(rows, device=DEVICE)
    truth = ref_grad[row_index, targets]
    ours_error = (grad[row_index, targets].double() - truth).abs().max().item()
    torch_error = (torch_logits.grad[row_index, targets].double() - truth).abs().max().item()
    assert ours_error <= 4 * torch_error + 1e-12, f"ours {ours_error:.3g} vs PyTorch {torch_error:.3g}"
    assert ours_error <= 2**-8 * truth.abs().max().item(), f"ours {ours_error:.3g} vs truth {truth.tolist()}"


# ----------------------------------------------------------------------------------------------
# Autograd behaviour
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use", ["confidence_only", "nll_only"])
def test_one_output_unused(use):
    logits, targets = random_case((5, 37), torch.float32, seed=6)
    x = logits.clone().requires_grad_(True)
    confidence, nll = token_confidence(x, targets)
    (confidence.sum() if use == "confidence_only" else (2.5 * nll).sum()).backward()
    g = torch.ones(targets.shape, dtype=torch.float64)
    g_conf, g_nll = (g, 0 * g) if use == "confidence_only" else (0 * g, 2.5 * g)
    _, _, ref_grad = run_reference64(logits, targets, g_conf.to(DEVICE), g_nll.to(DEVICE))
    assert_close_verbose(x.grad, ref_grad, name="grad_logits", **GRAD_TOL[torch.float32])


def test_gradcheck_reference_float64():
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 6, dtype=torch.float64, generator=generator).requires_grad_(True)
    targets = torch.tensor([0, 5, IGNORE, 2])
    assert torch.autograd.gradcheck(lambda z: reference_token_confidence(z, targets), (logits,))


def test_no_grad_forward():
    logits, targets = random_case((4, 37), torch.bfloat16, seed=8)
    with torch.no_grad():
        confidence, nll = token_confidence(logits.requires_grad_(True), targets)
    assert not confidence.requires_grad and not nll.requires_grad
    ref_confidence, ref_nll, _ = run_reference64(logits, targets)
    assert_close_verbose(confidence, ref_confidence, name="confidence", **VALUE_TOL)
    assert_close_verbose(nll, ref_nll, name="nll", **VALUE_TOL)


def test_backward_twice_with_retain_graph():
    logits, targets = random_case((4, 37), torch.float32, seed=9)
    x = logits.clone().requires_grad_(True)
    confidence, nll = token_confidence(x, targets)
    loss = (confidence - 0.5 * nll).sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert torch.equal(x.grad, 2 * first)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inputs_unchanged_and_gradient_fresh(dtype):
    logits, targets = random_case((4, 5003), dtype, seed=10)
    x = logits.clone().requires_grad_(True)
    before_logits, before_targets = x.detach().clone(), targets.clone()
    confidence, nll = token_confidence(x, targets)
    (confidence + nll).sum().backward()
    assert torch.equal(x.detach(), before_logits) and torch.equal(targets, before_targets)
    assert x.grad.data_ptr() != x.data_ptr()


def test_forward_saves_only_per_row_state():
    logits, targets = random_case((6, 37), torch.float32, seed=11)
    x = logits.clone().requires_grad_(True)
    confidence, _ = token_confidence(x, targets)
    node = confidence.grad_fn  # walk past the view that restores the targets' shape
    while "TokenConfidence" not in node.name():
        node = node.next_functions[0][0]
    saved = node.saved_tensors
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != x.data_ptr())
    # targets (int64) + confidence, row max, row sum (fp32): 8 + 3 * 4 bytes a row, no (N, V) tensor.
    assert extra <= 20 * targets.numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_identical_repeats(dtype):
    logits, targets = random_case((3, 9001), dtype, seed=12)
    g = torch.linspace(-1, 2, 3, device=DEVICE)
    first = run_kernel(logits, targets, g, g.flip(0))
    second = run_kernel(logits, targets, g, g.flip(0))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Bad targets and input checks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_value", [-1, 7])
def test_out_of_range_target_raises(bad_value):
    logits, targets = random_case((2, 3, 7), torch.float32, seed=13, ignore_fraction=0.0)
    targets[1, 2] = bad_value
    with pytest.raises(ValueError, match=rf"targets\[1, 2\] = {bad_value} is outside \[0, 7\)"):
        token_confidence(logits, targets)
    with pytest.raises(ValueError, match=rf"= {bad_value} is outside"):
        reference_token_confidence(logits, targets)


def test_out_of_range_target_gives_nan_without_validation():
    logits, targets = random_case((4, 37), torch.float32, seed=14, ignore_fraction=0.0)
    targets[2] = 37
    targets[3] = IGNORE
    g = torch.ones(4, device=DEVICE)
    confidence, nll, grad = run_kernel(logits, targets, g, g, validate=False)
    assert confidence[2].isnan() and nll[2].isnan() and grad[2].isnan().all()
    assert torch.isfinite(confidence[[0, 1, 3]]).all() and torch.isfinite(grad[[0, 1, 3]]).all()
    ref_confidence, ref_nll = reference_token_confidence(logits, targets, validate=False)
    assert_close_verbose(confidence, ref_confidence, name="confidence", **VALUE_TOL)
    assert_close_verbose(nll, ref_nll, name="nll", **VALUE_TOL)


def test_input_checks():
    logits = torch.randn(2, 5, device=DEVICE)
    with pytest.raises(TypeError, match="int32 or int64"):
        token_confidence(logits, torch.zeros(2, device=DEVICE))
    with pytest.raises(TypeError, match="logits must have dtype"):
        token_confidence(logits.double(), torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"leading shape of logits \(2,\), got \(3,\)"):
        token_confidence(logits, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="V >= 1"):
        token_confidence(torch.randn(2, 0, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE))


def test_known_answer_by_hand():
    """Row 0: z = (ln 1, ln 2, ln 5), y = 1.
        softmax(z) = (1, 2, 5) / 8 = (0.125, 0.25, 0.625)
        confidence = 0.25,  nll = -ln 0.25 = ln 4 = 1.3862944
    With upstream g_conf = 1, g_nll = 0: coef = g_nll - g_conf * p_y = -0.25, and
        grad = coef * (softmax - onehot) = -0.25 * (0.125, -0.75, 0.625) = (-0.03125, 0.1875, -0.15625)
    Row 1: the same logits + 100 (softmax is shift invariant), y = 2, g_conf = 0, g_nll = 1:
        confidence = 0.625, nll = ln 1.6 = 0.4700036, grad = (0.125, 0.25, -0.375)
    Row 2: y = ignore_index: confidence = nll = 0 and a zero gradient row.
    """
    z = torch.tensor([math.log(1), math.log(2), math.log(5)])
    logits = torch.stack([z, z + 100, z]).to(DEVICE)
    targets = torch.tensor([1, 2, IGNORE], device=DEVICE)
    confidence, nll, grad = run_kernel(
        logits, targets, torch.tensor([1.0, 0.0, 1.0], device=DEVICE), torch.tensor([0.0, 1.0, 1.0], device=DEVICE)
    )
    tol = {"rtol": 1e-5, "atol": 1e-5}
    assert_close_verbose(confidence, torch.tensor([0.25, 0.625, 0.0]), name="confidence", **tol)
    assert_close_verbose(nll, torch.tensor([math.log(4), math.log(1.6), 0.0]), name="nll", **tol)
    expected_grad = torch.tensor([[-0.03125, 0.1875, -0.15625], [0.125, 0.25, -0.375], [0.0, 0.0, 0.0]])
    assert_close_verbose(grad, expected_grad, name="grad_logits", **tol)


def test_verbose_helper_reports_position_and_size():
    with pytest.raises(AssertionError, match=r"(?s)1 of 4 elements differ.*at \(1, 0\): actual 3 +expected 2"):
        assert_close_verbose(torch.tensor([[0.0, 1.0], [3.0, 4.0]]), torch.tensor([[0.0, 1.0], [2.0, 4.0]]),
                             rtol=0, atol=1e-6, name="t")


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or confidence_kernel._INTERPRETED,
    reason="needs a CUDA device and compiled Triton (run without TRITON_INTERPRET=1)",
)


@pytest.mark.gpu
@needs_cuda
def test_int64_offsets_beyond_two_to_the_31():
    """N * V > 2^31 elements (4.3 GB in bf16): int32 row offsets would wrap for the last rows."""
    rows, vocab = 65537, 32769
    assert rows * vocab > 2**31
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    g = torch.ones(rows, device="cuda")
    confidence, nll, grad = run_kernel(logits, targets, g, g)
    last = slice(rows - 4, rows)  # the rows that start beyond 2^31 elements
    ref_confidence, ref_nll, ref_grad = run_reference64(logits[last], targets[last], g[last], g[last])
    assert_close_verbose(confidence[last], ref_confidence, name="confidence", **VALUE_TOL)
    assert_close_verbose(nll[last], ref_nll, name="nll", **VALUE_TOL)
    assert_close_verbose(grad[last], ref_grad, name="grad_logits", **GRAD_TOL[torch.bfloat16])


@pytest.mark.gpu
@needs_cuda
def test_torch_compile_fullgraph():
    logits, targets = random_case((64, 32000), torch.bfloat16, seed=15)

    def loss_fn(x, t):
        confidence, nll = token_confidence(x, t, validate=False)  # no host sync inside the graph
        return (confidence - 2 * nll).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    x_eager, x_compiled = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss_fn(x_eager, targets).backward()
    compiled(x_compiled, targets).backward()
    assert_close_verbose(x_compiled.grad, x_eager.grad, name="grad_logits", rtol=0, atol=0)
