"""Tests for nrca.py: the NRCA objective (Eq. 4-6) against a hand-worked example, an independent
transcription of the released code's formula, and its gradient-flow and edge-case contracts.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_nrca.py
"""

import math

import pytest
import torch
import torch.nn.functional as F

from confidence_kernel import reference_token_confidence
from nrca import NRCAOutput, answer_mean, nrca_loss, nrca_objective, sample_confidences

IGNORE = -100
LN2, LN3 = math.log(2.0), math.log(3.0)


def assert_close(name, actual, expected, rtol=1e-5, atol=1e-6):
    """allclose with a message saying where and by how much the tensors differ."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol)  # NaN anywhere counts as a difference
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} values differ, max |diff| {diff.max().item():.3e}; "
            f"first at {where}: got {actual[bad][:5].tolist()}, expected {expected[bad][:5].tolist()}"
        )


def random_batch(lengths, T=8, V=11, seed=0):
    """Clean/noisy logits (B, T, V) leaves and unshifted labels (B, T) with the given answer lengths.

    Label position 0 is never an answer (as in real data: BOS / prompt); answers end at the last
    position so the answer sits at the end of the sequence like a right-padded conversation.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    clean = (2.0 * torch.randn(B, T, V, generator=g)).requires_grad_()
    noisy = (2.0 * torch.randn(B, T, V, generator=g)).requires_grad_()
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, n in enumerate(lengths):
        assert n <= T - 1
        if n:
            labels[b, T - n :] = torch.randint(0, V, (n,), generator=g)
    return clean, noisy, labels


def released_formula(clean_logits, noisy_logits, labels, lam):
    """Direct transcription of the released NRCA loss from the facts in NOTES.md ("The objective").

    Full fp32 logits, HF shift, per-token cross entropy and softmax probabilities of the label;
    per sample: CE = token mean of nll, I = token mean of p, I~ = token mean of p~; open = count of
    labels != -100 in the UNSHIFTED labels > 2; loss = mean_samples CE + lam * sum_open
    |1 - I~ / I.detach()| * CE.detach() / n_open (0 when no open sample).
    """
    shift_labels = labels[:, 1:]  # (B, T-1)
    valid = shift_labels != IGNORE
    n_valid = valid.sum(1)
    safe = shift_labels.clamp(min=0)[..., None]

    def per_sample(logits):
        logits = logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none")
        p = logits.softmax(-1).gather(-1, safe)[..., 0] * valid
        return nll.sum(1) / n_valid, p.sum(1) / n_valid

    ce, confidence = per_sample(clean_logits)
    _, noisy_confidence = per_sample(noisy_logits)
    is_open = (labels != IGNORE).sum(1) > 2
    terms = (1 - noisy_confidence / confidence.detach()).abs() * ce.detach()
    alignment = terms[is_open].sum() / is_open.sum() if is_open.any() else torch.zeros(())
    return ce.mean() + lam * alignment


def test_known_answer_by_hand():
    """Two samples, V = 4, T = 4, lam = 2. A row of zeros gives p = 1/4; logit log 3 on the target
    (others 0) gives 3 / (3 + 3) = 1/2; logit log 9 gives 9 / (9 + 3) = 3/4.

    Sample 0, open response, labels [-, 1, 2, 3] -> answer rows 0, 1, 2 (3 tokens, open):
        clean p = (1/2, 1/2, 1/4): I = 5/12, CE0 = (ln 2 + ln 2 + ln 4) / 3 = 4 ln2 / 3 = 0.924196
        noisy p~ = (1/4, 1/4, 1/4): I~ = 1/4, I~ / I = 3/5, |1 - 3/5| = 2/5
        L_NRCA = 2/5 * 4 ln2 / 3 = 8 ln2 / 15 = 0.369678
    Sample 1, fixed choice, labels [-, -, 0, 3] -> answer rows 1, 2 (letter + EOS, not open):
        clean p = (3/4, 1/2): CE1 = (ln 4/3 + ln 2) / 2 = (3 ln2 - ln3) / 2 = 0.490415
    ce = (CE0 + CE1) / 2 = (17 ln2 - 3 ln3) / 12 = 0.707305; alignment = L_NRCA / 1 = 0.369678
    total = ce + 2 * alignment = 1.446662
    Gradient w.r.t. each noisy confidence of sample 0 (I~ < I so d|1 - I~/I| / dI~ = -1/I):
        lam / n_open * (-1 / I) * CE0 / 3 = 2 * (-12/5) * (4 ln2 / 3) / 3 = -32 ln2 / 15 = -1.478714
    and w.r.t. clean nll: 1 / (2 samples * 3 tokens) = 1/6 for sample 0, 1 / (2 * 2) = 1/4 for sample 1.
    """
    V, T = 4, 4
    clean = torch.full((2, T, V), 5.0)  # rows not predicting an answer are arbitrary
    noisy = torch.full((2, T, V), -3.0)
    clean[0, :3] = 0.0
    clean[0, 0, 1] = LN3  # p = 1/2 for label 1
    clean[0, 1, 2] = LN3  # p = 1/2 for label 2
    noisy[0, :3] = 0.0  # p~ = 1/4
    clean[1, 1:3] = 0.0
    clean[1, 1, 0] = math.log(9.0)  # p = 3/4 for label 0
    clean[1, 2, 3] = LN3  # p = 1/2 for label 3
    noisy[1, 1:3] = 0.0
    labels = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, IGNORE, 0, 3]])

    out = nrca_loss(clean, noisy, labels, lam=2.0)
    assert isinstance(out, NRCAOutput)
    assert_close("ce", out.ce, (17 * LN2 - 3 * LN3) / 12)
    assert_close("alignment", out.alignment, 8 * LN2 / 15)
    assert_close("total", out.total, (17 * LN2 - 3 * LN3) / 12 + 16 * LN2 / 15)
    assert_close("total (decimal)", out.total, 1.446662, atol=1e-6)
    assert int(out.n_open) == 1 and int(out.n_empty) == 0

    # The same example through nrca_objective with leaf per-token values, for the gradients.
    mask = labels[:, 1:] != IGNORE  # (2, 3)
    p = torch.tensor([[0.5, 0.5, 0.25], [0.0, 0.75, 0.5]], dtype=torch.float64)
    nll = (-torch.where(mask, p, 1.0).log()).requires_grad_()
    confidence = p.clone().requires_grad_()
    noisy_confidence = torch.tensor([[0.25] * 3, [0.0, 0.25, 0.25]], dtype=torch.float64).requires_grad_()
    out = nrca_objective(nll, confidence, noisy_confidence, mask, lam=2.0)
    out.total.backward()
    assert_close("objective total", out.total, (17 * LN2 - 3 * LN3) / 12 + 16 * LN2 / 15, rtol=1e-12)
    assert_close("d total / d p~", noisy_confidence.grad, [[-32 * LN2 / 15] * 3, [0.0, 0.0, 0.0]], rtol=1e-12)
    assert_close("d total / d nll", nll.grad, [[1 / 6] * 3, [0.0, 0.25, 0.25]], rtol=1e-12)
    assert confidence.grad is None, "clean confidence I must be detached (no path from the loss)"


@pytest.mark.parametrize("lam", [2.0, 0.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_released_formula(lam, seed):
    """Random logits, answers of 1..6 tokens (both sides of the open threshold): values and both
    branches' gradients equal the transcription of the released code."""
    clean, noisy, labels = random_batch([1, 2, 3, 4, 6, 2], T=8, V=13, seed=seed)
    out = nrca_loss(clean, noisy, labels, lam=lam)
    expected = released_formula(clean, noisy, labels, lam)
    assert_close("total", out.total, expected)
    assert int(out.n_open) == 3
    grads = torch.autograd.grad(out.total, [clean, noisy])
    expected_grads = torch.autograd.grad(expected, [clean, noisy])
    assert_close("clean grad", grads[0], expected_grads[0])
    assert_close("noisy grad", grads[1], expected_grads[1])


def test_lam_zero_is_plain_ce():
    clean, noisy, labels = random_batch([1, 3, 5, 2], seed=3)
    out = nrca_loss(clean, noisy, labels, lam=0.0)
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(clean[:, :-1].transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none")
    per_sample = nll.sum(1) / (shift_labels != IGNORE).sum(1)  # Eq. (5a), released reduction
    assert_close("total", out.total, per_sample.mean())
    assert_close("ce", out.ce, per_sample.mean())
    out.total.backward()
    assert torch.equal(noisy.grad, torch.zeros_like(noisy)), "lam = 0 must not train the noisy branch"
    assert clean.grad.abs().sum() > 0


def test_identical_branches_give_zero_alignment():
    clean, _, labels = random_batch([4, 5, 3], seed=4)
    noisy = clean.detach().clone().requires_grad_()
    out = nrca_loss(clean, noisy, labels)
    assert int(out.n_open) == 3
    assert out.alignment.item() == 0.0
    assert out.total.item() == out.ce.item()


def test_no_open_sample():
    """Only fixed-choice samples (<= 2 answer tokens): alignment 0, no gradient into the noisy branch."""
    clean, noisy, labels = random_batch([2, 1, 2], seed=5)
    out = nrca_loss(clean, noisy, labels)
    assert int(out.n_open) == 0
    assert out.alignment.item() == 0.0
    assert out.total.item() == out.ce.item()
    out.total.backward()
    assert torch.isfinite(clean.grad).all() and torch.isfinite(noisy.grad).all()
    assert torch.equal(noisy.grad, torch.zeros_like(noisy))


def test_open_threshold():
    clean, noisy, labels = random_batch([2, 3, 4], seed=6)
    assert int(nrca_loss(clean, noisy, labels).n_open) == 2
    assert int(nrca_loss(clean, noisy, labels, min_open_tokens=4).n_open) == 1
    assert int(nrca_loss(clean, noisy, labels, min_open_tokens=1).n_open) == 3


def test_gradient_isolation_exact():
    """Clean logits receive exactly the CE gradient; noisy logits exactly lam * d alignment."""
    lam = 2.0
    clean, noisy, labels = random_batch([3, 5, 2, 6], seed=7)
    out = nrca_loss(clean, noisy, labels, lam=lam)
    grad_clean, grad_noisy = torch.autograd.grad(out.total, [clean, noisy], retain_graph=True)
    ce_clean, ce_noisy = torch.autograd.grad(out.ce, [clean, noisy], retain_graph=True, allow_unused=True)
    al_clean, al_noisy = torch.autograd.grad(lam * out.alignment, [clean, noisy], allow_unused=True)
    assert ce_noisy is None, "CE must not depend on the noisy branch"
    assert al_clean is None, "the alignment term must not reach the clean branch (I and CE detached)"
    assert torch.equal(grad_clean, ce_clean)
    assert torch.equal(grad_noisy, al_noisy)
    assert grad_noisy.abs().sum() > 0


def test_nrca_loss_equals_objective_with_reference():
    clean, noisy, labels = random_batch([1, 3, 4, 7], T=9, V=17, seed=8)
    out = nrca_loss(clean, noisy, labels)
    next_labels = labels[:, 1:]
    confidence, nll = reference_token_confidence(clean[:, :-1], next_labels)  # (B, T-1)
    noisy_confidence, _ = reference_token_confidence(noisy[:, :-1], next_labels)
    expected = nrca_objective(nll, confidence, noisy_confidence, next_labels != IGNORE)
    for field in ("total", "ce", "alignment"):
        assert_close(field, getattr(out, field), getattr(expected, field))
    assert int(out.n_open) == int(expected.n_open) and int(out.n_empty) == int(expected.n_empty)
    grads = torch.autograd.grad(out.total, [clean, noisy])
    expected_grads = torch.autograd.grad(expected.total, [clean, noisy])
    assert_close("clean grad", grads[0], expected_grads[0])
    assert_close("noisy grad", grads[1], expected_grads[1])


def test_empty_samples_are_counted_and_left_out():
    """A sample with no answer token (all -100, or its only label at position 0, which no logits row
    predicts) is left out of every mean: same loss as the batch without it, no NaN."""
    clean, noisy, labels = random_batch([4, 0, 2, 0], seed=9)
    labels[3, 0] = 5  # an unshifted label at position 0 is no answer position
    out = nrca_loss(clean, noisy, labels)
    assert int(out.n_empty) == 2 and int(out.n_open) == 1
    keep = [0, 2]
    expected = released_formula(clean[keep], noisy[keep], labels[keep], 2.0)
    assert_close("total", out.total, expected)
    out.total.backward()
    assert torch.isfinite(clean.grad).all() and torch.isfinite(noisy.grad).all()
    assert clean.grad[[1, 3]].abs().sum() == 0


def test_all_samples_empty():
    clean, noisy, labels = random_batch([0, 0], seed=10)
    out = nrca_loss(clean, noisy, labels)
    assert out.total.item() == 0.0 and int(out.n_empty) == 2 and int(out.n_open) == 0
    out.total.backward()
    assert torch.equal(clean.grad, torch.zeros_like(clean))


def test_zero_clean_confidence_is_guarded():
    """I = 0 (all clean confidences underflowed) or subnormal: the sample is left out of the alignment
    term and of n_open, everything stays finite; the other open sample's term is untouched."""
    mask = torch.ones(3, 4, dtype=torch.bool)
    confidence = torch.tensor([[0.0] * 4, [1e-40] * 4, [0.5, 0.25, 0.5, 0.25]])
    nll = torch.tensor([[104.0] * 4, [92.0] * 4, [LN2, 2 * LN2, LN2, 2 * LN2]], requires_grad=True)
    noisy_confidence = torch.full((3, 4), 0.9, requires_grad=True)
    out = nrca_objective(nll, confidence, noisy_confidence, mask)
    assert int(out.n_open) == 1
    assert_close("alignment", out.alignment, abs(1 - 0.9 / 0.375) * 1.5 * LN2)
    out.total.backward()
    for t in (out.total, nll.grad, noisy_confidence.grad):
        assert torch.isfinite(t).all()
    assert torch.equal(noisy_confidence.grad[:2], torch.zeros(2, 4))


def test_answer_mean():
    values = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), 4.0, 6.0], [7.0, 8.0, 9.0]],
                          requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True], [False, False, False]])
    mean, has_answer = answer_mean(values, mask)
    assert_close("mean", mean, [1.5, 5.0, 0.0])
    assert has_answer.tolist() == [True, True, False]
    mean.sum().backward()
    assert_close("grad", values.grad, [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]])


def test_bad_inputs_raise():
    mask = torch.ones(2, 3, dtype=torch.bool)
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="label_mask"):
        nrca_objective(x, x, x, mask.long())
    with pytest.raises(ValueError, match="noisy_confidence"):
        nrca_objective(x, x, torch.rand(2, 4), mask)
    with pytest.raises(ValueError, match="lam"):
        nrca_objective(x, x, x, mask, lam=-1.0)
    with pytest.raises(ValueError, match="lam"):
        nrca_objective(x, x, x, mask, lam=float("nan"))
    with pytest.raises(ValueError, match="min_open_tokens"):
        nrca_objective(x, x, x, mask, min_open_tokens=0)
    clean, noisy, labels = random_batch([2, 3], seed=11)
    with pytest.raises(ValueError, match="clean_logits"):
        nrca_loss(clean, noisy[:, :-1], labels)
    with pytest.raises(ValueError, match="labels"):
        nrca_loss(clean, noisy, labels[:, :-1])


@pytest.mark.parametrize("alignment, expected_d_noisy_mean", [
    # One open sample, I = 0.5, I~ = 0.2, CE = 0.9, lam = 2: d total / d I~ = lam * CE * g(I, I~), with
    ("paper", -2 * 0.9 / 0.5),  # g = sign(I~ - I) / I                  Eq. (5b)
    ("squared", 2 * 0.9 * (0.2 / 0.5 - 1) / 0.5),  # g = (I~ / I - 1) / I   proportional to the gap
    ("difference", -2 * 0.9),  # g = sign(I~ - I)                       no 1 / I
    ("squared-difference", 2 * 0.9 * (0.2 - 0.5)),  # g = I~ - I        both
    ("hinge", -2 * 0.9 / 0.5),  # I~ < I: exactly Eq. (5b)'s g = sign(I~ - I) / I
])
def test_alignment_variants_gradients_by_hand(alignment, expected_d_noisy_mean):
    """Each variant's gradient on the noisy confidences, worked by hand (I and CE detached in all of them);
    the clean branch gets CE's gradient only, whatever the variant."""
    mask = torch.ones(1, 3, dtype=torch.bool)
    nll = torch.full((1, 3), 0.9, dtype=torch.float64, requires_grad=True)  # CE = 0.9
    confidence = torch.full((1, 3), 0.5, dtype=torch.float64, requires_grad=True)  # I = 0.5
    noisy = torch.full((1, 3), 0.2, dtype=torch.float64, requires_grad=True)  # I~ = 0.2
    out = nrca_objective(nll, confidence, noisy, mask, lam=2.0, alignment=alignment)
    out.total.backward()
    # d I~ / d p~_t = 1/3 for each of the three tokens.
    torch.testing.assert_close(noisy.grad, torch.full((1, 3), expected_d_noisy_mean / 3, dtype=torch.float64))
    torch.testing.assert_close(nll.grad, torch.full((1, 3), 1 / 3, dtype=torch.float64))  # d CE / d nll_t only
    assert confidence.grad is None or not confidence.grad.any()


def test_paper_alignment_is_the_default_and_variants_are_named():
    mask = torch.ones(2, 4, dtype=torch.bool)
    nll, confidence, noisy = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    default = nrca_objective(nll, confidence, noisy, mask)
    paper = nrca_objective(nll, confidence, noisy, mask, alignment="paper")
    assert torch.equal(default.total, paper.total)
    with pytest.raises(ValueError, match="alignment must be one of"):
        nrca_objective(nll, confidence, noisy, mask, alignment="l1")


def test_hinge_is_eq_5b_where_noisy_is_below_clean_and_zero_elsewhere():
    """Three open samples, CE = 0.9 each, lam = 2, I = 0.5 for all; I~ = 0.2 (below), 0.8 (above), 0.5 (equal).
    Eq. (5b): |1 - I~/I| * CE = 0.6 * 0.9, 0.6 * 0.9, 0 -> alignment (0.54 + 0.54 + 0) / 3 = 0.36.
    hinge: max(0, 1 - I~/I) * CE = 0.54, 0, 0 -> alignment 0.54 / 3 = 0.18.
    Gradients on the noisy confidences (d I~ / d p~_t = 1/3, mean over 3 open samples gives another 1/3):
    Eq. (5b) -lam CE / I / 9 = -0.4, +0.4, 0 (torch's sign(0) = 0); hinge -0.4, 0, 0."""
    mask = torch.ones(3, 3, dtype=torch.bool)
    nll = torch.full((3, 3), 0.9, dtype=torch.float64)
    confidence = torch.full((3, 3), 0.5, dtype=torch.float64)
    noisy_values = torch.tensor([0.2, 0.8, 0.5], dtype=torch.float64)[:, None].expand(3, 3)
    results = {}
    for alignment in ("paper", "hinge"):
        noisy = noisy_values.clone().requires_grad_(True)
        out = nrca_objective(nll, confidence, noisy, mask, lam=2.0, alignment=alignment)
        out.total.backward()
        results[alignment] = (out.alignment.item(), noisy.grad[:, 0])
    assert results["paper"][0] == pytest.approx(0.36)
    assert results["hinge"][0] == pytest.approx(0.18)
    torch.testing.assert_close(results["paper"][1], torch.tensor([-0.4, 0.4, 0.0], dtype=torch.float64))
    torch.testing.assert_close(results["hinge"][1], torch.tensor([-0.4, 0.0, 0.0], dtype=torch.float64))


def test_sample_confidences_by_hand():
    """Sample 0: 3 answer tokens p = 0.2, 0.4, 0.6 -> I = 0.4, p~ = 0.1, 0.1, 0.4 -> I~ = 0.2, open.
    Sample 1: 2 answer tokens (a letter + EOS) -> I = 0.5, I~ = 0.7, not open (< 3 tokens)."""
    mask = torch.tensor([[True, True, True], [True, True, False]])
    confidence = torch.tensor([[0.2, 0.4, 0.6], [0.4, 0.6, 9.0]])
    noisy = torch.tensor([[0.1, 0.1, 0.4], [0.8, 0.6, 9.0]])
    clean_mean, noisy_mean, is_open = sample_confidences(confidence, noisy, mask)
    torch.testing.assert_close(clean_mean, torch.tensor([0.4, 0.5]))
    torch.testing.assert_close(noisy_mean, torch.tensor([0.2, 0.7]))
    assert is_open.tolist() == [True, False]
