"""Token Confidence Alignment: the NRCA objective (paper Sec. 3.2, Eq. 4-6; Appendix C, Eq. 8-10).

For every sample of the batch, over its answer tokens t = 1..T (labels != ignore_index after the
one-token shift), with p_t the clean and p~_t the noisy confidence of the ground-truth token:

    I  = 1/T sum_t p_t,      I~ = 1/T sum_t p~_t                      Eq. (4)
    CE = 1/T sum_t -log p_t                                            Eq. (5a)
    L_NRCA = |1 - I~ / sg(I)| * sg(CE)                                 Eq. (5b)
    L = mean_samples CE + lam * sum_open L_NRCA / n_open                Eq. (6), released reduction

`sg` is stop-gradient: the clean branch is detached inside Eq. (5b) (paper: "we detach the normal
branch signals"; Appendix C, Eq. 8-9 need I detached; the released code detaches the CE factor too),
so the clean logits get exactly the CE gradient and the noisy logits only the gradient through I~.
The alignment applies to open-response samples only: at least `min_open_tokens` = 3 answer tokens
(a fixed-choice answer is a letter + EOS = 2 tokens). The noisy branch's own CE is not used.

A text-only record (no picture, hence no noisy view) is never open-response: it gets CE only (`has_image`).

A multi-turn record (data.py) is one sample whose answer tokens are those of all its assistant turns,
each with its </s>: T, CE and I run over all of them, and it is open-response when they number at least
`min_open_tokens`. So two one-letter answers (2 + 2 = 4 tokens) make an open-response sample, as the
released code's count (labels != -100 > 2) would have it; one letter answer in one turn stays fixed-choice.

Reduction (released code, NOTES.md): per-sample token mean, then the mean over samples — not the
global token mean of HF. Every method uses `answer_mean` for its CE so that lam = 0 is Full FT.
Samples without any answer token (e.g. truncated away) are left out of every mean and counted in
`n_empty`; they never produce NaN.

Guard for I = 0. Eq. (5b) divides by the clean confidence I. If all clean confidences of an open sample
underflow (float32: every p_t below ~1e-38, i.e. nll > ~87 per token), I is 0 or subnormal and the ratio
is inf/NaN (the released code would produce NaN). Such samples (I below the smallest normal number of
its dtype) are left out of the alignment term: they add nothing to its sum, get no gradient from it
and are not counted in `n_open`; their CE still counts. For every normal I the term is Eq. (5b)
unchanged (it is large when I is tiny, as the formula is). The division uses 1 in place of I wherever
the term is unused, so no inf/NaN appears even in the masked-out branch of the backward pass.

Two entry points:
- `nrca_objective(nll, confidence, noisy_confidence, label_mask)`: per-token (B, T) values, used by
  methods.py, which gets them from the fused kernel on the answer rows only;
- `nrca_loss(clean_logits, noisy_logits, labels)`: the end-to-end form for readers (shift, gather the
  answer rows, `confidence_kernel.token_confidence` on both branches, `nrca_objective`).

Beyond the paper (off by default; `alignment=`, train.py --nrca-alignment). With I and CE detached, Eq. (5b)'s
gradient is lam * sg(CE) / sg(I) * sign(I~ - I) * dI~: its size does not depend on the gap I~ - I and grows as I
falls, its sign flips with the gap. Appendix C (Eq. 8-10) argues for the term assuming I >= I~ (the noisy view
is the less confident one); there Eq. (5b) only pulls I~ up. Where I~ > I it pushes I~ *down*, a regime the
paper does not discuss. On the first testbed study, whose base was as confident on the noisy view as on the
clean one, this push dominated the CE gradient from the first steps and Eq. (5b) diverged on 7 of 10 seeds
(README, "The testbed"). Four variants, each defined before any of its runs (scripts/testbed_study.py,
scripts/gap_study.py):
    "squared"             1/2 (1 - I~/sg(I))^2 * sg(CE)   gradient proportional to the gap (0 when aligned)
    "difference"          |sg(I) - I~| * sg(CE)           no 1/I amplification, constant size as Eq. (5b)
    "squared-difference"  1/2 (sg(I) - I~)^2 * sg(CE)     both
    "hinge"               max(0, 1 - I~/sg(I)) * sg(CE)   Eq. (5b) restricted to Appendix C's regime I~ < I: the
                                                          same value and gradient there, zero where I~ >= I (the
                                                          paper's one-sided reading; no downward push)
Measured in the gap study (README, "The testbed"; scripts/gap_study.py): Eq. (5b) diverged in 21 of 30 runs whose
base broke Appendix C's premise (I~ > I on more than a quarter of the training captions) and in none of 20 that met
it; "hinge" diverged in none of 30, on every base. The paper's Eq. (5b) ("paper") stays the default and exact.
`sample_confidences` gives the per-sample I, I~ and
the open-sample mask that Eq. (5b) reads (evaluate.py confidence-gap measures a model's gap with it).

Not done here: building the noisy view (noise.py, Eq. 2) and running the model (methods.py).

    TRITON_INTERPRET=1 python -m pytest -q tests/test_nrca.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from confidence_kernel import token_confidence

IGNORE_INDEX = -100
ALIGNMENTS = ("paper", "squared", "difference", "squared-difference", "hinge")  # Eq. (5b), then the variants


@dataclass
class NRCAOutput:
    """What one NRCA step computes; every field is a tensor (no host sync)."""

    total: torch.Tensor  # () Eq. (6): ce + lam * alignment, the loss to backpropagate
    ce: torch.Tensor  # () Eq. (5a) per sample, mean over samples with an answer token
    alignment: torch.Tensor  # () Eq. (5b) summed over open samples / n_open (0 when none)
    n_open: torch.Tensor  # () int64: open-response samples that received the alignment term
    n_empty: torch.Tensor  # () int64: samples with no answer token, left out of every mean
    # Diagnostics (detached): mean I and I~ over the open samples, and the share of them with I~ > I,
    # whose Eq. (5b) gradient pushes I~ *down* (the sign of 1 - I~/I flips there).
    open_confidence: torch.Tensor | None = None  # ()
    open_noisy_confidence: torch.Tensor | None = None  # ()
    noisy_above_clean: torch.Tensor | None = None  # ()


def answer_mean(values: torch.Tensor, label_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean of `values` (B, T) over its answer tokens `label_mask` (B, T) bool.

    Returns `(mean (B,), has_answer (B,) bool)`; the mean is 0 for a sample without answer tokens.
    Values outside the mask are never read (even NaN/inf there neither leak into the result nor into
    the gradient).
    """
    _check_grid("values", values, label_mask)
    count = label_mask.sum(dim=1)  # (B,) answer tokens per sample
    masked = torch.where(label_mask, values, torch.zeros_like(values))  # (B, T)
    mean = masked.sum(dim=1) / count.clamp(min=1).to(values.dtype)  # (B,)
    return mean, count > 0


def sample_confidences(confidence: torch.Tensor, noisy_confidence: torch.Tensor, label_mask: torch.Tensor,
                       min_open_tokens: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample I and I~ (Eq. 4) and which samples are open-response with a defined ratio I~ / I.

    confidence, noisy_confidence: (B, T) per-token p_t and p~_t; label_mask: (B, T) bool answer tokens.
    Returns `(I (B,), I~ (B,), is_open (B,) bool)`: open = at least `min_open_tokens` answer tokens (the released
    code's `> 2` label tokens) and I at least the smallest normal number of its dtype (see the module docstring).
    """
    _check_grid("confidence", confidence, label_mask)
    _check_grid("noisy_confidence", noisy_confidence, label_mask)
    if int(min_open_tokens) != min_open_tokens or min_open_tokens < 1:
        raise ValueError(f"nrca: min_open_tokens must be an integer >= 1, got {min_open_tokens}")
    clean_confidence, _ = answer_mean(confidence, label_mask)  # (B,) Eq. (4): I
    noisy_mean_confidence, _ = answer_mean(noisy_confidence, label_mask)  # (B,) Eq. (4): I~
    n_tokens = label_mask.sum(dim=1)  # (B,)
    defined = clean_confidence.detach() >= torch.finfo(clean_confidence.dtype).tiny  # (B,)
    return clean_confidence, noisy_mean_confidence, (n_tokens >= min_open_tokens) & defined


def nrca_objective(
    nll: torch.Tensor,
    confidence: torch.Tensor,
    noisy_confidence: torch.Tensor,
    label_mask: torch.Tensor,
    lam: float = 2.0,
    min_open_tokens: int = 3,
    alignment: str = "paper",
    has_image: torch.Tensor | None = None,
) -> NRCAOutput:
    """Eq. (4)-(6) from per-token values on the (B, T) answer grid.

    nll, confidence: (B, T) float, clean branch -log p_t and p_t (only answer positions are read).
    noisy_confidence: (B, T) float, noisy branch p~_t.
    label_mask: (B, T) bool, True at answer tokens (after the one-token shift).
    lam: weight of the alignment term (Eq. 6, paper default 2); lam = 0 is Full FT.
    min_open_tokens: a sample is open-response when it has at least this many answer tokens. The
        released code counts label tokens != -100 in the *unshifted* labels and tests `> 2`; after the
        one-token shift the count is the same unless the first label position is itself an answer
        token, which never happens (position 0 is BOS / the system prompt). So 3 here == `> 2` there.
    alignment: "paper" (Eq. 5b) or one of the variants beyond the paper (module docstring).
    has_image: (B,) bool or None (every sample has one); a text-only sample has no noisy view (Eq. 2 needs a
        picture), so it is never open-response here: it gets CE only.
    """
    _check_grid("nll", nll, label_mask)
    lam = float(lam)
    if not lam >= 0.0 or lam == float("inf"):
        raise ValueError(f"nrca.nrca_objective: lam must be a finite number >= 0, got {lam}")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"nrca.nrca_objective: alignment must be one of {ALIGNMENTS}, got {alignment!r}")

    ce_per_sample, has_answer = answer_mean(nll, label_mask)  # (B,), (B,) Eq. (5a)
    # Eq. (4): I and I~; open-response samples (the released code's `> 2` label tokens) with a defined ratio
    # I~ / I: I below the smallest normal float32 (0 after underflow, or subnormal) is left out, see docstring.
    clean_confidence, noisy_mean_confidence, is_open = sample_confidences(confidence, noisy_confidence, label_mask,
                                                                          min_open_tokens)
    clean_confidence = clean_confidence.detach()  # sg(I): Eq. (5b), Appendix C Eq. (8)-(9)
    if has_image is not None:
        is_open = is_open & has_image.to(is_open.device)  # a text-only sample: CE only

    # Eq. (6), first term: mean over the samples that have an answer token.
    n_answered = has_answer.sum()  # ()
    ce = torch.where(has_answer, ce_per_sample, 0.0).sum() / n_answered.clamp(min=1)  # ()

    # Division by 1 where the term is not used, so no inf/NaN is created even in the unused branch
    # (a NaN there would still reach the gradient through torch.where's backward).
    safe_clean = torch.where(is_open, clean_confidence, 1.0)  # (B,)
    if alignment in ("paper", "squared", "hinge"):
        gap = 1.0 - noisy_mean_confidence / safe_clean  # (B,) 1 - I~ / sg(I)
    else:
        gap = safe_clean - noisy_mean_confidence  # (B,) sg(I) - I~
    if alignment in ("paper", "difference"):
        gap = gap.abs()  # Eq. (5b): |1 - I~ / sg(I)|
    elif alignment == "hinge":
        gap = torch.where(gap > 0, gap, 0.0)  # max(0, 1 - I~ / sg(I)): Eq. (5b) where I~ < I; 0, no gradient, else
    else:
        gap = 0.5 * gap.square()  # (B,)
    alignment_per_sample = gap * ce_per_sample.detach()  # (B,) Eq. (5b) (or a variant), times sg(CE)
    n_open = is_open.sum()  # ()
    alignment_term = torch.where(is_open, alignment_per_sample, 0.0).sum() / n_open.clamp(min=1)  # ()

    total = ce + lam * alignment_term  # Eq. (6)
    open_mean = lambda x: torch.where(is_open, x.detach(), 0.0).sum() / n_open.clamp(min=1)
    return NRCAOutput(total=total, ce=ce, alignment=alignment_term, n_open=n_open, n_empty=(~has_answer).sum(),
                      open_confidence=open_mean(clean_confidence),
                      open_noisy_confidence=open_mean(noisy_mean_confidence),
                      noisy_above_clean=open_mean((noisy_mean_confidence > clean_confidence).float()))


def nrca_loss(
    clean_logits: torch.Tensor,
    noisy_logits: torch.Tensor,
    labels: torch.Tensor,
    lam: float = 2.0,
    ignore_index: int = IGNORE_INDEX,
    min_open_tokens: int = 3,
) -> NRCAOutput:
    """End-to-end NRCA loss from the two branches' logits (Eq. 3-6).

    clean_logits, noisy_logits: (B, T, V) from the clean and the noisy image with the same text.
    labels: (B, T) HF-style, unshifted: logits[:, t] predicts labels[:, t + 1]; ignore_index elsewhere.
    Only the answer rows are gathered before the confidence kernel: the (B, T, V) probabilities are
    never built.
    """
    if clean_logits.dim() != 3 or clean_logits.shape != noisy_logits.shape:
        raise ValueError(
            "nrca.nrca_loss: clean_logits and noisy_logits must both be (B, T, V), got "
            f"{tuple(clean_logits.shape)} and {tuple(noisy_logits.shape)}"
        )
    if labels.shape != clean_logits.shape[:2]:
        raise ValueError(
            f"nrca.nrca_loss: labels must be (B, T) = {tuple(clean_logits.shape[:2])}, got {tuple(labels.shape)}"
        )
    label_mask, targets = answer_positions(labels, ignore_index)  # (B, T), (N,)
    clean_rows = clean_logits[label_mask]  # (N, V)
    noisy_rows = noisy_logits[label_mask]  # (N, V)
    confidence, nll = token_confidence(clean_rows, targets, ignore_index=ignore_index)  # (N,), (N,)
    noisy_confidence, _ = token_confidence(noisy_rows, targets, ignore_index=ignore_index)  # (N,)
    return nrca_objective(
        to_grid(nll, label_mask),
        to_grid(confidence, label_mask),
        to_grid(noisy_confidence, label_mask),
        label_mask,
        lam=lam,
        min_open_tokens=min_open_tokens,
    )


def answer_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """Rows whose logits predict an answer token: logits at t predict labels at t + 1.

    Returns `logits_mask` (B, T) bool and `targets` (N,) in the row-major order that
    `hidden[logits_mask]` produces.
    """
    next_labels = labels[:, 1:]  # (B, T-1)
    is_answer = next_labels != ignore_index  # (B, T-1)
    logits_mask = torch.zeros_like(labels, dtype=torch.bool)  # (B, T)
    logits_mask[:, :-1] = is_answer
    return logits_mask, next_labels[is_answer]


def to_grid(values: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Per-answer-row values (N,) back onto the (B, T) grid, zeros elsewhere, keeping the graph."""
    return values.new_zeros(label_mask.shape).masked_scatter(label_mask, values)  # (B, T)


def _check_grid(name: str, values: torch.Tensor, label_mask: torch.Tensor) -> None:
    if label_mask.dtype != torch.bool or label_mask.dim() != 2:
        raise ValueError(
            f"nrca: label_mask must be a (B, T) bool tensor, got {label_mask.dtype} {tuple(label_mask.shape)}"
        )
    if values.shape != label_mask.shape or not values.is_floating_point():
        raise ValueError(
            f"nrca: {name} must be a floating (B, T) tensor shaped like label_mask {tuple(label_mask.shape)}, "
            f"got {values.dtype} {tuple(values.shape)}"
        )
