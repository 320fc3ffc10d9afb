"""Activation checkpointing and FSDP2 over the frozen trunk (train.py `parallelize`), on CPU.

Covered: with --activation-checkpointing every decoder layer runs again in the backward pass and the
weights after 2 steps are bit-identical to a run without it (1 rank fp32 and bf16; 2 gloo ranks with DDP in
fp32 and with FSDP2 in fp32 and bf16); --fsdp shards the frozen decoder layers and the vision-tower layers so
each of 2 ranks holds half of their elements, and ends with the same trainable weights as DDP; the final save
keeps today's format.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_checkpointing_fsdp.py
"""

import os
from pathlib import Path

import pytest
import torch
from conftest import run_on_gloo_ranks
from safetensors.torch import load_file

import models
import train


def settings(data_dir, out_dir, **overrides):
    base = dict(model="tiny-llava", data_dir=str(data_dir), out_dir=str(out_dir), base_epochs=0, epochs=1,
                batch_size=4, micro_batch_size=2, samples_per_dataset=4, eval_every_epoch=False, method="nrca")
    return train.make_config(**{**base, **overrides})


def latest_weights(out_dir) -> dict:
    out_dir = Path(out_dir)
    return load_file(str(out_dir / (out_dir / "latest").read_text().strip() / "trainable.safetensors"))


class CountAttentionCalls:
    """Counts the decoder layers' attention forwards that run with autograd on (training forwards and their
    recomputations in the backward pass; evaluation runs under no_grad). With activation checkpointing every
    layer runs twice per training forward, since the connector's gradient flows through all of them."""

    def __init__(self, monkeypatch=None):
        from transformers.models.llama import modeling_llama

        self.calls, real = 0, modeling_llama.LlamaAttention.forward

        def counted(module, *args, **kwargs):
            self.calls += torch.is_grad_enabled()
            return real(module, *args, **kwargs)

        if monkeypatch is not None:
            monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", counted)
        else:
            modeling_llama.LlamaAttention.forward = counted


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpointing_gives_the_same_weights_on_one_rank(precision, synthetic_data_dir, tmp_path, monkeypatch):
    counter = CountAttentionCalls(monkeypatch)
    weights, calls = {}, {}
    for checkpointing in (False, True):
        before = counter.calls
        out = tmp_path / f"ckpt{checkpointing}"
        train.main(settings(synthetic_data_dir, out, precision=precision, activation_checkpointing=checkpointing))
        calls[checkpointing] = counter.calls - before
        weights[checkpointing] = latest_weights(out)
    # 2 steps x 2 micro-batches (NRCA's clean and noisy rows share one forward) x 4 decoder layers, each
    # recomputed once in the backward pass with checkpointing.
    assert calls == {False: 16, True: 32}
    moved = {n: p.detach() for n, p in models.load_model("tiny-llava").model.named_parameters() if n in weights[True]}
    assert all((weights[True][k].float() - moved[k]).abs().max() > 0 for k in moved)  # it trained
    # The recomputation repeats the same deterministic ops (autocast state restored): bit for bit.
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])


def _two_rank_worker(rank, world, data_dir, out_root):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.manual_seed(0)
    counter = CountAttentionCalls()
    # 1. Per-rank weight memory under FSDP2: the frozen decoder layers and the vision tower are sharded.
    cfg = settings(data_dir, Path(out_root) / "unused", fsdp=True)
    mllm = models.load_model("tiny-llava")
    models.freeze_for_finetuning(mllm, tune_last_layers=2)
    sharded_modules = list(mllm.decoder_layers)[:2] + list(mllm.vision_tower.encoder.layers)
    full = sum(p.numel() for m in sharded_modules for p in m.parameters())
    train.parallelize(mllm, cfg, world)
    local = sum(p.to_local().numel() for m in sharded_modules for p in m.parameters())
    assert all(hasattr(p, "to_local") and not p.requires_grad for m in sharded_modules for p in m.parameters())
    assert abs(local - full / world) <= 64 * sum(1 for m in sharded_modules for _ in m.parameters())  # dim-0 padding
    torch.save({"local": local, "full": full}, Path(out_root) / f"shards.rank{rank}.pt")
    # 2. Short NRCA runs: DDP / FSDP2 in fp32, FSDP2 in bf16, each without / with activation checkpointing.
    for fsdp, precision in ((False, "fp32"), (True, "fp32"), (True, "bf16")):
        calls = {}
        for checkpointing in (False, True):
            before = counter.calls
            out = Path(out_root) / f"fsdp{fsdp}-{precision}-ckpt{checkpointing}"
            train._train(settings(data_dir, out, fsdp=fsdp, precision=precision,
                                  activation_checkpointing=checkpointing), rank, world, torch.device("cpu"))
            calls[checkpointing] = counter.calls - before
        assert calls[False] > 0 and calls[True] == 2 * calls[False], calls  # every layer recomputed once


@pytest.mark.slow
def test_checkpointing_and_fsdp_over_frozen_layers_on_two_ranks(synthetic_data_dir, tmp_path):
    run_on_gloo_ranks(_two_rank_worker, 2, str(synthetic_data_dir), str(tmp_path))
    for rank in range(2):
        shards = torch.load(tmp_path / f"shards.rank{rank}.pt")
        assert 0.45 < shards["local"] / shards["full"] < 0.55, shards  # about 1/world of the frozen elements
    runs = {(fsdp, precision, ckpt): latest_weights(tmp_path / f"fsdp{fsdp}-{precision}-ckpt{ckpt}")
            for fsdp, precision in ((False, "fp32"), (True, "fp32"), (True, "bf16")) for ckpt in (False, True)}
    reference = runs[(False, "fp32", False)]
    assert all(weights.keys() == reference.keys() for weights in runs.values())
    for fsdp, precision, ckpt in runs:  # checkpointing changes nothing, under DDP and FSDP2, fp32 and bf16
        if ckpt:
            without = runs[(fsdp, precision, False)]
            assert all(torch.equal(runs[(fsdp, precision, True)][k], without[k]) for k in reference), (fsdp, precision)
    # FSDP2 (reduce-scatter) and DDP (all-reduce) average the same two gradients: the same weights up to the
    # order of float operations in the collectives.
    worst = max((runs[(True, "fp32", False)][k] - reference[k]).abs().max().item() for k in reference)
    assert worst < 1e-6, worst
    # The final save keeps its format: a LLaVA folder with the trained tensors.
    final = dict(models.load_model(str(tmp_path / "fsdpTrue-fp32-ckptTrue" / "final")).model.named_parameters())
    assert all(torch.equal(final[k].detach(), runs[(True, "fp32", True)][k]) for k in reference)
