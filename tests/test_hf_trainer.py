"""hf_trainer.py: NRCATrainer's loss equals train.py's on the same batch (same noise seed, same method code),
and HF Trainer trains with it (LLaVA-1.5 batches from data.collate; a Qwen2-VL batch of packed patches).

Run: TRITON_INTERPRET=1 python -m pytest -q tests/test_hf_trainer.py   (about 15 s on 2 CPU cores)
"""

import pytest
import torch
from transformers import TrainingArguments

import data
import hf_tiny
import models
import train
from hf_trainer import NRCATrainer
from methods import get_method, model_forward


def synthetic_records(root):
    sources = [data.Source("synthetic-caption", str(root / "train_caption.json"), "caption"),
               data.Source("synthetic-choice", str(root / "train_choice.json"), "choice")]
    return data.mix_datasets(sources, samples_per_dataset=4, seed=0)


def arguments(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, learning_rate=5e-3,
                    max_steps=3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                    remove_unused_columns=False, dataloader_num_workers=0, lr_scheduler_type="constant",
                    seed=0, disable_tqdm=True)
    return TrainingArguments(**{**settings, **overrides})


def trainable_copy(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["nrca", "full"])
def test_loss_matches_train_py_on_the_same_batch(method, synthetic_data_dir, tmp_path):
    mllm = models.load_model("tiny-llava")
    models.freeze_for_finetuning(mllm)
    records = synthetic_records(synthetic_data_dir)
    dataset = data.MultiTaskDataset(records, synthetic_data_dir, mllm.tokenizer, mllm.preprocess,
                                    mllm.num_image_tokens, mllm.image_token_id, max_length=256)
    batch = data.collate([dataset[i] for i in (0, 1, 4, 5)], mllm.pad_token_id)  # 2 caption + 2 choice records
    assert {"caption", "choice"} <= set(batch["tasks"])  # open-response and fixed-choice samples
    cfg = train.make_config(method=method, seed=3)
    mllm.model.train()  # as train.py and Trainer run it

    # train.py: the method on model_forward, the noise seed of step 0, micro-batch 0, rank 0
    named = [(n, p) for n, p in mllm.model.named_parameters() if p.requires_grad]
    expected, expected_metrics = get_method(method)(cfg, mllm, named).loss(
        model_forward(mllm.model), {**batch, "noise_seed": train.noise_seed(3, 0, 0, 0)})

    trainer = NRCATrainer(model=mllm.model, args=arguments(tmp_path), train_dataset=dataset,
                          data_collator=lambda items: data.collate(items, mllm.pad_token_id), nrca=cfg)
    got = trainer.compute_loss(mllm.model, batch)
    assert torch.equal(got, expected), (float(got), float(expected))
    if method == "nrca":
        assert trainer.nrca_metrics["n_open"] == expected_metrics["n_open"] > 0
        assert float(expected_metrics["alignment"]) > 0
    # the second micro-batch of the same step draws other noise (train.py's seed for micro 1)
    if method == "nrca":
        again, _ = get_method(method)(cfg, mllm, named).loss(
            model_forward(mllm.model), {**batch, "noise_seed": train.noise_seed(3, 0, 1, 0)})
        assert torch.equal(trainer.compute_loss(mllm.model, batch), again)
        assert not torch.equal(again, expected)
        mllm.model.eval()  # Trainer.evaluate: micro-batch 0's seed, and the training count does not move
        assert torch.equal(trainer.compute_loss(mllm.model, batch), expected) and trainer._micro == 2


def test_trainer_trains_tiny_llava(synthetic_data_dir, tmp_path):
    mllm = models.load_model("tiny-llava")
    models.freeze_for_finetuning(mllm)
    dataset = data.MultiTaskDataset(synthetic_records(synthetic_data_dir), synthetic_data_dir, mllm.tokenizer,
                                    mllm.preprocess, mllm.num_image_tokens, mllm.image_token_id, max_length=256)
    before = trainable_copy(mllm.model)
    trainer = NRCATrainer(model=mllm.model, args=arguments(tmp_path, gradient_accumulation_steps=2),
                          train_dataset=dataset, data_collator=lambda items: data.collate(items, mllm.pad_token_id),
                          nrca={"method": "nrca"})
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for name, parameter in mllm.model.named_parameters():
        assert torch.equal(parameter, before[name]) != parameter.requires_grad, name  # trained iff trainable
    assert trainer._micro == 2  # two micro-batches per step, each with its own seed


def test_trainer_trains_qwen2_vl_packed_patches(synthetic_data_dir, tmp_path):
    mllm = hf_tiny.build("qwen2_vl")
    models.freeze_for_finetuning(mllm, tune_last_layers=2)
    dataset = mllm.dataset(synthetic_records(synthetic_data_dir), synthetic_data_dir)
    before = trainable_copy(mllm.model)
    trainer = NRCATrainer(model=mllm.model, args=arguments(tmp_path, max_steps=2), train_dataset=dataset,
                          data_collator=mllm.collate, processing_class=mllm.processor, nrca={"method": "nrca"})
    trainer.train()
    assert trainer.nrca_metrics["n_open"] >= 0 and "alignment" in trainer.nrca_metrics
    merger = [n for n, _ in mllm.connector_parameters()]
    assert merger and all(not torch.equal(dict(mllm.model.named_parameters())[n], before[n]) for n in merger)
    frozen = [n for n, p in mllm.model.named_parameters() if not p.requires_grad]
    assert all(torch.equal(dict(mllm.model.named_parameters())[n], before[n]) for n in frozen)


def test_activation_checkpointing_on_a_generic_family_gives_the_same_weights(synthetic_data_dir, tmp_path):
    """Qwen2-VL through transformers' own checkpointing (train.checkpoint_decoder_layers, hf_trainer.py's
    --activation-checkpointing): every decoder layer runs again in the backward pass, the weights come out equal."""
    from train import checkpoint_decoder_layers

    weights, calls = {}, {}
    for checkpointing in (False, True):
        mllm = hf_tiny.build("qwen2_vl")
        models.freeze_for_finetuning(mllm, tune_last_layers=2)
        if checkpointing:
            checkpoint_decoder_layers(mllm.model.get_decoder())
        counter = {"n": 0}

        def count(*_, counter=counter):  # inside the recomputed region: runs again in the backward pass
            counter["n"] += torch.is_grad_enabled()

        for layer in mllm.decoder_layers:
            layer.self_attn.register_forward_hook(count)
        dataset = mllm.dataset(synthetic_records(synthetic_data_dir), synthetic_data_dir)
        trainer = NRCATrainer(model=mllm.model, args=arguments(tmp_path / str(checkpointing), max_steps=2),
                              train_dataset=dataset, data_collator=mllm.collate, processing_class=mllm.processor,
                              nrca={"method": "nrca"})
        trainer.train()
        weights[checkpointing] = trainable_copy(mllm.model)
        calls[checkpointing] = counter["n"]
    assert calls[False] > 0 and calls[True] == 2 * calls[False], calls
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[False])


def test_trainer_rejects_methods_with_state():
    with pytest.raises(ValueError, match="random-mask"):
        NRCATrainer(model=torch.nn.Linear(1, 1), nrca={"method": "random-mask"})
