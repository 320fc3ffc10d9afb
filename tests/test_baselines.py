"""Tests for baselines.py: the regularisers against their formulas, masks that hold bit-exactly under AdamW with
weight decay, mask shares, memory accounting, resume, the tiny MLLMs, and 2-rank DDP / FSDP2 on CPU.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_baselines.py
"""

import io
from types import SimpleNamespace

import pytest
import torch
from conftest import run_on_gloo_ranks, wrap_up_down
from torch import nn

from baselines import (
    Grafting,
    L2Reg,
    MagnitudeMask,
    RandomMask,
    top_magnitude_mask,
)
from methods import Method, get_method, model_forward

MASK_SETUPS = [(RandomMask, "once"), (RandomMask, "every-step"), (MagnitudeMask, "once")]
MASK_IDS = ["random-once", "random-every-step", "magnitude"]


def config(**overrides):
    """The attributes of train.py's TrainConfig that baselines.py reads."""
    return SimpleNamespace(**{**dict(reg_lam=None, mask_ratio=0.5, mask_redraw="once", seed=0), **overrides})


class TinyLM(nn.Module):
    """A language model small enough for many steps and for 2-rank runs; same forward contract as models.py."""

    def __init__(self, vocab=11, hidden=6, width=7, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden).requires_grad_(False)
        self.up = nn.Linear(hidden, width)
        self.down = nn.Linear(width, vocab)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, inputs_embeds=None,
                logits_to_keep=None, use_cache=None):
        hidden = torch.tanh(self.up(self.embed(input_ids)))  # (B, T, width)
        return SimpleNamespace(logits=self.down(hidden[logits_to_keep]))  # (N, V)


def tiny_batch(n=4, length=9, vocab=11, seed=1):
    """Random token ids; the last three positions of every row are the answer."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (n, length), generator=generator)  # (B, T)
    labels = torch.full_like(input_ids, -100)  # (B, T)
    labels[:, -3:] = input_ids[:, -3:]
    return dict(input_ids=input_ids, labels=labels, attention_mask=torch.ones_like(input_ids),
                pixel_values=torch.zeros(n, 1))


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def train_step(method, forward, optimizer, batch):
    """One step in train.py's order: loss, backward, before_optimizer_step, step, after_optimizer_step."""
    loss, metrics = method.loss(forward, batch)
    loss.backward()
    if hasattr(method, "before_optimizer_step"):
        method.before_optimizer_step()
    optimizer.step()
    method.after_optimizer_step()
    optimizer.zero_grad(set_to_none=True)
    return loss, metrics


def direct_regularizer(params, w0s, power):
    """1/K sum_t mean(|w_t - w0_t|^power) written out in float64."""
    terms = [((p.double() - w0.double()).abs() ** power).mean() for p, w0 in zip(params, w0s, strict=True)]
    return torch.stack(terms).mean()


def describe_difference(name, got, expected):
    """Where and by how much two tensors differ (for assertion messages)."""
    diff = (got.detach().double() - expected.detach().double()).abs()
    where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
    return f"{name}: max |diff| {float(diff.max()):.3e} at {where} ({int((diff > 0).sum())} elements differ)"


# ----------------------------------------------------------------------------------------------------
# L2-Reg and Grafting
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, value, grads", [
    (L2Reg, 4.5, ([0.5, -1.5], [[2.0]])),
    (Grafting, 2.0, ([0.25, -0.25], [[0.5]])),
])
def test_regularizer_known_answer(cls, value, grads):
    """Two tensors, w0 = [0, 0] and [[1]], trained to w = [1, -3] and [[3]] (K = 2).

    L2: (mean(1, 9) + mean(4)) / 2 = (5 + 4) / 2 = 4.5; d/dw = 2 (w - w0) / (n_t K) = [0.5, -1.5] and [[2]].
    L1: (mean(1, 3) + mean(2)) / 2 = (2 + 2) / 2 = 2;  d/dw = sign(w - w0) / (n_t K) = [0.25, -0.25], [[0.5]].
    """
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.ones(1, 1))
    method = cls(config(), None, [("a", a), ("b", b)])
    with torch.no_grad():
        a.copy_(torch.tensor([1.0, -3.0]))
        b.fill_(3.0)
    reg = method.regularizer()
    reg.backward()
    assert reg.item() == value
    assert a.grad.tolist() == grads[0] and b.grad.tolist() == grads[1]


@pytest.mark.parametrize("cls", [L2Reg, Grafting])
def test_regularizer_matches_formula_on_tiny_llava(cls):
    """Value and gradient (non-unit upstream gradient) against the float64 formula on tiny-llava's trainable set."""
    import models

    mllm = models.load_model("tiny-llava")
    models.freeze_for_finetuning(mllm)
    named = trainable(mllm.model)
    method = cls(config(), mllm, named)
    params = [p for _, p in named]
    w0s = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    reg = method.regularizer()
    (3.0 * reg).backward()
    leaves = [p.detach().double().requires_grad_() for p in params]
    expected = direct_regularizer(leaves, w0s, cls.power)
    (3.0 * expected).backward()
    torch.testing.assert_close(reg.double(), expected.detach(), rtol=1e-6, atol=0)
    for (name, p), leaf in zip(named, leaves, strict=True):
        torch.testing.assert_close(p.grad.double(), leaf.grad, rtol=1e-6, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("cls, default", [(L2Reg, 1e-3), (Grafting, 1e-6)])
def test_loss_adds_lam_times_regularizer(cls, default):
    model, batch = TinyLM(), tiny_batch()
    for lam, expected_lam in [(None, default), (0.5, 0.5), (0.0, 0.0)]:
        method = cls(config(reg_lam=lam), None, trainable(model))
        assert method.lam == expected_lam
        with torch.no_grad():
            model.down.weight.add_(0.1)
        ce, _ = Method(config(), None, trainable(model)).loss(model_forward(model), batch)
        loss, metrics = method.loss(model_forward(model), batch)
        assert metrics["regularizer"] > 0
        torch.testing.assert_close(loss, ce + expected_lam * metrics["regularizer"])
        with torch.no_grad():
            model.down.weight.sub_(0.1)


def test_grafting_gradient_is_zero_at_w0():
    """sign(0) = 0: at the start of training Grafting adds nothing (w0 kept in the parameter's dtype)."""
    model = TinyLM()
    method = Grafting(config(reg_lam=1.0), None, trainable(model))
    reg = method.regularizer()
    reg.backward()
    assert reg.item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for _, p in trainable(model))


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, redraw", MASK_SETUPS, ids=MASK_IDS)
def test_masks_hold_bit_exactly_under_adamw_with_weight_decay(cls, redraw):
    model, batch = TinyLM(), tiny_batch()
    named = trainable(model)
    w0 = {name: p.detach().clone() for name, p in named}
    method = cls(config(mask_redraw=redraw), None, named)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=0.05, weight_decay=0.1)
    forward = model_forward(model)
    for _ in range(6):
        before = {name: p.detach().clone() for name, p in named}
        train_step(method, forward, optimizer, batch)
        for (name, p), mask in zip(named, method.masks, strict=True):
            assert torch.equal(p[mask], before[name][mask]), describe_difference(name, p[mask], before[name][mask])
            if redraw == "once":  # masked elements never moved from w0
                assert torch.equal(p[mask], w0[name][mask])
    moved = sum(int((p != w0[name]).sum()) for name, p in named) / sum(p.numel() for _, p in named)
    assert moved > (0.45 if redraw == "once" else 0.9), f"only {moved:.0%} of the elements trained"
    for (name, p), mask in zip(named, method.masks, strict=True):
        if redraw == "once":
            assert torch.equal(p[mask], w0[name][mask])
            assert (p[~mask] != w0[name][~mask]).all(), f"{name}: a free element did not train"
            # AdamW's moments of masked elements still accumulate (released behaviour)
            assert optimizer.state[p]["exp_avg"][mask].abs().sum() > 0


def test_masks_are_what_keeps_the_weights():
    """Control: without after_optimizer_step the same loop moves every element (weight decay alone would)."""
    model, batch = TinyLM(), tiny_batch()
    named = trainable(model)
    w0 = [p.detach().clone() for _, p in named]
    method = MagnitudeMask(config(), None, named)
    method.after_optimizer_step = lambda: None
    optimizer = torch.optim.AdamW([p for _, p in named], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        train_step(method, model_forward(model), optimizer, batch)
    assert all((p != w).all() for (_, p), w in zip(named, w0, strict=True))


def big_params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"weight": (257, 129), "bias": (1000,), "small": (7,), "odd": (3, 5)}
    return [(name, nn.Parameter(torch.randn(shape, generator=generator))) for name, shape in shapes.items()]


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_magnitude_mask_keeps_exactly_the_largest_share(ratio):
    named = big_params()
    method = MagnitudeMask(config(mask_ratio=ratio), None, named)
    for (name, p), mask in zip(named, method.masks, strict=True):
        assert int(mask.sum()) == int(ratio * p.numel()), name
        if 0 < mask.sum() < mask.numel():
            assert p[mask].abs().min() > p[~mask].abs().max(), name


def test_magnitude_mask_ties_go_to_the_lowest_index():
    """|w0| = [2, 2, 2, 2, 1], n = 5, k = floor(0.5 * 5) = 2: the threshold 2 is tied four times, the first
    two in flat order are kept."""
    w0 = torch.tensor([2.0, -2.0, 2.0, 2.0, 1.0])
    assert top_magnitude_mask(w0, 0.5).tolist() == [True, True, False, False, False]
    assert top_magnitude_mask(torch.ones(2, 3), 0.5).flatten().tolist() == [True] * 3 + [False] * 3
    assert top_magnitude_mask(torch.ones(1), 0.5).tolist() == [False]  # floor(0.5) = 0


@pytest.mark.parametrize("ratio", [0.5, 0.3])
@pytest.mark.parametrize("redraw", ["once", "every-step"])
def test_random_mask_share_is_about_the_ratio(ratio, redraw):
    named = big_params()
    method = RandomMask(config(mask_ratio=ratio, mask_redraw=redraw), None, named)
    method.before_optimizer_step()
    for (name, p), mask in zip(named, method.masks, strict=True):
        share = mask.float().mean().item()
        tolerance = 5 * (ratio * (1 - ratio) / p.numel()) ** 0.5  # 5 binomial standard deviations
        assert abs(share - ratio) <= tolerance, f"{name}: kept share {share:.3f}, expected {ratio} +- {tolerance:.3f}"
    total = sum(p.numel() for _, p in named)
    assert abs(method.kept_fraction() - ratio) <= 5 * (ratio * (1 - ratio) / total) ** 0.5


def test_random_mask_redraws_only_in_every_step_mode():
    named = big_params()
    once = RandomMask(config(mask_redraw="once"), None, named)
    every = RandomMask(config(mask_redraw="every-step"), None, named)
    seen_once, seen_every = [], []
    for _ in range(3):
        for method, seen in [(once, seen_once), (every, seen_every)]:
            method.before_optimizer_step()
            seen.append([m.clone() for m in method.masks])
            method.after_optimizer_step()
    for first, later in [(seen_once[0], seen_once[1]), (seen_once[0], seen_once[2])]:
        assert all(torch.equal(a, b) for a, b in zip(first, later, strict=True))
    for first, later in [(seen_every[0], seen_every[1]), (seen_every[1], seen_every[2])]:
        assert all((a != b).any() for a, b in zip(first, later, strict=True) if a.numel() > 100)
    assert every.draws == 3 and once.draws == 1
    # the seed decides the masks: same seed same masks (DDP ranks), another seed other masks
    assert all(torch.equal(a, b) for a, b in zip(once.masks, RandomMask(config(), None, named).masks, strict=True))
    assert not torch.equal(once.masks[0], RandomMask(config(seed=1), None, named).masks[0])


def test_every_step_mode_needs_before_optimizer_step():
    method = RandomMask(config(mask_redraw="every-step"), None, big_params())
    with pytest.raises(RuntimeError, match="before_optimizer_step"):
        method.after_optimizer_step()


# ----------------------------------------------------------------------------------------------------
# Memory, resume, bad input
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, redraw, bytes_per_element", [
    (L2Reg, "once", 4), (Grafting, "once", 4), (RandomMask, "once", 5), (RandomMask, "every-step", 5),
    (MagnitudeMask, "once", 5),
])
def test_extra_memory_counts_what_is_stored(cls, redraw, bytes_per_element):
    """fp32 w0 or pre-step copy: 4 bytes per element; a bool mask: 1 byte."""
    named = big_params()
    method = cls(config(mask_redraw=redraw), None, named)
    n = sum(p.numel() for _, p in named)
    assert method.extra_memory_bytes() == bytes_per_element * n
    stored = [t for name in ("w0", "masks", "saved") for t in getattr(method, name, [])]
    assert method.extra_memory_bytes() == sum(t.numel() * t.element_size() for t in stored)
    assert Method(config(), None, named).extra_memory_bytes() == 0


def save_and_load(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("cls, redraw", [(L2Reg, "once"), (Grafting, "once")] + MASK_SETUPS,
                         ids=["l2", "grafting"] + MASK_IDS)
def test_state_dict_round_trip_resumes_exactly(cls, redraw):
    """Train 3 steps, save; a fresh method on the trained weights + the state continues like the original."""
    model, batch = TinyLM(), tiny_batch()
    cfg = config(mask_redraw=redraw, reg_lam=0.5)
    method = cls(cfg, None, trainable(model))
    optimizer = torch.optim.AdamW([p for _, p in trainable(model)], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        train_step(method, model_forward(model), optimizer, batch)
    state = save_and_load(method.state_dict())

    resumed_model = TinyLM(seed=5)  # other weights: the fresh method's own w0 is wrong until loaded
    resumed_model.load_state_dict(model.state_dict())
    resumed = cls(cfg, None, trainable(resumed_model))
    resumed.load_state_dict(state)
    resumed_optimizer = torch.optim.AdamW([p for _, p in trainable(resumed_model)], lr=0.05, weight_decay=0.1)
    resumed_optimizer.load_state_dict(save_and_load(optimizer.state_dict()))  # a copy
    for _ in range(3):
        train_step(method, model_forward(model), optimizer, batch)
        train_step(resumed, model_forward(resumed_model), resumed_optimizer, batch)
    for (name, p), (_, q) in zip(trainable(model), trainable(resumed_model), strict=True):
        assert torch.equal(p, q), describe_difference(name, q, p)
    after = method.state_dict()
    for key, value in resumed.state_dict().items():
        if isinstance(value, dict):
            assert all(torch.equal(value[n], after[key][n]) for n in value), key
        else:
            assert value == after[key], key


def test_state_dict_sizes():
    named = big_params()
    n = sum(p.numel() for _, p in named)
    size = lambda state: sum(t.numel() * t.element_size() for part in state.values() if isinstance(part, dict)
                             for t in part.values())
    assert size(L2Reg(config(), None, named).state_dict()) == 4 * n
    assert size(MagnitudeMask(config(), None, named).state_dict()) == 4 * n  # mask recomputed from w0
    assert size(RandomMask(config(), None, named).state_dict()) == 5 * n
    assert size(RandomMask(config(mask_redraw="every-step"), None, named).state_dict()) == 0


def test_bad_state_and_config_raise_clear_errors():
    named = big_params()
    state = L2Reg(config(), None, named).state_dict()
    state["w0"]["weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"w0\['weight'\] has shape \(3,\)"):
        L2Reg(config(), None, named).load_state_dict(state)
    del state["w0"]["weight"]
    with pytest.raises(ValueError, match=r"missing \['weight'\]"):
        MagnitudeMask(config(), None, named).load_state_dict(state)
    with pytest.raises(ValueError, match="mask_redraw"):
        RandomMask(config(), None, named).load_state_dict({"redraw": "every-step", "draws": 4})
    with pytest.raises(ValueError, match="reg_lam"):
        L2Reg(config(reg_lam=-1.0), None, named)
    with pytest.raises(ValueError, match="mask_ratio"):
        MagnitudeMask(config(mask_ratio=1.0), None, named)
    with pytest.raises(ValueError, match="mask_redraw"):
        RandomMask(config(mask_redraw="sometimes"), None, named)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Grafting(config(), None, [])


# ----------------------------------------------------------------------------------------------------
# The tiny MLLMs through the registry
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tiny-llava", "tiny-vila"])
def tiny_mllm_name(request):
    return request.param


def mllm_batch(mllm):
    from PIL import Image

    import data  # data/models import transformers: kept out of the module so the 2-rank workers start fast

    samples = [("Give a brief summary of what you see", "a red square", (200, 30, 30)),
               ("Which shape is shown?\nA. circle\nB. square\n" + data.CHOICE_SUFFIX, "B", (30, 200, 30))]
    items = []
    for i, (question, answer, colour) in enumerate(samples):
        input_ids, labels = data.tokenize_conversation(question, answer, mllm.tokenizer, mllm.num_image_tokens,
                                                       mllm.image_token_id, max_length=512)
        pixel_values = mllm.preprocess([Image.new("RGB", (20, 16), colour)])[0]
        items.append(dict(id=f"s{i}", task="caption", source="synthetic", input_ids=input_ids, labels=labels,
                          pixel_values=pixel_values))
    return data.collate(items, mllm.pad_token_id)


@pytest.mark.parametrize("method_name, redraw", [("l2", "once"), ("grafting", "once"), ("random-mask", "once"),
                                                 ("random-mask", "every-step"), ("magnitude-mask", "once")])
def test_methods_train_tiny_mllms(tiny_mllm_name, method_name, redraw):
    import models

    mllm = models.load_model(tiny_mllm_name)
    groups = models.freeze_for_finetuning(mllm)
    named = trainable(mllm.model)
    w0 = [p.detach().clone() for _, p in named]
    method = get_method(method_name)(config(mask_redraw=redraw, reg_lam=1.0), mllm, named)
    optimizer = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=1e-3, weight_decay=0.1)
    batch = mllm_batch(mllm)
    losses = []
    for _ in range(3):
        loss, metrics = train_step(method, model_forward(mllm.model), optimizer, batch)
        assert torch.isfinite(loss), f"{method_name} on {tiny_mllm_name}: loss {loss}"
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{method_name} on {tiny_mllm_name}: loss did not go down {losses}"
    if hasattr(method, "masks") and redraw == "once":
        for (name, p), mask, before in zip(named, method.masks, w0, strict=True):
            assert torch.equal(p[mask], before[mask]), name
    if "regularizer" in metrics:
        assert metrics["regularizer"] > 0


# ----------------------------------------------------------------------------------------------------
# 2 ranks on CPU (gloo): DDP and FSDP2 give the single-process gradients, weights, masks and state
# ----------------------------------------------------------------------------------------------------
DISTRIBUTED_SETUPS = [(L2Reg, "once"), (Grafting, "once")] + MASK_SETUPS


def _run_reference(cls, redraw, batch, steps):
    """Single process, the whole batch: per-step gradients and weights, final state and masks."""
    model = TinyLM()
    method = cls(config(mask_redraw=redraw, reg_lam=2.0), None, trainable(model))
    optimizer = torch.optim.AdamW([p for _, p in trainable(model)], lr=0.05, weight_decay=0.1)
    grads, weights = [], []
    for _ in range(steps):
        loss, _ = method.loss(model_forward(model), batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainable(model)})
        if hasattr(method, "before_optimizer_step"):
            method.before_optimizer_step()
        optimizer.step()
        method.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        weights.append({n: p.detach().clone() for n, p in trainable(model)})
    return grads, weights, method


def _distributed_worker(rank, world, steps):
    import torch.distributed as dist

    from baselines import gather_full

    full_batch = tiny_batch(n=2 * world)
    mine = {k: v[rank * 2:(rank + 1) * 2] for k, v in full_batch.items()}  # (2, T) each
    for cls, redraw in DISTRIBUTED_SETUPS:
        ref_grads, ref_weights, ref_method = _run_reference(cls, redraw, full_batch, steps)
        for mode in ("ddp", "fsdp"):
            where = f"rank {rank} {mode} {cls.__name__}({redraw})"
            model = TinyLM()
            wrapped = wrap_up_down(model, mode)
            named = trainable(model)
            method = cls(config(mask_redraw=redraw, reg_lam=2.0), None, named)
            optimizer = torch.optim.AdamW([p for _, p in named], lr=0.05, weight_decay=0.1)
            full = lambda t, p: gather_full(p, t.to_local() if hasattr(t, "to_local") else t)
            close = lambda got, expected, label: torch.testing.assert_close(
                got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{label}: {m}")
            for step in range(steps):
                loss, _ = method.loss(model_forward(wrapped), mine)
                loss.backward()
                for name, p in named:
                    close(full(p.grad, p), ref_grads[step][name], f"{where} step {step} gradient of {name}")
                if hasattr(method, "before_optimizer_step"):
                    method.before_optimizer_step()
                optimizer.step()
                method.after_optimizer_step()
                optimizer.zero_grad(set_to_none=True)
                for name, p in named:
                    close(full(p.detach(), p), ref_weights[step][name], f"{where} step {step} weight {name}")
            if hasattr(method, "masks"):  # the same masks as one process, element for element
                for (name, p), mask, saved, ref_mask in zip(named, method.masks, method.saved, ref_method.masks,
                                                            strict=True):
                    assert torch.equal(gather_full(p, mask), ref_mask), f"{where}: mask of {name}"
                    if redraw == "once":  # saved = w0
                        local = p.to_local() if hasattr(p, "to_local") else p
                        assert torch.equal(local.detach()[mask], saved[mask]), f"{where}: {name} moved"
            state, ref_state = method.state_dict(), ref_method.state_dict()
            for key, value in ref_state.items():
                if isinstance(value, dict):
                    for name in value:
                        assert torch.equal(state[key][name], value[name]), f"{where}: state {key}[{name}]"
                else:
                    assert state[key] == value, f"{where}: state {key}"
            # extra memory is per rank: the shards add up to the single-process number
            memory = torch.tensor([method.extra_memory_bytes()])
            dist.all_reduce(memory)
            expected = ref_method.extra_memory_bytes() * (world if mode == "ddp" else 1)
            assert memory.item() == expected, f"{where}: extra memory {memory.item()} != {expected}"
            # resume: a fresh method loads the full-tensor state into its shards
            fresh = cls(config(mask_redraw=redraw, reg_lam=2.0), None, named)
            fresh.load_state_dict(save_and_load(ref_state))
            assert getattr(fresh, "draws", None) == getattr(method, "draws", None), where
            for stored in ("w0", "masks", "saved") if redraw == "once" else ():  # every-step: redrawn
                for a, b in zip(getattr(fresh, stored, []), getattr(method, stored, []), strict=True):
                    assert torch.equal(a, b), f"{where}: resumed {stored}"


def test_ddp_and_fsdp2_match_one_process():
    run_on_gloo_ranks(_distributed_worker, 2, 3)
