"""Tests for train.py (and the Full FT / NRCA steps of methods.py) on the tiny models, CPU only.

Covered: the loss goes down on a small overfit set (Full FT and NRCA, LLaVA and VILA); delta = 0 and lam = 0
give Full FT's update bit-exactly; the fused 2B forward and the released two-forward path agree; 2-rank torchrun
(gloo) with DDP and FSDP2 leaves identical weights on both ranks and matches a 1-rank run of the same global
batch; kill-and-resume equals an uninterrupted run bit-exactly; a NaN in the logits stops the run with the step,
batch ids and last checkpoint; bad configs fail before any model loads; argparse; the per-epoch evaluation.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_train.py
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import torchrun_train
from safetensors.torch import load_file

import models
import train
from methods import NRCA, model_forward

REPO = Path(__file__).resolve().parents[1]


def config(data_dir, out_dir, **overrides):
    """Tiny settings: 8 records (4 caption + 4 choice), batch 4, one epoch, no evaluation."""
    base = dict(model="tiny-llava", data_dir=str(data_dir), out_dir=str(out_dir), base_epochs=0, epochs=1,
                batch_size=4, micro_batch_size=4, samples_per_dataset=4, eval_every_epoch=False)
    return train.make_config(**{**base, **overrides})


def run(data_dir, out_dir, **overrides):
    train.main(config(data_dir, out_dir, **overrides))
    return Path(out_dir)


def latest_weights(out_dir) -> dict:
    """The trainable tensors of the run's latest checkpoint."""
    out_dir = Path(out_dir)
    return load_file(str(out_dir / (out_dir / "latest").read_text().strip() / "trainable.safetensors"))


def step_records(out_dir) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step" in r]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def initial_weights(names, model="tiny-llava") -> dict:
    params = dict(models.load_model(model).model.named_parameters())
    return {name: params[name].detach() for name in names}


# ---------------------------------------------------------------------------------------------
# 1. A few steps learn: the loss goes down on a small overfit set.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, method", [("tiny-llava", "full"), ("tiny-llava", "nrca"), ("tiny-vila", "nrca")])
def test_loss_goes_down_on_a_small_overfit_set(model, method, synthetic_data_dir, tmp_path):
    # The same 8 records every step (batch 8 = 2 micro-batches x 4), 6 epochs, a large learning rate.
    out = run(synthetic_data_dir, tmp_path / "run", model=model, method=method, epochs=6, batch_size=8,
              micro_batch_size=4, lr_llm=1e-3, lr_connector=1e-3, warmup_ratio=0.0)
    records = step_records(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    # Full FT: the CE falls fast. NRCA from random weights: the alignment gradient is scaled by sg(CE) / sg(I)
    # (Eq. 5b) with I ~ 1/V, so it dominates the step and the CE may stall (tiny-vila); its objective still falls.
    falls = {"full": {"loss": 0.8, "ce": 0.8}, "nrca": {"loss": 0.95, "alignment": 0.5}}[method]
    for key, factor in falls.items():
        first, last = records[0][key], sum(r[key] for r in records[-2:]) / 2
        assert last < factor * first, (key, [round(r[key], 3) for r in records])
    if method == "nrca":
        assert all(r["n_open"] > 0 and r["alignment"] > 0 for r in records)  # captions get the term
    assert (out / "final" / "config.json").exists()  # the final model is written in the input's format


# ---------------------------------------------------------------------------------------------
# 2. delta = 0 or lam = 0 is Full FT's update, bit for bit.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_ft_weights(synthetic_data_dir, tmp_path_factory):
    return latest_weights(run(synthetic_data_dir, tmp_path_factory.mktemp("full"), method="full"))


@pytest.mark.parametrize("overrides", [dict(delta=0.0), dict(lam=0.0)], ids=["delta0", "lam0"])
def test_nrca_reduces_to_full_ft_bit_exactly(overrides, full_ft_weights, synthetic_data_dir, tmp_path):
    # Fused path: the clean half of the 2B forward computes each row as the B forward does on CPU, the
    # alignment term is exactly 0 (delta = 0: I~ == I; lam = 0: 0 * term) and |x|' = 0 at 0.
    weights = latest_weights(run(synthetic_data_dir, tmp_path / "run", method="nrca", **overrides))
    assert all(torch.equal(weights[k], full_ft_weights[k]) for k in full_ft_weights), \
        max_difference(weights, full_ft_weights)


def test_default_nrca_differs_from_full_ft(full_ft_weights, synthetic_data_dir, tmp_path):
    """Control for the test above: with delta = 0.5, lam = 2 the alignment term changes the update."""
    weights = latest_weights(run(synthetic_data_dir, tmp_path / "run", method="nrca"))
    assert max_difference(weights, full_ft_weights) > 1e-7


# ---------------------------------------------------------------------------------------------
# 3. One forward of 2B samples (fused kernel) == the released two forwards (fp32 logits, F.cross_entropy).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-llava", "tiny-vila"])
def test_fused_and_released_nrca_agree(model, synthetic_data_dir, tmp_path):
    torch.manual_seed(0)
    cfg = config(synthetic_data_dir, tmp_path, model=model, method="nrca")
    mllm = models.load_model(model)
    models.freeze_for_finetuning(mllm, tune_last_layers=2)
    named = [(n, p) for n, p in mllm.model.named_parameters() if p.requires_grad]
    dataset = train.build_dataset(cfg, mllm, rank=0, world=1)
    tasks = [dataset.records[i]["task"] for i in range(len(dataset))]
    indices = [tasks.index("caption"), tasks.index("choice"), len(tasks) - 1 - tasks[::-1].index("caption")]
    batch = train.load_batch(dataset, indices, mllm, torch.device("cpu"))
    batch["noise_seed"] = 1234
    forward = model_forward(mllm.model)
    results = {}
    for impl in ("fused", "released"):
        method = NRCA(dataclasses.replace(cfg, nrca_impl=impl), mllm, named)
        loss, metrics = method.loss(forward, batch)
        loss.backward()
        results[impl] = (loss.detach(), metrics, {n: p.grad.clone() for n, p in named})
        for _, p in named:
            p.grad = None
    (loss_f, m_f, grads_f), (loss_r, m_r, grads_r) = results["fused"], results["released"]
    assert m_f["n_open"] == m_r["n_open"] == 2 and float(m_f["alignment"]) > 0
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=0)
    torch.testing.assert_close(m_f["alignment"], m_r["alignment"], rtol=1e-4, atol=0)
    scale = max(g.abs().max().item() for g in grads_r.values())
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


# ---------------------------------------------------------------------------------------------
# 4. torchrun --nproc_per_node 2 on CPU (gloo): DDP and FSDP2.
# ---------------------------------------------------------------------------------------------
def torchrun(tmp_path, data_dir, method: str, fsdp: bool):
    out = tmp_path / "run"
    ranks = torchrun_train(tmp_path, ["--model", "tiny-llava", "--data-dir", str(data_dir), "--out-dir", str(out),
                                      "--base-epochs", "0", "--epochs", "1", "--batch-size", "4",
                                      "--micro-batch-size", "2", "--samples-per-dataset", "4", "--no-eval-every-epoch",
                                      "--method", method] + (["--fsdp"] if fsdp else []))
    return out, ranks


@pytest.fixture(scope="module")
def one_rank_full_ft(synthetic_data_dir, tmp_path_factory):
    """The reference: one rank, the same global batch of 4 as two micro-batches of 2 (accumulation 2)."""
    return latest_weights(run(synthetic_data_dir, tmp_path_factory.mktemp("one_rank"), method="full",
                              micro_batch_size=2))


@pytest.mark.parametrize("method, fsdp", [("full", False), ("full", True), ("nrca", False)],
                         ids=["ddp-full", "fsdp-full", "ddp-nrca"])
def test_torchrun_two_ranks_on_cpu(method, fsdp, one_rank_full_ft, synthetic_data_dir, tmp_path):
    out, (rank0, rank1) = torchrun(tmp_path, synthetic_data_dir, method, fsdp)
    assert rank0.keys() == rank1.keys() == one_rank_full_ft.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), max_difference(rank0, rank1)
    checkpoint = latest_weights(out)  # rank 0 writes it
    assert all(torch.equal(rank0[k], checkpoint[k]) for k in rank0)
    assert [r["step"] for r in step_records(out)] == [1, 2]  # 8 records / global batch 4
    moved = initial_weights(rank0.keys())
    assert min((rank0[k] - moved[k]).abs().max().item() for k in rank0) > 1e-5  # every trainable tensor trained
    final = dict(models.load_model(str(out / "final")).model.named_parameters())  # the saved model has them
    assert all(torch.equal(final[k].detach(), checkpoint[k]) for k in checkpoint)
    if method == "full":
        # Same 4 samples per step (rank r takes every 2nd of the seeded order), gradients averaged over ranks:
        # equal to the 1-rank run up to float summation order (micro-batches {0, 2}, {1, 3} vs {0, 1}, {2, 3}).
        assert max_difference(rank0, one_rank_full_ft) < 1e-5


# ---------------------------------------------------------------------------------------------
# 5. Kill and resume == uninterrupted, bit-exact on CPU.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, stop_at", [("nrca", 1), ("random-mask", 3)])
def test_resume_equals_uninterrupted(method, stop_at, synthetic_data_dir, tmp_path):
    settings = dict(method=method, epochs=2)  # 2 steps per epoch, 4 in all
    straight = latest_weights(run(synthetic_data_dir, tmp_path / "straight", **settings))
    out = tmp_path / "resumed"
    result = train.main(config(synthetic_data_dir, out, stop_at_step=stop_at, **settings))
    assert result == {"stopped_at_step": stop_at}
    assert (out / "latest").read_text() == f"checkpoint-{stop_at}" and not (out / "final").exists()
    run(synthetic_data_dir, out, resume=True, **settings)
    assert [r["step"] for r in step_records(out)] == [1, 2, 3, 4]  # nothing repeated, nothing skipped
    resumed = latest_weights(out)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight), max_difference(resumed, straight)


# ---------------------------------------------------------------------------------------------
# 6. A NaN in the logits stops the run and names the step, the batch and the last good checkpoint.
# ---------------------------------------------------------------------------------------------
def test_nan_logits_stop_the_run_with_step_batch_and_checkpoint(synthetic_data_dir, tmp_path, monkeypatch):
    loaded_ids, calls = [], []
    real_next_batch, real_model_forward = train.next_batch, train.model_forward

    def next_batch(*args, **kwargs):
        batch = real_next_batch(*args, **kwargs)
        loaded_ids.append(batch["ids"])
        return batch

    def model_forward(model):
        forward = real_model_forward(model)

        def poisoned(*args, **kwargs):
            logits = forward(*args, **kwargs)
            calls.append(1)
            return logits * float("nan") if len(calls) == 2 else logits  # (N, V), NaN in step 2

        return poisoned

    monkeypatch.setattr(train, "next_batch", next_batch)
    monkeypatch.setattr(train, "model_forward", model_forward)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as error:
        run(synthetic_data_dir, out, method="nrca", save_every=1)
    message = str(error.value)
    assert "non-finite loss (nan) at step 2 (epoch 0, rank 0)" in message
    assert f"batch ids {loaded_ids[1]}" in message and len(loaded_ids) == 2
    assert f"last good checkpoint: {out / 'checkpoint-1'}" in message
    assert (out / "latest").read_text() == "checkpoint-1" and not (out / "checkpoint-2").exists()
    assert [r["step"] for r in step_records(out)] == [1]  # the bad step was not logged or applied


# ---------------------------------------------------------------------------------------------
# 7. Configuration: clear errors before any model loads; argparse.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (dict(delta=1.5), "--delta 1.5"),
    (dict(lam=-1.0), "--lam -1.0"),
    (dict(method="sgd"), "--method 'sgd'"),
    (dict(nrca_impl="fast"), "--nrca-impl 'fast'"),
    (dict(nrca_alignment="l1"), "--nrca-alignment 'l1'"),
    (dict(eval_split="dev"), "--eval-split 'dev'"),
    (dict(train=["caption:x=/no/such/file.json"], test=["caption:y=/no/such/file.json"], eval_split="val"),
     "--eval-split val: reads a split of --data-dir"),
    (dict(preset="llava-13b"), "--preset 'llava-13b'"),
    (dict(train=["caption:x=/no/such/file.json"]), "does not exist"),
    (dict(train=["captions=/no/such/file.json"]), "TASK:NAME=PATH"),
    (dict(epochs=0), "--epochs 0"),
    (dict(vila_downsample_order="columns"), "--vila-downsample-order 'columns'"),
    (dict(bogus_field=1), "unknown config fields ['bogus_field']"),
])
def test_bad_config_values_are_clear_errors(overrides, words, tmp_path):
    with pytest.raises(ValueError) as error:
        config(tmp_path, tmp_path, **overrides)
    assert words in str(error.value)


@pytest.mark.parametrize("flag", ["--lr-llm=inf", "--mi-lam=nan", "--lam=-inf", "--delta=nan", "--warmup-ratio=nan",
                                  "--reg-lam=inf", "--max-grad-norm=inf"])
def test_every_float_option_must_be_finite(flag):
    with pytest.raises(ValueError, match=rf"^{flag.replace('=', ' ')}: expected a finite number$"):
        train.parse_config([flag])


def test_errors_come_before_any_model_loads(synthetic_data_dir, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("models.load_model called before the configuration was checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    with pytest.raises(ValueError, match="--batch-size 6 is not a multiple of --micro-batch-size 4 x 1 ranks"):
        run(synthetic_data_dir, tmp_path, batch_size=6, micro_batch_size=4)
    good = config(synthetic_data_dir, tmp_path)
    with pytest.raises(ValueError, match="--delta 1.5"):  # a config edited in code is checked by main too
        train.main(dataclasses.replace(good, delta=1.5))
    caption = f"caption:cap={synthetic_data_dir / 'train_caption.json'}"
    with pytest.raises(ValueError, match="--train given without --test"):  # real data needs its test splits
        train.main(dataclasses.replace(good, train=[caption], eval_every_epoch=True))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_argparse_round_trip(synthetic_data_dir):
    caption = f"caption:cap={synthetic_data_dir / 'train_caption.json'}"
    choice = f"choice:mc={synthetic_data_dir / 'train_choice.json'}"
    cfg = train.parse_config(["--preset", "vila", "--train", caption, "--train", choice, "--no-eval-every-epoch",
                              "--delta", "0.25", "--method", "full", "--epochs", "5", "--fsdp"])
    assert cfg.train == [caption, choice] and cfg.eval_every_epoch is False and cfg.fsdp is True
    assert (cfg.delta, cfg.method, cfg.epochs) == (0.25, "full", 5)  # explicit flags beat the preset
    assert (cfg.preset, cfg.lr_llm, cfg.lr_connector, cfg.batch_size) == ("vila", 1e-4, 1e-4, 16)  # the preset
    assert cfg.lam == 2.0 and cfg.tune_last_layers == 2  # field defaults
    default = train.parse_config([])
    assert default == train.make_config(compare="full") and default.preset == "embedded" and default.method == "nrca"
    assert train.make_config().compare == ""  # only the bare `python train.py` trains Full FT beside NRCA
    assert default.base_epochs > 0 and default.eval_every_epoch is True
    with pytest.raises(SystemExit):
        train.parse_config(["--delta", "half"])


# ---------------------------------------------------------------------------------------------
# 8. The per-epoch evaluation hook.
# ---------------------------------------------------------------------------------------------
def test_per_epoch_evaluation_writes_metrics_and_table(synthetic_data_dir, tmp_path, capsys):
    out = run(synthetic_data_dir, tmp_path / "run", method="nrca", eval_every_epoch=True, eval_limit=2,
              eval_max_new_tokens=4)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval" in line]
    assert len(evals) == 1 and evals[0]["epoch"] == 1
    assert {"cider", "accuracy", "avg"} <= evals[0]["eval"].keys()
    assert 0 <= evals[0]["eval"]["accuracy"] <= 100
    assert (out / "eval_epoch1").is_dir()
    printed = capsys.readouterr().out
    assert "| epoch | CIDEr | accuracy | AVG |" in printed and "\n| 1 | " in printed
