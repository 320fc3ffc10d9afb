"""LoRA through peft (lora.py, train.py --lora-rank) on the tiny models, a few steps each.

Covered: only the adapter and the connector train, every other weight of the saved base is bit-identical to the
starting model's; the adapter in final/ loads with `PeftModel.from_pretrained` onto the starting model and gives the
outputs of the merged model (--merge-lora) within float tolerance, for LLaVA, VILA's three folders and a generic
transformers folder; kill and --resume equals an uninterrupted run bit-exactly and a changed LoRA setting is
refused; 2 gloo ranks with DDP and FSDP2 (fp32, bf16) agree with each other and with the 1-rank run; the methods
that compare tensors with w0 are refused with their reason; evaluate.py reads the adapter folder, the adapter
alone and the merged folder with the same predictions; the planner counts LoRA's trainable tensors and plans
less memory.

    TRITON_INTERPRET=1 python -m pytest -q tests/test_lora.py
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_on_gloo_ranks
from PIL import Image
from safetensors.torch import load_file

import evaluate
import hf_tiny
import lora
import memory_plan
import models
import run_folder
import train

LORA = dict(lora_rank=4, lr_llm=2e-2, lr_connector=2e-2)  # a large lr: B moves well away from 0 in 2 steps


def config(data_dir, out_dir, **overrides):
    """8 records (4 caption + 4 choice), batch 4, one epoch (2 steps), no evaluation, LoRA rank 4."""
    base = dict(model="tiny-llava", data_dir=str(data_dir), out_dir=str(out_dir), base_epochs=0, epochs=1,
                batch_size=4, micro_batch_size=4, samples_per_dataset=4, eval_every_epoch=False, **LORA)
    return train.make_config(**{**base, **overrides})


def run(data_dir, out_dir, **overrides) -> Path:
    train.main(config(data_dir, out_dir, **overrides))
    return Path(out_dir)


def latest_weights(out_dir) -> dict:
    out_dir = Path(out_dir)
    return load_file(str(out_dir / (out_dir / "latest").read_text().strip() / "trainable.safetensors"))


def prompt_logits(model: torch.nn.Module, mllm) -> torch.Tensor:
    """The logits of one image prompt (every position), float64 for comparisons."""
    prompt = mllm.prompt(Image.new("RGB", (40, 30), (200, 30, 30)), "What is in the picture?")
    pixel_values = prompt["pixel_values"]
    images = pixel_values if isinstance(pixel_values, dict) else {"pixel_values": pixel_values}
    with torch.no_grad():
        return model(input_ids=prompt["input_ids"][None], **images).logits.double()


@pytest.fixture(scope="module")
def llava_run(synthetic_data_dir, tmp_path_factory):
    return run(synthetic_data_dir, tmp_path_factory.mktemp("lora") / "run")


# ---------------------------------------------------------------------------------------------
# 1. What trains: the adapter and the connector; the base stays bit-identical.
# ---------------------------------------------------------------------------------------------
def test_only_adapter_and_connector_train(llava_run, tmp_path):
    trained = latest_weights(llava_run)
    start = models.load_model("tiny-llava")
    connector = {name for name, _ in start.connector_parameters()}
    adapters = {name for name in trained if ".lora_A.default." in name or ".lora_B.default." in name}
    assert set(trained) == connector | adapters  # nothing else is trainable
    layers = {name.split(".layers.")[1].split(".")[0] for name in adapters}
    assert layers == {"2", "3"}  # the last 2 of tiny-llava's 4 decoder layers (Sec. 3.1's N = 2)
    kinds = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapters}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(trained[name].abs().max() > 1e-4 for name in adapters if ".lora_B." in name)  # B left zero: it trained
    # The saved base: the connector trained, every other tensor exactly the starting model's.
    base = tmp_path / "base"  # final/ without its adapter
    shutil.copytree(llava_run / "final", base, ignore=shutil.ignore_patterns(*lora.ADAPTER_FILES))
    saved = models.load_model(str(base)).model.state_dict()
    initial = start.model.state_dict()
    assert saved.keys() == initial.keys()
    for name, value in initial.items():
        if name in connector:
            assert not torch.equal(saved[name], value), name
        else:
            assert torch.equal(saved[name], value), name


# ---------------------------------------------------------------------------------------------
# 2. The adapter loads onto the starting model; merged == unmerged; three formats.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generic_folder(tmp_path_factory):
    return hf_tiny.write("tiny-qwen2-vl", str(tmp_path_factory.mktemp("qwen") / "tiny-qwen2-vl"))


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-vila", "generic"])
def test_adapter_on_the_base_equals_the_merged_model(model, generic_folder, synthetic_data_dir, tmp_path):
    from peft import PeftModel

    model = generic_folder if model == "generic" else model
    adapter = run(synthetic_data_dir, tmp_path / "adapter", model=model) / "final"
    merged = run(synthetic_data_dir, tmp_path / "merged", model=model, merge_lora=True) / "final"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    if model == "tiny-vila":  # VILA's own three folders, in both
        assert all((folder / sub).is_dir() for folder in (adapter, merged) for sub in ("llm", "vision_tower",
                                                                                       "mm_projector"))
    start = models.load_model(model)
    unmerged = PeftModel.from_pretrained(start.model, str(adapter))  # the starting model + the adapter (+ connector)
    merged_model = models.load_model(str(merged))
    assert not any(".lora_" in name for name, _ in merged_model.model.named_parameters())
    expected = prompt_logits(merged_model.model, merged_model)
    assert torch.allclose(prompt_logits(unmerged, start), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(prompt_logits(models.load_model(model).model, start), expected, atol=1e-3)  # it trained
    loaded = models.load_model(str(adapter))  # models.load_model merges the adapter of final/
    assert not any(".lora_" in name for name, _ in loaded.model.named_parameters())
    assert torch.allclose(prompt_logits(loaded.model, loaded), expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# 3. Kill and --resume == uninterrupted, bit-exact; a changed LoRA setting is refused.
# ---------------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted(llava_run, synthetic_data_dir, tmp_path):
    settings = dict(epochs=2, lora_dropout=0.1)  # 4 steps; dropout draws random numbers, which resume restores
    straight = latest_weights(run(synthetic_data_dir, tmp_path / "straight", **settings))
    out = tmp_path / "resumed"
    assert train.main(config(synthetic_data_dir, out, stop_at_step=1, **settings)) == {"stopped_at_step": 1}
    record = json.loads((out / "run.json").read_text())["config"]
    assert (record["lora_rank"], record["lora_dropout"], record["lora_connector"]) == (4, 0.1, False)
    with pytest.raises(run_folder.RunFolderError, match="lora_rank: 4 at the start, 8 now"):
        run(synthetic_data_dir, out, resume=True, **{**settings, "lora_rank": 8})
    run(synthetic_data_dir, out, resume=True, **settings)
    resumed = latest_weights(out)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    straight_adapter = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    resumed_adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(resumed_adapter[k], straight_adapter[k]) for k in straight_adapter)


# ---------------------------------------------------------------------------------------------
# 4. Two gloo ranks on CPU: DDP, FSDP2 in fp32 and in bf16 (a unit then holds bf16 frozen and fp32 LoRA weights).
# ---------------------------------------------------------------------------------------------
TWO_RANK_RUNS = ((False, "fp32"), (True, "fp32"), (True, "bf16"))


def _two_rank_worker(rank, world, data_dir, out_root):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    save_final_model = train.save_final_model

    def capture(mllm, fsdp_units, folder, rank, **kwargs):  # what each rank holds at the end (FSDP2: gathered)
        weights = {n: train.full_tensor(p.detach()).clone() for n, p in mllm.model.named_parameters()
                   if p.requires_grad}
        torch.save(weights, Path(folder).parent / f"weights.rank{rank}.pt")
        return save_final_model(mllm, fsdp_units, folder, rank, **kwargs)

    train.save_final_model = capture
    for fsdp, precision in TWO_RANK_RUNS:
        out = Path(out_root) / f"fsdp{fsdp}-{precision}"
        train._train(config(data_dir, out, method="full", micro_batch_size=2, fsdp=fsdp, precision=precision), rank,
                     world, torch.device("cpu"))


def test_two_ranks_ddp_and_fsdp(synthetic_data_dir, tmp_path):
    run_on_gloo_ranks(_two_rank_worker, 2, str(synthetic_data_dir), str(tmp_path))
    # One rank, the same global batch as two micro-batches of 2 (accumulation 2).
    one = latest_weights(run(synthetic_data_dir, tmp_path / "one", method="full", micro_batch_size=2))
    for fsdp, precision in TWO_RANK_RUNS:
        out = tmp_path / f"fsdp{fsdp}-{precision}"
        rank0, rank1 = (torch.load(out / f"weights.rank{r}.pt") for r in range(2))
        assert rank0.keys() == rank1.keys() == one.keys() and any(".lora_B." in k for k in rank0)
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), (fsdp, precision)  # the ranks agree
        checkpoint = latest_weights(out)
        assert all(torch.equal(rank0[k], checkpoint[k]) for k in rank0)
        # Same samples per step, gradients averaged over ranks: the 1-rank run up to float summation order. (bf16's
        # rounding of the frozen weights is no summation order: AdamW's first steps, about lr in size whatever the
        # gradient's, take it up to ~lr; that run is checked for agreement and for training only.)
        if precision == "fp32":
            assert max((rank0[k] - one[k]).abs().max().item() for k in one) < 1e-5, fsdp
        assert all(rank0[k].abs().max() > 1e-4 for k in rank0 if ".lora_B." in k)  # B left zero: it trained
        adapter = load_file(str(out / "final" / "adapter_model.safetensors"))  # rank 0 wrote the gathered tensors
        for name in (k for k in rank0 if ".lora_" in k):
            assert torch.equal(adapter["base_model.model." + name.replace(".default.", ".")], rank0[name])


# ---------------------------------------------------------------------------------------------
# 5. Refusals, each with its reason.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (dict(method="l2"), "L2-Reg pulls"),
    (dict(method="grafting"), "Grafting penalises"),
    (dict(method="random-mask"), "masking elements of A and B"),
    (dict(method="magnitude-mask"), "carry no pre-trained magnitude"),
    (dict(method="spider"), "SPIDER weighs"),
    (dict(method="nrca", compare="full,l2"), "--method l2 with --lora-rank"),
    (dict(lora_rank=-1), "--lora-rank -1"),
    (dict(lora_rank=0, merge_lora=True), "need --lora-rank"),
    (dict(lora_rank=0, lora_targets="q_proj"), "need --lora-rank"),
    (dict(lora_dropout=1.0), "--lora-dropout 1.0"),
    (dict(lora_alpha=0.0), "--lora-alpha 0.0"),
    (dict(tune_last_layers=0), "adapts nothing"),
])
def test_refusals(overrides, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        config(tmp_path / "data", tmp_path / "run", **overrides)


def test_unknown_target_is_named():
    mllm = models.load_model("tiny-llava")
    with pytest.raises(ValueError, match=r"no linear layer named \['qproj'\]"):
        lora.target_modules(mllm, 2, "qproj")
    names = lora.target_modules(mllm, 1, "q_proj,v_proj", connector=True)
    assert names == ["model.language_model.layers.3.self_attn.q_proj", "model.language_model.layers.3.self_attn.v_proj",
                     "model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]


@pytest.mark.parametrize("method", ["nrca", "mi-consistency"])
def test_methods_that_work_with_lora(method, synthetic_data_dir, tmp_path):
    # NRCA also with activation checkpointing and the per-epoch evaluation (generation through the adapter).
    extra = dict(activation_checkpointing=True, eval_every_epoch=True, eval_limit=2, eval_max_new_tokens=4,
                 eval_noisy_final=False) if method == "nrca" else {}
    out = run(synthetic_data_dir, tmp_path / method, method=method, lora_connector=True, **extra)
    trained = latest_weights(out)
    assert trained and all(".lora_" in name for name in trained)  # --lora-connector: the connector has an adapter
    assert any("multi_modal_projector" in name for name in trained)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines if "loss" in r)
    assert any("eval" in r for r in lines) == (method == "nrca")


# ---------------------------------------------------------------------------------------------
# 6. evaluate.py: the adapter folder, the adapter alone and the merged folder give the same answers.
# ---------------------------------------------------------------------------------------------
def test_evaluate_reads_adapter_and_merged_folders(llava_run, synthetic_data_dir, tmp_path):
    merged = run(synthetic_data_dir, tmp_path / "merged", merge_lora=True)
    alone = tmp_path / "adapter-alone"  # the two peft files, no model: loaded onto base_model_name_or_path
    alone.mkdir()
    for name in lora.ADAPTER_FILES:
        shutil.copy(llava_run / "final" / name, alone / name)
    predictions = {}
    for name, folder in (("adapter", llava_run), ("merged", merged), ("alone", alone)):
        out = tmp_path / f"eval-{name}"
        evaluate.main([str(folder), "--data", str(synthetic_data_dir), "--out", str(out), "--limit", "2",
                       "--max-new-tokens", "4", "--no-text-match"])
        predictions[name] = [json.loads(line)["prediction"]
                             for line in (out / "predictions_choice.jsonl").read_text().splitlines()]
    assert predictions["adapter"] == predictions["merged"] == predictions["alone"] and predictions["adapter"]


# ---------------------------------------------------------------------------------------------
# 7. The planner: LoRA's trainable tensors, and less memory than partial fine-tuning.
# ---------------------------------------------------------------------------------------------
def test_planner_counts_lora():
    mllm = memory_plan.meta_model("tiny-llava")
    full = memory_plan.parameter_counts(mllm, 2)
    low = memory_plan.parameter_counts(mllm, 2, lora_rank=4)
    text = mllm.language_model.config
    H, I = text.hidden_size, text.intermediate_size
    kv = text.num_key_value_heads * (H // text.num_attention_heads)
    per_layer = 4 * ((H + H) + (H + kv) + (H + kv) + (H + H) + 2 * (H + I) + (I + H))  # r (in + out) per projection
    connector = sum(p.numel() for p in mllm.connector.parameters())
    assert low["trainable"] == connector + 2 * per_layer
    assert low["total"] == full["total"] + 2 * per_layer
    attention = memory_plan.parameter_counts(mllm, 2, lora_rank=4, lora_targets="q_proj,v_proj")  # --lora-targets
    assert attention["trainable"] == connector + 2 * 4 * ((H + H) + (H + kv))
    assert attention["lora_projections"] == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="qproj"):
        memory_plan.parameter_counts(mllm, 2, lora_rank=4, lora_targets="qproj")
    run = dict(method="nrca", micro_batch=2, bf16=False)
    partial = memory_plan.estimate(mllm, memory_plan.RunShape(**run))
    adapted = memory_plan.estimate(mllm, memory_plan.RunShape(**run, lora_rank=4))
    assert adapted["AdamW state (fp32)"] < partial["AdamW state (fp32)"]
    assert memory_plan.peak_bytes(adapted, False) < memory_plan.peak_bytes(partial, False)
    fewer = memory_plan.estimate(mllm, memory_plan.RunShape(**run, lora_rank=4, lora_targets="q_proj,v_proj"))
    assert memory_plan.peak_bytes(fewer, False) < memory_plan.peak_bytes(adapted, False)
