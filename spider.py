"""SPIDER: "Specialization via Importance Discrepancy Evaluation for Refinement" (Huang et al., "Learn from
Downstream and Be Yourself in MLLM Fine-Tuning", ICML 2025, arXiv 2411.10928), a related method of the same
research line as NRCA, as a `methods.Method` in train.py's one training loop.

CE is Full FT's (`Method.loss`, Eq. 5a of the NRCA paper). SPIDER acts after every optimizer step and has no
hyper-parameter. Per trainable tensor, with w0 its weights before fine-tuning:

    R(x)  = sigmoid((|x| - mean|x|) / std|x|)        per tensor; an all-zero tensor gives R = 0
    I_pre = R(w0)                                     once, pre-trained importance (frozen weight magnitude)
    G     = G + grad                                  every step, plain sum (no decay) of all gradients so far
    I_ft  = R(G)                                      fine-tuning importance
    r     = I_ft / (I_pre + I_ft)  where I_ft > I_pre, else 0      (non-zero entries lie in (0.5, 1))
    M     = min(1, r / mean(r over its non-zero entries))         (M = 0 where r = 0, all 0 if r has none)
    w     = w0 + M * (w - w0)                          elements more important downstream keep their drift

Non-zero M lie in (0.5, 1]: an element either returns to w0 or keeps more than half of its drift.
`w0 + M (w - w0)` is computed as `torch.lerp(w0, w, M)`, which is bit-exact at both ends (M = 0 -> w0,
M = 1 -> w).

Choices and where NOTES.md, the paper and the released code (github.com/WenkeHuang/SPIDER,
`Code/train/SPIDER.py`) differ:
- std is the unbiased (n - 1) standard deviation, as the released `torch.std`. A constant non-zero tensor
  (std = 0; e.g. RMSNorm weights of a freshly initialised model, all 1.0) gets z = 0, R = 0.5 everywhere;
  the released code divides 0 by 0 there, gets NaN importances, the comparison I_ft > I_pre is never true,
  so such a tensor is reset to w0 after every step and never trains. A one-element tensor likewise has
  std = 0 here (NaN released).
- Gradient clipping: G accumulates the gradient the optimizer used, i.e. after train.py's
  `clip_grad_norm_` (`cfg.spider_gradient = "clipped"`, the default). The released trainer reads the
  gradients right after `optimizer.step()`, after its own clipping, so this is the released behaviour.
  `"raw"` accumulates the gradient before clipping instead (train.py calls `before_optimizer_step`
  before it clips). R is invariant to the scale of G, so the two differ only in how steps are weighted
  against each other (clipping shrinks large-gradient steps); with one step they are identical.
- The released code blends `w0 * (1 - M) + w * M`; we use `torch.lerp`, equal up to rounding and exact
  at M in {0, 1}. The released code stores w0 as a full fp32 copy taken at the first step; we take it at
  construction (the same weights: nothing has stepped yet). NOTES.md: the released code averages CE over
  tokens; we keep the per-sample mean of every method here (Eq. 5a), so SPIDER is compared with the other
  counterparts on the same objective.
- The paper's method section was not available to check against beyond its abstract; the rule follows
  NOTES.md, which agrees with the released code except for the points above.

Memory (paper Table 2 style), bytes per trainable element with fp32 master weights, stored persistently:
w0 (4) + I_pre (4, fp32) + G (4, fp32) = 12 B, returned by `extra_memory_bytes` (per rank). I_ft, r and M
are transient, one tensor at a time (about 3 temporaries of the largest trainable tensor) during
`after_optimizer_step`; the released code keeps I_ft and M for all tensors (20 B per element in all).

Distribution. DDP: gradients are already all-reduced, every rank holds the same w0, G and weights, so the
ranks stay identical with no communication. FSDP2: parameters and gradients are DTensors; everything is
stored as this rank's local shard, and the per-tensor statistics (mean and std of |x|, mean of the non-zero
r) are over the FULL tensor: local partial sums (fp64) of all tensors are stacked and all-reduced over the
shard groups, three small all-reduces per step (sum |G|; sum (|G| - mean)^2; sum r and count r > 0), and
once at construction for I_pre. `state_dict` gathers full tensors (a collective under FSDP2).

Not here: masking of gradients or optimizer state (the optimizer runs untouched, as released); LoRA
(`--lora-rank` refuses it: lora.REFUSED).
Run: `python train.py --method spider`; tests: `TRITON_INTERPRET=1 python -m pytest -q tests/test_spider.py`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from baselines import check_state, full_tensors, local_part, nbytes, shard_groups, shard_like, trainable
from methods import Method

GRADIENT_MODES = ("clipped", "raw")


# ---------------------------------------------------------------------------------------------
# Per-tensor statistics over full tensors (local partial sums + all-reduce over shard groups).
# ---------------------------------------------------------------------------------------------
def reduce_over_shards(partials: torch.Tensor, params) -> torch.Tensor:
    """partials (K, c): row t holds this rank's partial sums for tensor t; returns the sums over all shards.

    Rows of plain (or replicated) tensors are returned as they are; rows of tensors sharing the same shard
    groups are all-reduced together, one collective per group.
    """
    totals = partials.clone()
    rows_by_groups = {}
    for t, p in enumerate(params):
        groups = shard_groups(p)
        if groups:
            rows_by_groups.setdefault(groups, []).append(t)
    for groups, rows in rows_by_groups.items():
        index = torch.tensor(rows, device=totals.device)
        part = totals.index_select(0, index).contiguous()  # (k, c)
        for group in groups:
            dist.all_reduce(part, group=group)
        totals.index_copy_(0, index, part)
    return totals


def magnitude_stats(values, params) -> tuple[torch.Tensor, torch.Tensor]:
    """mean|x| and the unbiased std|x| of every full tensor, from the local parts `values` (fp64, (K,) each)."""
    device = values[0].device
    n = torch.tensor([float(p.numel()) for p in params], dtype=torch.float64, device=device)  # (K,) full numel
    sums = torch.stack([v.abs().sum(dtype=torch.float64) for v in values])[:, None]  # (K, 1)
    mean = reduce_over_shards(sums, params)[:, 0] / n.clamp(min=1)  # (K,)
    squares = torch.stack([(v.abs().float() - m.float()).square().sum(dtype=torch.float64)
                           for v, m in zip(values, mean, strict=True)])[:, None]  # (K, 1)
    variance = reduce_over_shards(squares, params)[:, 0] / (n - 1).clamp(min=1)  # (K,), torch.std's n - 1
    std = torch.where(n > 1, variance.sqrt(), torch.zeros_like(variance))  # (K,)
    return mean, std


def importance_from_stats(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """R(x) = sigmoid((|x| - mean|x|) / std|x|) in fp32, given the full tensor's 0-d mean and std.

    mean = 0 means x is all zero: R = 0. std = 0 (constant |x|): z = 0, R = 0.5 (the released code: NaN).
    """
    mean, std = mean.float(), std.float()
    z = torch.where(std > 0, (x.abs().float() - mean) / torch.where(std > 0, std, 1.0), 0.0)  # like x
    return torch.where(mean > 0, torch.sigmoid(z), 0.0)


def importance(x: torch.Tensor) -> torch.Tensor:
    """R(x) of one whole (non-distributed) tensor, fp32, shaped like x."""
    mean, std = magnitude_stats([x], [x])
    return importance_from_stats(x, mean[0], std[0])


def discrepancy_ratio(importance_pre: torch.Tensor, importance_ft: torch.Tensor) -> torch.Tensor:
    """r = I_ft / (I_pre + I_ft) where I_ft > I_pre, else 0 (the denominator is > 0 wherever it is used)."""
    selected = importance_ft > importance_pre
    denominator = torch.where(selected, importance_pre + importance_ft, 1.0)
    return torch.where(selected, importance_ft / denominator, 0.0)


def mask_from_ratio(r: torch.Tensor, mean_nonzero: torch.Tensor) -> torch.Tensor:
    """M = min(1, r / mean of the non-zero r); all zero when r has no non-zero entry (mean_nonzero = 0)."""
    mean_nonzero = mean_nonzero.float()
    return torch.where(mean_nonzero > 0, (r / torch.where(mean_nonzero > 0, mean_nonzero, 1.0)).clamp(max=1.0),
                       0.0)


def spider_mask(importance_pre: torch.Tensor, importance_ft: torch.Tensor) -> torch.Tensor:
    """M of one whole (non-distributed) tensor from its two importances."""
    r = discrepancy_ratio(importance_pre, importance_ft)
    nonzero = r > 0
    mean_nonzero = r.sum(dtype=torch.float64) / nonzero.sum().clamp(min=1)
    return mask_from_ratio(r, mean_nonzero)


# ---------------------------------------------------------------------------------------------
# The method.
# ---------------------------------------------------------------------------------------------
class Spider(Method):
    """Full FT's CE; after every optimizer step w = w0 + M * (w - w0) with SPIDER's importance mask M."""

    name = "spider"

    def __init__(self, cfg, mllm, named_params):
        super().__init__(cfg, mllm, trainable(named_params, "Spider"))
        self.gradient = getattr(cfg, "spider_gradient", "clipped")
        if self.gradient not in GRADIENT_MODES:
            raise ValueError(f"Spider: cfg.spider_gradient={self.gradient!r}; expected one of {GRADIENT_MODES}")
        self.params = [p for _, p in self.named_params]
        self.steps = 0  # optimizer steps seen (resumable)
        self.accumulated = False  # raw mode: before_optimizer_step already added this step's gradient
        with torch.no_grad():
            self.w0 = [local_part(p).detach().clone() for p in self.params]  # parameter dtype, local shard
            mean, std = magnitude_stats(self.w0, self.params)
            self.importance_pre = [importance_from_stats(w0, m, s)  # fp32: I_pre = R(w0)
                                   for w0, m, s in zip(self.w0, mean, std, strict=True)]
            self.grad_sum = [torch.zeros_like(w0, dtype=torch.float32) for w0 in self.w0]  # G, fp32

    def accumulate_gradients(self):
        """G += grad (this rank's shard; a missing gradient counts as zero)."""
        with torch.no_grad():
            for p, g in zip(self.params, self.grad_sum, strict=True):
                if p.grad is not None:
                    g.add_(local_part(p.grad).float())

    def before_optimizer_step(self):
        # train.py calls this before clipping: the raw gradient. The default mode reads it later, clipped.
        if self.gradient == "raw":
            self.accumulate_gradients()
            self.accumulated = True

    def masks(self):
        """Yield (parameter, w0, M) one tensor at a time, M from the current G (3 small all-reduces)."""
        mean, std = magnitude_stats(self.grad_sum, self.params)
        ratio_sums = []
        for pre, g, m, s in zip(self.importance_pre, self.grad_sum, mean, std, strict=True):
            r = discrepancy_ratio(pre, importance_from_stats(g, m, s))
            ratio_sums.append(torch.stack([r.sum(dtype=torch.float64), (r > 0).sum().double()]))
        totals = reduce_over_shards(torch.stack(ratio_sums), self.params)  # (K, 2): sum r, count r > 0
        mean_nonzero = totals[:, 0] / totals[:, 1].clamp(min=1)  # (K,), 0 where no r > 0
        for t, (p, w0) in enumerate(zip(self.params, self.w0, strict=True)):
            # recomputed rather than kept: I_ft and r of one tensor at a time
            importance_ft = importance_from_stats(self.grad_sum[t], mean[t], std[t])
            yield p, w0, mask_from_ratio(discrepancy_ratio(self.importance_pre[t], importance_ft), mean_nonzero[t])

    def after_optimizer_step(self):
        if self.gradient == "raw":
            if not self.accumulated:
                raise RuntimeError("Spider(spider_gradient='raw'): call before_optimizer_step() before every "
                                   "optimizer step (it adds the unclipped gradient to G)")
            self.accumulated = False
        else:
            self.accumulate_gradients()  # train.py calls this after optimizer.step(), before zero_grad
        with torch.no_grad():
            for p, w0, mask in self.masks():
                local = local_part(p)
                blended = torch.lerp(w0.float(), local.float(), mask)  # w0 + M (w - w0), exact at M in {0, 1}
                local.copy_(blended)  # in place: FSDP2 gathers from this storage
        self.steps += 1

    def extra_memory_bytes(self) -> int:
        return nbytes(self.w0) + nbytes(self.importance_pre) + nbytes(self.grad_sum)

    def state_dict(self) -> dict:
        return {"gradient": self.gradient, "steps": self.steps,
                "w0": full_tensors(self.named_params, self.w0),
                "importance_pre": full_tensors(self.named_params, self.importance_pre),
                "grad_sum": full_tensors(self.named_params, self.grad_sum)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("gradient", self.gradient) != self.gradient:
            raise ValueError(f"Spider.load_state_dict: checkpoint has spider_gradient={state.get('gradient')!r}, "
                             f"this run {self.gradient!r}")
        tensors = {key: check_state(state, key, self.named_params, "Spider")
                   for key in ("w0", "importance_pre", "grad_sum")}
        with torch.no_grad():
            for key, mine in (("w0", self.w0), ("importance_pre", self.importance_pre), ("grad_sum", self.grad_sum)):
                for (name, p), local in zip(self.named_params, mine, strict=True):
                    local.copy_(shard_like(p, tensors[key][name].to(local.dtype)))
        self.steps = int(state.get("steps", 0))
