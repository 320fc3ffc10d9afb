"""Tests of NRCA's diagnostics (issue: make Eq. 5b visible): the per-step confidences I, I~ of the open
samples and the share with I~ > I, and --diagnose-every's gradient norms and cosine, against separately
computed gradients on a tiny model.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_diagnostics.py
"""

import dataclasses
import json

import pytest
import torch

import models
import train
from confidence_kernel import token_confidence
from methods import NRCA, model_forward
from nrca import answer_mean, answer_positions, nrca_objective, to_grid


@pytest.fixture(scope="module")
def setup(synthetic_data_dir, tmp_path_factory):
    torch.manual_seed(0)
    cfg = train.make_config(model="tiny-llava", data_dir=str(synthetic_data_dir), base_epochs=0, epochs=1,
                            batch_size=4, micro_batch_size=4, samples_per_dataset=4, eval_every_epoch=False,
                            compare="", out_dir=str(tmp_path_factory.mktemp("run")), method="nrca")
    mllm = models.load_model("tiny-llava")
    models.freeze_for_finetuning(mllm, tune_last_layers=2)
    named = [(n, p) for n, p in mllm.model.named_parameters() if p.requires_grad]
    dataset = train.build_dataset(cfg, mllm, rank=0, world=1)
    tasks = [dataset.records[i]["task"] for i in range(len(dataset))]
    caption = [i for i, t in enumerate(tasks) if t == "caption"]
    indices = caption[:3] + [tasks.index("choice")]
    batch = train.load_batch(dataset, indices, mllm, torch.device("cpu"))
    batch["noise_seed"] = 99
    return cfg, mllm, named, batch


def test_confidence_metrics_match_eq4_by_hand(setup):
    cfg, mllm, named, batch = setup
    method = NRCA(cfg, mllm, named)
    forward = model_forward(mllm.model)
    with torch.no_grad():
        _, metrics = method.loss(forward, batch)
        mask, targets = answer_positions(batch["labels"])
        clean = token_confidence(forward(batch["attention_mask"], mask, input_ids=batch["input_ids"],
                                         pixel_values=batch["pixel_values"]), targets)[0]
        noisy = token_confidence(forward(batch["attention_mask"], mask, input_ids=batch["input_ids"],
                                         pixel_values=method.noisy_pixels(batch)), targets)[0]
    I, _ = answer_mean(to_grid(clean, mask), mask)  # (B,) Eq. (4)
    I_noisy, _ = answer_mean(to_grid(noisy, mask), mask)
    is_open = mask.sum(1) >= cfg.min_open_tokens
    assert int(is_open.sum()) == metrics["n_open"] == 3
    torch.testing.assert_close(metrics["confidence"], I[is_open].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(metrics["noisy_confidence"], I_noisy[is_open].mean(), rtol=1e-5, atol=0)
    assert float(metrics["noisy_above_clean"]) == float((I_noisy > I)[is_open].float().mean())


def test_gradient_diagnostics_equal_separate_backwards(setup):
    cfg, mllm, named, batch = setup
    params = [p for _, p in named]
    forward = model_forward(mllm.model)
    method = NRCA(cfg, mllm, named)
    method.diagnose = train.gradient_diagnostics(named)
    loss, metrics = method.loss(forward, batch)
    loss.backward()
    total_grad = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None

    def separate(term):  # a fresh forward, one backward of one term
        clean, noisy = NRCA(cfg, mllm, named).two_branch_stats(forward, batch, method.noisy_pixels(batch))
        out = nrca_objective(clean[1], clean[0], noisy[0], clean[2], lam=cfg.lam)
        (out.ce if term == "ce" else cfg.lam * out.alignment).backward()
        grad = torch.cat([p.grad.flatten() for p in params])
        for p in params:
            p.grad = None
        return grad

    g_ce, g_alignment = separate("ce"), separate("alignment")
    assert float(g_alignment.norm()) > 0
    torch.testing.assert_close(torch.tensor(metrics["grad_norm_ce"]), g_ce.norm(), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(metrics["grad_norm_alignment"]), g_alignment.norm(), rtol=1e-4, atol=0)
    cosine = g_ce @ g_alignment / (g_ce.norm() * g_alignment.norm())
    torch.testing.assert_close(torch.tensor(metrics["grad_cosine"]), cosine, rtol=1e-3, atol=1e-5)
    # The diagnostics leave the update alone: the step's gradient is that of CE + lam * alignment.
    torch.testing.assert_close(total_grad, g_ce + g_alignment, rtol=1e-4, atol=1e-5 * float(total_grad.abs().max()))


def test_train_writes_the_diagnostics_per_step(setup, synthetic_data_dir, tmp_path):
    cfg = dataclasses.replace(setup[0], out_dir=str(tmp_path / "run"), diagnose_every=2)
    train.main(cfg)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "step" in s]
    assert len(steps) == 2
    assert all({"confidence", "noisy_confidence", "noisy_above_clean"} <= s.keys() for s in steps)
    assert "grad_norm_ce" not in steps[0] and {"grad_norm_ce", "grad_norm_alignment", "grad_cosine"} <= steps[1].keys()
    with pytest.raises(ValueError, match="--diagnose-every"):
        train.make_config(diagnose_every=-1)
