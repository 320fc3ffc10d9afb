"""Tests for spider.py: R and the mask on hand-worked examples, the update rule after AdamW steps against a
direct computation, exact resume, memory accounting, tiny-llava / tiny-vila steps, and 2 CPU ranks (DDP and
FSDP2) against one process.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_spider.py
"""

import io
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import run_on_gloo_ranks, wrap_up_down
from PIL import Image
from torch import nn

from methods import model_forward
from spider import Spider, importance, spider_mask


def config(**overrides):
    return SimpleNamespace(**{"seed": 0, **overrides})


def show_difference(got: torch.Tensor, expected: torch.Tensor) -> str:
    """Where and by how much two tensors differ (for assertion messages)."""
    diff = (got.double() - expected.double()).abs()
    worst = int(diff.flatten().argmax())
    return (f"max |diff| {float(diff.max()):.3g} at flat index {worst}: got {float(got.flatten()[worst])!r}, "
            f"expected {float(expected.flatten()[worst])!r}; {int((diff > 0).sum())} of {diff.numel()} differ")


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# ----------------------------------------------------------------------------------------------------
# R and the mask, worked by hand
# ----------------------------------------------------------------------------------------------------
def test_importance_hand_example():
    """x = [-3, 1, 0, 2]: |x| = [3, 1, 0, 2], mean 1.5, deviations [1.5, -0.5, -1.5, 0.5],
    unbiased std = sqrt((2.25 + 0.25 + 2.25 + 0.25) / 3) = sqrt(5/3) = 1.2910,
    z = [1.1619, -0.3873, -1.1619, 0.3873], R = sigmoid(z) = [0.7617, 0.4044, 0.2383, 0.5956].
    The sign of x does not matter; R is invariant to scaling x."""
    x = torch.tensor([-3.0, 1.0, 0.0, 2.0])
    std = math.sqrt(5 / 3)
    expected = torch.tensor([sigmoid(d / std) for d in (1.5, -0.5, -1.5, 0.5)])
    got = importance(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=lambda m: show_difference(got, expected))
    torch.testing.assert_close(got, torch.tensor([0.7617, 0.4044, 0.2383, 0.5956]), rtol=0, atol=1e-4)
    torch.testing.assert_close(importance(-250 * x), got, rtol=0, atol=1e-6)


def test_importance_degenerate_tensors():
    """All zero -> 0 (released rule); constant non-zero |x| -> 0.5 (std = 0, z = 0); one element -> 0.5."""
    assert torch.equal(importance(torch.zeros(3, 2)), torch.zeros(3, 2))
    assert torch.equal(importance(torch.tensor([2.0, -2.0, 2.0])), torch.full((3,), 0.5))
    assert torch.equal(importance(torch.tensor([7.0])), torch.tensor([0.5]))
    assert torch.isfinite(importance(torch.ones(64))).all()


def test_mask_hand_example():
    """Tensor A: I_pre = [0.2, 0.5, 0.6, 0.3], I_ft = [0.8, 0.5, 0.4, 0.7]
        I_ft > I_pre at elements 0 and 3 (element 1 ties: not selected)
        r = [0.8 / 1.0, 0, 0, 0.7 / 1.0] = [0.8, 0, 0, 0.7]; mean of non-zero r = 0.75
        r / 0.75 = [1.0667, 0, 0, 0.9333] -> M = min(1, .) = [1, 0, 0, 0.9333]   (the cap acts on element 0)
    Tensor B: I_pre = [0.6, 0.7], I_ft = [0.6, 0.1]: no I_ft > I_pre -> M = [0, 0], a full reset to w0.
    Update with w0 = 1 and w = [3, 5, -1, 4]:  w0 + M (w - w0) = [3, 1, 1, 1 + 0.9333 * 3 = 3.8]."""
    mask_a = spider_mask(torch.tensor([0.2, 0.5, 0.6, 0.3]), torch.tensor([0.8, 0.5, 0.4, 0.7]))
    torch.testing.assert_close(mask_a, torch.tensor([1.0, 0.0, 0.0, 0.7 / 0.75]), rtol=0, atol=1e-6)
    assert mask_a[0] == 1.0  # capped exactly
    mask_b = spider_mask(torch.tensor([0.6, 0.7]), torch.tensor([0.6, 0.1]))
    assert torch.equal(mask_b, torch.zeros(2))
    w0, w = torch.ones(4), torch.tensor([3.0, 5.0, -1.0, 4.0])
    torch.testing.assert_close(torch.lerp(w0, w, mask_a), torch.tensor([3.0, 1.0, 1.0, 3.8]), rtol=0, atol=1e-6)


def test_mask_values_are_zero_or_above_one_half():
    """r lies in (0.5, 1) and its non-zero mean in (0.5, 1), so non-zero M lie in (0.5, 1], and some hit 1."""
    generator = torch.Generator().manual_seed(0)
    pre, ft = importance(torch.randn(300, generator=generator)), importance(torch.randn(300, generator=generator))
    mask = spider_mask(pre, ft)
    nonzero = mask[mask > 0]
    assert torch.equal(mask > 0, ft > pre)
    assert nonzero.numel() > 0 and (nonzero > 0.5).all() and (nonzero <= 1).all() and (nonzero == 1).any()


# ----------------------------------------------------------------------------------------------------
# The rule inside a training loop: a tiny nn.Linear with AdamW
# ----------------------------------------------------------------------------------------------------
def linear_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(6, 4)
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    return model, x, y


def train_steps(model, method, optimizer, x, y, steps, max_grad_norm=0.0, record=None, start=0):
    """train.py's order: backward, before_optimizer_step, clip, step, after_optimizer_step, zero_grad."""
    for step in range(start, start + steps):
        loss = (model(x) - y).square().mean() * (1 + step)  # growing scale: clipping weights steps unequally
        loss.backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        method.before_optimizer_step()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_grad_norm)
        clipped = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
        method.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        if record is not None:
            record.append({"raw": raw, "clipped": clipped, "stepped": stepped,
                           "after": {n: p.detach().clone() for n, p in model.named_parameters()}})


@pytest.mark.parametrize("gradient", ["clipped", "raw"])
def test_adamw_steps_follow_the_rule(gradient):
    """After every step w equals w0 + M (w_stepped - w0), with G the sum of the (clipped or raw) gradients,
    I_pre = R(w0), I_ft = R(G), M computed directly; elements with M = 0 are bit-identical to w0."""
    model, x, y = linear_problem()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = Spider(config(spider_gradient=gradient), None, list(model.named_parameters()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    record = []
    train_steps(model, method, optimizer, x, y, steps=4, max_grad_norm=0.05, record=record)
    scale_ratio = [r["clipped"]["weight"].norm() / r["raw"]["weight"].norm() for r in record]
    assert max(scale_ratio) < 0.99  # clipping was active, so "raw" and "clipped" really differ
    saw_reset = saw_partial = False
    for step, r in enumerate(record):
        for name in w0:
            grad_sum = sum(record[s][gradient][name] for s in range(step + 1))
            mask = spider_mask(importance(w0[name]), importance(grad_sum))
            expected = w0[name] + mask * (r["stepped"][name] - w0[name])
            got = r["after"][name]
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7,
                                       msg=f"step {step} {name}: {show_difference(got, expected)}")
            assert torch.equal(got[mask == 0], w0[name][mask == 0]), f"step {step} {name}: reset not exact"
            assert torch.equal(got[mask == 1], r["stepped"][name][mask == 1]), f"step {step} {name}: kept not exact"
            saw_reset |= bool((mask == 0).any())
            saw_partial |= bool(((mask > 0) & (mask < 1)).any())
    assert saw_reset and saw_partial and method.steps == len(record)
    for name, g in zip(w0, method.grad_sum, strict=True):
        torch.testing.assert_close(g, sum(r[gradient][name] for r in record), rtol=1e-6, atol=0)


def test_raw_mode_needs_before_optimizer_step():
    model, x, y = linear_problem()
    method = Spider(config(spider_gradient="raw"), None, list(model.named_parameters()))
    (model(x) - y).square().mean().backward()
    with pytest.raises(RuntimeError, match="before_optimizer_step"):
        method.after_optimizer_step()


def test_bad_inputs_raise():
    model, _, _ = linear_problem()
    with pytest.raises(ValueError, match="spider_gradient"):
        Spider(config(spider_gradient="sign"), None, list(model.named_parameters()))
    with pytest.raises(ValueError, match="no trainable parameters"):
        Spider(config(), None, [])
    method = Spider(config(), None, list(model.named_parameters()))
    state = method.state_dict()
    del state["grad_sum"]
    with pytest.raises(ValueError, match="grad_sum"):
        method.load_state_dict(state)
    with pytest.raises(ValueError, match="spider_gradient"):
        method.load_state_dict({**method.state_dict(), "gradient": "raw"})


def save_and_load(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_resume_is_bit_exact():
    """5 steps straight == 3 steps, save (weights, optimizer, method), fresh objects, load, 2 steps."""
    reference, x, y = linear_problem()
    method_r = Spider(config(), None, list(reference.named_parameters()))
    optimizer_r = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.1)
    train_steps(reference, method_r, optimizer_r, x, y, steps=5, max_grad_norm=1.0)

    first, _, _ = linear_problem()
    method_a = Spider(config(), None, list(first.named_parameters()))
    optimizer_a = torch.optim.AdamW(first.parameters(), lr=0.05, weight_decay=0.1)
    train_steps(first, method_a, optimizer_a, x, y, steps=3, max_grad_norm=1.0)
    saved = save_and_load({"model": first.state_dict(), "optimizer": optimizer_a.state_dict(),
                           "method": method_a.state_dict()})
    assert saved["method"]["steps"] == 3

    torch.manual_seed(123)
    second = nn.Linear(6, 4)  # different weights: everything must come from the checkpoint
    second.load_state_dict(saved["model"])
    method_b = Spider(config(), None, list(second.named_parameters()))  # its w0 is the wrong (stepped) one...
    method_b.load_state_dict(saved["method"])  # ...until the checkpoint restores it
    optimizer_b = torch.optim.AdamW(second.parameters(), lr=0.05, weight_decay=0.1)
    optimizer_b.load_state_dict(saved["optimizer"])
    for mine, theirs in zip(method_b.w0 + method_b.importance_pre + method_b.grad_sum,
                            method_a.w0 + method_a.importance_pre + method_a.grad_sum, strict=True):
        assert torch.equal(mine, theirs)
    train_steps(second, method_b, optimizer_b, x, y, steps=2, max_grad_norm=1.0, start=3)
    for (name, p), q in zip(second.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: {show_difference(p.detach(), q.detach())}"
    assert method_b.steps == method_r.steps == 5


def test_extra_memory_is_the_stored_tensors():
    """w0 (4 B) + I_pre (4 B) + G (4 B) per fp32 element, nothing else."""
    model, _, _ = linear_problem()
    method = Spider(config(), None, list(model.named_parameters()))
    n = sum(p.numel() for p in model.parameters())
    stored = method.w0 + method.importance_pre + method.grad_sum
    assert method.extra_memory_bytes() == sum(t.numel() * t.element_size() for t in stored) == 12 * n


# ----------------------------------------------------------------------------------------------------
# tiny-llava and tiny-vila
# ----------------------------------------------------------------------------------------------------
SAMPLES = [("Give a brief summary of what you see", "a red square", (200, 30, 30)),
           ("Which shape is shown?\nA. circle\nB. square\nAnswer with the option's letter from the given "
            "choices directly.", "B", (30, 200, 30))]


def tiny_batch(mllm):
    from data import collate, tokenize_conversation

    items = []
    for i, (question, answer, colour) in enumerate(SAMPLES):
        input_ids, labels = tokenize_conversation(question, answer, mllm.tokenizer, mllm.num_image_tokens,
                                                  mllm.image_token_id, max_length=512)
        items.append({"id": f"s{i}", "task": "caption", "source": "synthetic", "input_ids": input_ids,
                      "labels": labels, "pixel_values": mllm.preprocess([Image.new("RGB", (20, 16), colour)])[0]})
    return collate(items, mllm.pad_token_id)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-vila"])
def test_tiny_models_train(name):
    import models  # imported here: the 2-rank workers below re-import this file and need no transformers

    mllm = models.load_model(name)
    groups = models.freeze_for_finetuning(mllm, tune_last_layers=2)
    named = [(n, p) for n, p in mllm.model.named_parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in mllm.model.named_parameters() if not p.requires_grad}
    method = Spider(config(), mllm, named)
    optimizer = torch.optim.AdamW([{"params": g["params"]} for g in groups if g["params"]], lr=1e-3,
                                  weight_decay=0.01)
    batch, forward = tiny_batch(mllm), model_forward(mllm.model)
    losses = []
    for _ in range(3):
        loss, metrics = method.loss(forward, batch)
        assert torch.isfinite(loss) and "ce" in metrics
        losses.append(float(loss.detach()))
        loss.backward()
        method.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        method.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0], f"{name}: loss did not go down: {losses}"
    moved = kept = 0
    for (n, p), w0 in zip(named, method.w0, strict=True):
        assert torch.isfinite(p).all(), n
        moved += int((p != w0).sum())
        kept += int((p == w0).sum())
    assert moved > 0 and kept > 0, f"{name}: moved {moved}, kept at w0 {kept}"
    for n, p in mllm.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"{name}: frozen {n} changed"
    state = save_and_load(method.state_dict())
    fresh = Spider(config(), mllm, named)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.w0 + fresh.grad_sum + fresh.importance_pre,
                    method.w0 + method.grad_sum + method.importance_pre, strict=True):
        assert torch.equal(a, b)
    assert fresh.extra_memory_bytes() == 12 * sum(p.numel() for _, p in named)


# ----------------------------------------------------------------------------------------------------
# 2 ranks on CPU (gloo): DDP and FSDP2 give the single-process weights and state
# ----------------------------------------------------------------------------------------------------
class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(6, 5)  # 5 rows: FSDP2 shards them unevenly over 2 ranks (3 + 2)
        self.down = nn.Linear(5, 3)
        with torch.no_grad():
            self.down.bias.zero_()  # an all-zero tensor: I_pre = 0

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def distributed_data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)


def run_steps(model, wrapped, x, y, steps):
    method = Spider(config(), None, [(n, p) for n, p in model.named_parameters()])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(steps):
        (wrapped(x) - y).square().mean().backward()
        method.before_optimizer_step()
        optimizer.step()
        method.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
    return method


def _distributed_worker(rank, world, steps):
    import torch.distributed as dist

    from baselines import gather_full

    x, y = distributed_data()
    reference = TwoLayer()
    ref_method = run_steps(reference, reference, x, y, steps)
    ref_state = ref_method.state_dict()
    half = x.shape[0] // world
    mine = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
    for mode in ("ddp", "fsdp"):
        where = f"rank {rank} {mode}"
        model = TwoLayer()
        wrapped = wrap_up_down(model, mode)
        method = run_steps(model, wrapped, *mine, steps)
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            local = p.to_local() if hasattr(p, "to_local") else p
            torch.testing.assert_close(gather_full(p, local.detach()), q.detach(), rtol=1e-5, atol=1e-6,
                                       msg=f"{where} weight {name}")
        state = method.state_dict()
        for key in ("w0", "importance_pre", "grad_sum"):
            for name, value in ref_state[key].items():
                torch.testing.assert_close(state[key][name], value, rtol=1e-5, atol=1e-6,
                                           msg=f"{where} {key}[{name}]")
        memory = torch.tensor([method.extra_memory_bytes()])
        dist.all_reduce(memory)
        expected = ref_method.extra_memory_bytes() * (world if mode == "ddp" else 1)
        assert memory.item() == expected, f"{where}: extra memory {memory.item()} != {expected}"
        fresh = Spider(config(), None, list(model.named_parameters()))
        fresh.load_state_dict(save_and_load(state))
        for a, b in zip(fresh.w0 + fresh.importance_pre + fresh.grad_sum,
                        method.w0 + method.importance_pre + method.grad_sum, strict=True):
            assert torch.equal(a, b), f"{where}: resumed state differs"


def test_ddp_and_fsdp2_match_one_process():
    run_on_gloo_ranks(_distributed_worker, 2, 3)
