"""train.py and evaluate.py on the generic families: hf_tiny.py's tiny Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision and
Idefics3 written as transformers folders (`python hf_tiny.py NAME FOLDER`), loaded by `train.py --model FOLDER` like
any checkpoint. Each family trains a few steps of NRCA and of one counterpart (per-epoch evaluation with CIDEr
and accuracy, final model saved), the saved model reloads with the trained tensors and `evaluate.py RUN` scores
it; a resumed run equals an uninterrupted one bit for bit; 2 gloo ranks under torchrun (DDP, and FSDP2 with
activation checkpointing) end with one rank's weights.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_train_generic.py   (about 2 min on 2 CPU cores)
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import torchrun_train
from safetensors.torch import load_file

import evaluate
import hf_tiny
import models
import train

# The counterpart each family trains beside NRCA: every stateful kind (reference weights, masks, SPIDER) once.
COUNTERPART = {"tiny-qwen2-vl": "l2", "tiny-qwen2-5-vl": "random-mask", "tiny-llava-onevision": "spider",
               "tiny-idefics3": "magnitude-mask"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("generic-models")
    return {name: Path(hf_tiny.write(name, str(root / name))) for name in hf_tiny.NAMES}


def settings(model, data_dir, out_dir, **overrides):
    """8 records (4 caption + 4 choice), global batch 4 as two micro-batches of 2, one epoch, evaluated."""
    base = dict(model=str(model), data_dir=str(data_dir), out_dir=str(out_dir), base_epochs=0, epochs=1,
                batch_size=4, micro_batch_size=2, samples_per_dataset=4, eval_max_new_tokens=4)
    return train.make_config(**{**base, **overrides})


def latest_weights(out_dir) -> dict:
    out_dir = Path(out_dir)
    return load_file(str(out_dir / (out_dir / "latest").read_text().strip() / "trainable.safetensors"))


def step_records(out_dir) -> list[dict]:
    return [r for r in map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines()) if "step" in r]


@pytest.mark.parametrize("name", sorted(COUNTERPART))
def test_family_trains_saves_reloads_and_evaluates(name, folders, synthetic_data_dir, tmp_path):
    initial = models.load_model(str(folders[name]))
    assert initial.kind == "hf"
    before = {n: p.detach().clone() for n, p in initial.model.named_parameters()}
    for method in ("nrca", COUNTERPART[name]):
        out = tmp_path / method
        result = train.main(settings(folders[name], synthetic_data_dir, out, method=method))
        assert result["n_caption"] == result["n_choice"] == 4  # the epoch's evaluation: CIDEr and accuracy
        assert result["cider"] >= 0 and 0 <= result["accuracy"] <= 100
        steps = step_records(out)
        assert [r["step"] for r in steps] == [1, 2] and all(torch.isfinite(torch.tensor([r["loss"] for r in steps])))
        if method == "nrca":
            assert all("alignment" in r and r["n_open"] >= 0 for r in steps)
        trained = latest_weights(out)
        final = models.load_model(str(out / "final"))
        assert type(final.model) is type(initial.model)
        after = dict(final.model.named_parameters())
        assert all(torch.equal(after[n].detach(), trained[n]) for n in trained)  # the saved model has them
        assert any(not torch.equal(trained[n], before[n]) for n in trained)
        frozen = [n for n in before if n not in trained]
        assert frozen and all(torch.equal(after[n].detach(), before[n]) for n in frozen)
        connector = {n for n, _ in initial.connector_parameters()}
        assert connector <= trained.keys() and not any("vision" in n or "visual." in n for n in trained.keys()
                                                       - connector)
    scores = evaluate.main([str(out), "--limit", "2", "--max-new-tokens", "4"])  # the last run's folder
    assert scores["n_caption"] == scores["n_choice"] == 2 and scores["cider"] >= 0
    assert json.loads((out / "eval.json").read_text())["accuracy"] == scores["accuracy"]


def test_resume_equals_uninterrupted(folders, synthetic_data_dir, tmp_path):
    model = folders["tiny-qwen2-vl"]
    common = dict(method="nrca", epochs=2, eval_every_epoch=False)  # 2 steps per epoch, 4 in all
    train.main(settings(model, synthetic_data_dir, tmp_path / "straight", **common))
    out = tmp_path / "resumed"
    assert train.main(settings(model, synthetic_data_dir, out, stop_at_step=3, **common)) == {"stopped_at_step": 3}
    train.main(settings(model, synthetic_data_dir, out, resume=True, **common))
    assert [r["step"] for r in step_records(out)] == [1, 2, 3, 4]
    straight, resumed = latest_weights(tmp_path / "straight"), latest_weights(out)
    assert straight.keys() == resumed.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_unsupported_method_and_records_are_named(folders, synthetic_data_dir, tmp_path):
    with pytest.raises(ValueError, match="mi-consistency.*embed"):
        train.main(settings(folders["tiny-idefics3"], synthetic_data_dir, tmp_path / "mi", method="mi-consistency"))
    mllm = models.load_model(str(folders["tiny-idefics3"]))
    record = json.loads((synthetic_data_dir / "train_caption.json").read_text())[0]
    bad = {**record, "id": "bad", "conversations": record["conversations"] + [{"from": "human", "value": "And?"}]}
    with pytest.raises(ValueError, match="'bad'.*no answer after it"):
        mllm.dataset([record, bad], synthetic_data_dir)
    assert len(mllm.dataset([record, bad], synthetic_data_dir, skip_bad_records=True)) == 1
    with pytest.raises(ValueError, match="connector names .'nothing.here'"):
        train.main(settings(folders["tiny-idefics3"], synthetic_data_dir, tmp_path / "c", connector="nothing.here"))
    with pytest.raises(ValueError, match="--connector.*llava model"):
        train.main(settings("tiny-llava", synthetic_data_dir, tmp_path / "l", connector="multi_modal_projector"))
    with pytest.raises(ValueError, match="attention shares"):
        test = json.loads((synthetic_data_dir / "test_caption.json").read_text())[:1]
        evaluate.generate_answers(mllm, evaluate.validate_test_records(test, "caption"), synthetic_data_dir,
                                  attention=True)


def torchrun_arguments(model, data_dir, out, method, *extra):
    return ["--model", str(model), "--data-dir", str(data_dir), "--out-dir", str(out), "--base-epochs", "0",
            "--epochs", "1", "--batch-size", "4", "--micro-batch-size", "2", "--samples-per-dataset", "4",
            "--no-eval-every-epoch", "--method", method, *extra]


@pytest.mark.parametrize("name, method, extra", [
    ("tiny-qwen2-vl", "full", ("--fsdp", "--activation-checkpointing")),
    ("tiny-qwen2-vl", "nrca", ()),
    ("tiny-llava-onevision", "full", ("--fsdp",)),  # image_newline lies outside the units: the root shards it
], ids=["qwen2-vl-fsdp-checkpointing-full", "qwen2-vl-ddp-nrca", "onevision-fsdp-full"])
def test_two_gloo_ranks_equal_one_rank(name, method, extra, folders, synthetic_data_dir, tmp_path):
    out = tmp_path / "run"
    rank0, rank1 = torchrun_train(tmp_path, torchrun_arguments(folders[name], synthetic_data_dir, out, method, *extra))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    checkpoint = latest_weights(out)
    assert checkpoint.keys() == rank0.keys() and all(torch.equal(rank0[k], checkpoint[k]) for k in rank0)
    final = dict(models.load_model(str(out / "final")).model.named_parameters())
    assert all(torch.equal(final[k].detach(), checkpoint[k]) for k in checkpoint)
    # One rank, the same global batch of 4 as two micro-batches of 2 (the ranks' 4 samples, gradients averaged):
    # equal up to float summation order. NRCA's noise differs by rank (noise_seed), so only Full FT compares.
    if method == "full":
        one = tmp_path / "one-rank"
        train.main(settings(folders[name], synthetic_data_dir, one, method=method, eval_every_epoch=False))
        reference = latest_weights(one)
        assert max((rank0[k] - reference[k]).abs().max().item() for k in reference) < 1e-5
