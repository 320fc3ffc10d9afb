"""The counterparts of the paper's tables (Sec. 4.1, Tables 4, 5, 7): L2-Reg, Grafting, Random Mask-Tuning and
Magnitude Mask, each a `methods.Method` plugged into train.py's one training loop.

All four act only on the trainable tensors (connector + last N decoder layers) and compare them with w0, the
weights before fine-tuning. CE is `Method.loss` (Eq. 5a: per-sample mean over answer tokens, then the mean
over samples), so with lam = 0 the regularisers are Full FT.

Stiff penalty regularisation (added to CE, one backward; the released trainers call backward twice, which
only sums the same gradients):

    L2-Reg    (`--method l2`)        L = CE + lam * 1/K sum_t mean((w_t - w0_t)^2)     lam = 1e-3
    Grafting  (`--method grafting`)  L = CE + lam * 1/K sum_t mean(|w_t - w0_t|)       lam = 1e-6

K = number of trainable tensors. `cfg.reg_lam` overrides lam. The metric `regularizer` is the value before
lam. w0 is kept in the parameter's dtype (the fp32 master weights train.py trains). The released Grafting
keeps w0 in bf16, so there |w - bf16(w0)| is not 0 at step 0 and its sign pulls every element towards the
rounded copy; ours starts at exactly 0. `DistanceToReference` recomputes w - w0 in backward instead of
saving it, so the regulariser costs no activation memory beyond the stored w0.

Partial update masks (a bool mask per tensor, True = element keeps its value; `cfg.mask_ratio` of them):

    Random Mask     (`--method random-mask`)     mask ~ Bernoulli(mask_ratio) per element
    Magnitude Mask  (`--method magnitude-mask`)  mask = the floor(mask_ratio * n) largest |w0| of the tensor

Gradients and the optimizer are untouched (as released): AdamW's moments of masked elements keep
accumulating and weight decay moves them, then `after_optimizer_step` writes them back with
`torch.where(mask, saved, w)`, so they are bit-identical to their values before the step after any number
of steps. Random Mask draws its mask once (`cfg.mask_redraw="once"`, the released code; saved = w0) or
before every optimizer step (`"every-step"`, the paper's text "at each iteration"; train.py calls
`before_optimizer_step`, which draws the mask and copies the pre-step weights into `saved`). Magnitude
Mask keeps the large-magnitude half at w0 (the paper: "select and maintain elements with relatively large
weight magnitude"); ties at the threshold go to the lower flat index, so the count is exact.

Distribution. DDP: plain tensors, every rank builds the same masks (same `cfg.seed`, same draw order).
FSDP2: trainable parameters are DTensors; everything stored is this rank's local shard (`to_local()`), and
`extra_memory_bytes` is per rank. Random masks are drawn for the full tensor shape and this rank keeps its
piece, and Magnitude Mask ranks the full tensor (`full_tensor()` once at construction), so the masks are
the same on 1 GPU, DDP and FSDP2 at any world size. The regulariser sums local shards and all-reduces the
value; its gradient stays local, which is exactly d reg / d (local shard).
Random draws use a generator on the parameter's device seeded from (`cfg.seed`, draw index): CPU and CUDA
give different (equally valid) masks.

Extra memory (paper Table 2), bytes per trainable element, fp32 weights:
L2-Reg / Grafting 4 (w0); Magnitude Mask 5 (w0 + bool mask); Random Mask 5 (once: w0 + mask; every-step:
pre-step copy + mask). `state_dict` saves full tensors (gathered under FSDP2; a collective): w0 (4 B per
element), the random mask (1 B) and the draw count; Magnitude Mask's mask is recomputed from w0.

Not here: masking of gradients or optimizer state, regularisers on frozen weights; with LoRA (`train.py --lora-rank`)
all four are refused, as w0 of LoRA's tensors is no pre-trained weight (lora.REFUSED).
Run: `python train.py --method l2|grafting|random-mask|magnitude-mask [--mask-redraw every-step]`;
tests: `TRITON_INTERPRET=1 python -m pytest -q tests/test_baselines.py`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from methods import Method

# ---------------------------------------------------------------------------------------------
# Sharding helpers: one code path for plain tensors (1 process, DDP) and FSDP2's DTensor shards.
# ---------------------------------------------------------------------------------------------


def local_part(p: torch.Tensor) -> torch.Tensor:
    """This rank's elements of `p` (its local shard under FSDP2, `p` itself otherwise); writes go to `p`."""
    return p.to_local() if isinstance(p, DTensor) else p


def shard_like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The piece of a full-shape tensor that lives on this rank for parameter `p` (no communication)."""
    if tuple(full.shape) != tuple(p.shape):
        raise ValueError(f"baselines: tensor of shape {tuple(full.shape)} given for a parameter of shape "
                         f"{tuple(p.shape)}")
    full = full.to(local_part(p).device)
    if not isinstance(p, DTensor):
        return full
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()


def gather_full(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Full-shape tensor from this rank's piece laid out like `p` (a collective under FSDP2)."""
    if not isinstance(p, DTensor):
        return local
    wire = local.to(torch.uint8) if local.dtype == torch.bool else local  # gloo/NCCL gather no bool
    full = DTensor.from_local(wire, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride()).full_tensor()
    return full.bool() if local.dtype == torch.bool else full


def shard_groups(p: torch.Tensor) -> tuple:
    """Process groups over which `p`'s elements are split (empty for plain or replicated tensors)."""
    if not isinstance(p, DTensor):
        return ()
    return tuple(p.device_mesh.get_group(d) for d, placement in enumerate(p.placements) if placement.is_shard())


def sum_over_shards(terms: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """sum_t terms[t], where terms[t] is this rank's part of tensor t's contribution.

    The value is all-reduced over each sharded parameter's groups; the gradient stays local (the local
    shard only enters its own term), which is the exact gradient for this rank's shard.
    """
    total = torch.stack(terms).sum()
    by_groups = {}
    for term, p in zip(terms, params, strict=True):
        groups = shard_groups(p)
        if groups:
            by_groups[groups] = by_groups.get(groups, 0.0) + term.detach()
    for groups, local in by_groups.items():
        value = local.clone()
        for group in groups:
            dist.all_reduce(value, group=group)
        total = total + (value - local)  # other ranks' parts: a constant here
    return total


def trainable(named_params, where: str):
    named_params = list(named_params)
    if not named_params:
        raise ValueError(f"{where}: no trainable parameters (expected the connector and last decoder layers)")
    for name, p in named_params:
        if not p.is_floating_point():
            raise ValueError(f"{where}: trainable tensor {name!r} has dtype {p.dtype}; expected floating point")
    return named_params


def full_tensors(named_params, local_tensors) -> dict:
    """{name: full-shape CPU tensor} of tensors laid out like the parameters, for `state_dict`."""
    return {name: gather_full(p, t).cpu() for (name, p), t in zip(named_params, local_tensors, strict=True)}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def check_state(state: dict, key: str, named_params, where: str) -> dict:
    """state[key] must map every trainable name to a full-shape tensor."""
    if key not in state:
        raise ValueError(f"{where}.load_state_dict: missing {key!r} (got keys {sorted(state)})")
    tensors = state[key]
    names = [name for name, _ in named_params]
    if sorted(tensors) != sorted(names):
        missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        raise ValueError(f"{where}.load_state_dict: {key!r} does not match the trainable tensors "
                         f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for name, p in named_params:
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"{where}.load_state_dict: {key}[{name!r}] has shape {tuple(tensors[name].shape)}; "
                             f"the parameter has {tuple(p.shape)}")
    return tensors


# ---------------------------------------------------------------------------------------------
# Stiff penalty regularisation: L2-Reg and Grafting.
# ---------------------------------------------------------------------------------------------
class DistanceToReference(torch.autograd.Function):
    """sum(|w - w0|^power), power 1 or 2, accumulated in fp32; backward recomputes w - w0 (nothing saved
    but references to w and w0, which exist anyway)."""

    @staticmethod
    def forward(ctx, w, w0, power: int):
        ctx.save_for_backward(w, w0)
        ctx.power = power
        diff = w.float() - w0.float()
        return diff.square().sum() if power == 2 else diff.abs().sum()

    @staticmethod
    def backward(ctx, grad_output):
        w, w0 = ctx.saved_tensors
        diff = w - w0
        # d/dw (w - w0)^2 = 2 (w - w0);  d/dw |w - w0| = sign(w - w0)  (0 at w = w0, as torch.abs)
        slope = 2 * diff if ctx.power == 2 else diff.sign()
        return (grad_output * slope).to(w.dtype), None, None


class ReferenceRegularizer(Method):
    """CE + lam * 1/K sum_t mean(|w_t - w0_t|^power): the base of L2Reg (power 2) and Grafting (power 1)."""

    power = 2
    default_lam = 1e-3

    def __init__(self, cfg, mllm, named_params):
        super().__init__(cfg, mllm, trainable(named_params, type(self).__name__))
        lam = getattr(cfg, "reg_lam", None)
        self.lam = self.default_lam if lam is None else float(lam)
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"{type(self).__name__}: cfg.reg_lam={lam!r}; expected a finite number >= 0")
        self.params = [p for _, p in self.named_params]
        with torch.no_grad():
            self.w0 = [local_part(p).detach().clone() for p in self.params]  # parameter dtype

    def regularizer(self) -> torch.Tensor:
        """1/K sum_t mean(|w_t - w0_t|^power), a 0-d fp32 tensor with gradient w.r.t. the parameters."""
        terms = [DistanceToReference.apply(local_part(p), w0, self.power) / p.numel()  # numel of the full tensor
                 for p, w0 in zip(self.params, self.w0, strict=True)]
        return sum_over_shards(terms, self.params) / len(terms)

    def loss(self, forward, batch):
        ce, metrics = super().loss(forward, batch)
        reg = self.regularizer()
        return ce + self.lam * reg, {**metrics, "regularizer": reg.detach()}

    def extra_memory_bytes(self) -> int:
        return nbytes(self.w0)

    def state_dict(self) -> dict:
        return {"w0": full_tensors(self.named_params, self.w0)}

    def load_state_dict(self, state: dict) -> None:
        w0 = check_state(state, "w0", self.named_params, type(self).__name__)
        with torch.no_grad():
            for (name, p), mine in zip(self.named_params, self.w0, strict=True):
                mine.copy_(shard_like(p, w0[name]))


class L2Reg(ReferenceRegularizer):
    """L2-Reg (Kirkpatrick et al., 2017; released `LossTwoReg`): lam * mean over tensors of mse(w, w0)."""

    name = "l2"
    power = 2
    default_lam = 1e-3


class Grafting(ReferenceRegularizer):
    """Grafting as the paper runs it (Panigrahi et al., 2023; released `LossOneReg`): L1 to w0, lam 1e-6."""

    name = "grafting"
    power = 1
    default_lam = 1e-6


# ---------------------------------------------------------------------------------------------
# Partial update masks: Random Mask-Tuning and Magnitude Mask.
# ---------------------------------------------------------------------------------------------
def mask_ratio(cfg, where: str) -> float:
    ratio = float(getattr(cfg, "mask_ratio", 0.5))
    if not 0 < ratio < 1:
        raise ValueError(f"{where}: cfg.mask_ratio={ratio}; expected a share in (0, 1)")
    return ratio


def top_magnitude_mask(w0: torch.Tensor, ratio: float) -> torch.Tensor:
    """True at the floor(ratio * n) largest |w0|; ties at the threshold go to the lowest flat indices."""
    magnitude = w0.detach().abs().flatten().float()  # (n,)
    n, k = magnitude.numel(), int(ratio * magnitude.numel())
    if k == 0:
        return torch.zeros_like(w0, dtype=torch.bool)
    threshold = magnitude.kthvalue(n - k + 1).values  # the k-th largest
    above = magnitude > threshold  # (n,)
    at = magnitude == threshold  # (n,)
    room = k - above.sum()  # how many tied elements still fit
    mask = above | (at & (at.cumsum(0) <= room))  # (n,)
    return mask.view(w0.shape)


class MaskTuning(Method):
    """Keeps the masked elements of every trainable tensor at `saved` after each optimizer step."""

    def __init__(self, cfg, mllm, named_params):
        super().__init__(cfg, mllm, trainable(named_params, type(self).__name__))
        self.ratio = mask_ratio(cfg, type(self).__name__)
        self.params = [p for _, p in self.named_params]
        self.masks: list[torch.Tensor] = []  # bool, local shard, True = keep
        self.saved: list[torch.Tensor] = []  # the values masked elements are written back to

    def after_optimizer_step(self):
        with torch.no_grad():
            for p, mask, saved in zip(self.params, self.masks, self.saved, strict=True):
                local = local_part(p)
                local.copy_(torch.where(mask, saved, local))  # in place: FSDP2 gathers from this storage

    def extra_memory_bytes(self) -> int:
        return nbytes(self.masks) + nbytes(self.saved)

    def kept_fraction(self) -> float:
        """Share of trainable elements the mask keeps (this rank's shards)."""
        return sum(int(m.sum()) for m in self.masks) / sum(m.numel() for m in self.masks)


class RandomMask(MaskTuning):
    """Random Mask-Tuning (Hui et al., 2024; released `RandomMask`): a Bernoulli(mask_ratio) mask per tensor."""

    name = "random-mask"

    def __init__(self, cfg, mllm, named_params):
        super().__init__(cfg, mllm, named_params)
        self.redraw = getattr(cfg, "mask_redraw", "once")
        if self.redraw not in ("once", "every-step"):
            raise ValueError(f"RandomMask: cfg.mask_redraw={self.redraw!r}; expected 'once' or 'every-step'")
        self.seed = int(getattr(cfg, "seed", 0))
        self.draws = 0  # masks drawn so far; draw i uses generator seed (seed, i)
        self.armed = False  # every-step: before_optimizer_step ran for the coming step
        with torch.no_grad():
            self.masks = [torch.zeros_like(local_part(p), dtype=torch.bool) for p in self.params]
            # once: w0 (masked elements never change); every-step: the pre-step copy, refilled every step
            self.saved = [local_part(p).detach().clone() for p in self.params]
        if self.redraw == "once":
            self.draw()

    def draw(self):
        """Draw the next masks: full-shape uniforms from one seeded generator, this rank keeps its piece."""
        with torch.no_grad():
            generators = {}
            for p, mask in zip(self.params, self.masks, strict=True):
                device = mask.device
                if device not in generators:
                    generators[device] = torch.Generator(device=device).manual_seed(
                        self.seed * 1_000_003 + self.draws)
                full = torch.rand(p.shape, generator=generators[device], device=device) < self.ratio  # bool
                mask.copy_(shard_like(p, full))
        self.draws += 1

    def before_optimizer_step(self):
        if self.redraw == "every-step":
            self.draw()
            with torch.no_grad():
                for p, saved in zip(self.params, self.saved, strict=True):
                    saved.copy_(local_part(p))
            self.armed = True

    def after_optimizer_step(self):
        if self.redraw == "every-step":
            if not self.armed:
                raise RuntimeError("RandomMask(mask_redraw='every-step'): call before_optimizer_step() before "
                                   "every optimizer step (it draws the mask and saves the pre-step weights)")
            self.armed = False
        super().after_optimizer_step()

    def state_dict(self) -> dict:
        state = {"redraw": self.redraw, "draws": self.draws}
        if self.redraw == "once":  # every-step redraws and re-saves before each step: only the count matters
            state["mask"] = full_tensors(self.named_params, self.masks)
            state["w0"] = full_tensors(self.named_params, self.saved)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("redraw") != self.redraw:
            raise ValueError(f"RandomMask.load_state_dict: checkpoint has mask_redraw={state.get('redraw')!r}, "
                             f"this run {self.redraw!r}")
        self.draws = int(state["draws"])
        if self.redraw == "once":
            masks = check_state(state, "mask", self.named_params, "RandomMask")
            w0 = check_state(state, "w0", self.named_params, "RandomMask")
            with torch.no_grad():
                for (name, p), mask, saved in zip(self.named_params, self.masks, self.saved, strict=True):
                    mask.copy_(shard_like(p, masks[name].bool()))
                    saved.copy_(shard_like(p, w0[name]))


class MagnitudeMask(MaskTuning):
    """Magnitude Mask (Han et al., 2015; released `MagnitudeMask`): the largest-|w0| share stays at w0."""

    name = "magnitude-mask"

    def __init__(self, cfg, mllm, named_params):
        super().__init__(cfg, mllm, named_params)
        with torch.no_grad():
            self.saved = [local_part(p).detach().clone() for p in self.params]  # w0, parameter dtype
        self.masks = [torch.zeros_like(w0, dtype=torch.bool) for w0 in self.saved]
        for p, mask, w0 in zip(self.params, self.masks, self.saved, strict=True):
            self.rank_by_magnitude(p, mask, gather_full(p, w0))  # one full tensor at a time

    def rank_by_magnitude(self, p, mask, full_w0):
        """This rank's piece of the mask ranked over the FULL w0 (the top share is per tensor, not per shard)."""
        with torch.no_grad():
            mask.copy_(shard_like(p, top_magnitude_mask(full_w0.to(mask.device), self.ratio)))

    def state_dict(self) -> dict:
        return {"w0": full_tensors(self.named_params, self.saved)}

    def load_state_dict(self, state: dict) -> None:
        w0 = check_state(state, "w0", self.named_params, "MagnitudeMask")
        with torch.no_grad():
            for (name, p), mask, saved in zip(self.named_params, self.masks, self.saved, strict=True):
                saved.copy_(shard_like(p, w0[name]))
                self.rank_by_magnitude(p, mask, w0[name])
