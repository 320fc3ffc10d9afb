"""Tests for memory_plan.py and `train.py --plan`.

Covered: parameter and byte counts on tiny LLaVA / VILA configs against a hand count; the per-layer activation
formula against the tensors autograd really keeps for transformers' Llama layer; `--plan` runs on folders
that hold only config.json (LLaVA and VILA's three-folder layout) with every weight loader made to raise;
FSDP divides the sharded bytes by the ranks; checkpointing shrinks activations; the largest micro-batch.

    python -m pytest -q tests/test_memory_plan.py
"""

import json

import pytest
import safetensors.torch
import torch
import transformers
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

import memory_plan
import models
import train

H, I, V = 64, 128, 1000  # tiny text model (models.TINY_TEXT); V is about the tiny tokenizer's size
C, IC, P, S = 32, 64, 8, 48  # tiny CLIP: hidden, MLP, patch, image side


def llava_folder(tmp_path):
    """A config-only LLaVA folder with tiny-llava's architecture."""
    config = models.load_model("tiny-llava").model.config.to_dict()
    return memory_plan.write_config_folder(str(tmp_path / "llava"), config), config


def vila_folder(tmp_path, top_level_only=False):
    """VILA's layout with config files only: config.json + llm/, vision_tower/, mm_projector/ config.json."""
    mllm = models.load_model("tiny-vila")
    llm, vision = mllm.model.llm.config.to_dict(), mllm.model.vision_tower.config.to_dict()
    root = tmp_path / "vila"
    if top_level_only:
        memory_plan.write_config_folder(str(root), {"llm_cfg": llm, "vision_tower_cfg": vision})
    else:
        memory_plan.write_config_folder(str(root), {"architectures": ["LlavaLlamaModel"]})
        memory_plan.write_config_folder(str(root / "llm"), llm)
        memory_plan.write_config_folder(str(root / "vision_tower"), vision)
        memory_plan.write_config_folder(str(root / "mm_projector"), {"mm_projector_type": "mlp_downsample"})
    return str(root), mllm


def test_parameter_counts_match_a_hand_count(tmp_path):
    folder, config = llava_folder(tmp_path)
    vocab = config["text_config"]["vocab_size"]
    counts = memory_plan.parameter_counts(memory_plan.meta_model(folder), tune_last_layers=2)
    # Llama layer: q, k, v, o (H x H, no bias) + gate, up, down (H x I) + 2 RMSNorm weights.
    layer = 4 * H * H + 3 * H * I + 2 * H  # 16384 + 24576 + 128 = 41088
    # CLIP layer: 4 attention Linears with bias, 2 LayerNorms (weight + bias), fc1/fc2 with bias.
    vision_layer = 4 * (C * C + C) + 2 * 2 * C + (C * IC + IC) + (IC * C + C)  # 4224 + 128 + 2112 + 2080 = 8544
    grid = (S // P) ** 2  # 36 patches + 1 class token
    vision_rest = 3 * P * P * C + C + (grid + 1) * C + 2 * 2 * C  # patch conv, class, positions, 2 LayerNorms
    connector = (C * H + H) + (H * H + H)  # 2-layer MLP projector
    assert counts["trainable"] == connector + 2 * layer
    assert counts["frozen_sharded"] == 2 * layer + 2 * vision_layer
    assert counts["frozen_whole"] == 2 * vocab * H + H + vision_rest  # embed_tokens, lm_head, final norm
    assert counts["total"] == sum(p.numel() for p in models.load_model("tiny-llava").model.parameters())
    assert counts["largest_unit"] == layer


def test_bytes_follow_the_counts_and_fsdp_divides_the_sharded_part(tmp_path):
    folder, _ = llava_folder(tmp_path)
    mllm = memory_plan.meta_model(folder)
    counts = memory_plan.parameter_counts(mllm, 2)
    one = memory_plan.estimate(mllm, memory_plan.RunShape(ranks=1))
    assert one["frozen weights"] == 2 * (counts["frozen_sharded"] + counts["frozen_whole"])  # bf16
    assert one["trainable weights (fp32)"] == 4 * counts["trainable"]
    assert one["gradients (fp32)"] == 4 * counts["trainable"]
    assert one["AdamW state (fp32)"] == 8 * counts["trainable"]
    ddp = memory_plan.estimate(mllm, memory_plan.RunShape(ranks=2))
    assert ddp["gradients (fp32)"] == 8 * counts["trainable"]  # + DDP's gradient buckets
    fsdp = memory_plan.estimate(mllm, memory_plan.RunShape(ranks=2, fsdp=True))
    assert fsdp["frozen weights"] == 2 * (counts["frozen_sharded"] / 2 + counts["frozen_whole"]
                                          + 2 * counts["largest_unit"])  # + gathered unit and prefetched one
    assert fsdp["AdamW state (fp32)"] == 4 * counts["trainable"]
    assert fsdp["activations"] == one["activations"]  # per rank: the micro-batch decides, not the ranks
    full = memory_plan.estimate(mllm, memory_plan.RunShape(method="full", ranks=1))
    assert one["activations"] > 1.9 * full["activations"] - 1e3  # NRCA: 2B sequences
    assert one["activations, checkpointed"] < 0.5 * one["activations"]


def _saved_bytes(layer_config, tokens_per_sequence, bf16, trainable, lora_targets=None, lora_rank=4):
    """What autograd keeps for one LlamaDecoderLayer (inputs that need a gradient), parameters excluded. With
    `lora_targets` (a list of projection names) the layer is frozen and those projections get a peft LoRA of
    rank `lora_rank`, as lora.add_adapters and train.py set it up (adapter in fp32, dropout 0)."""
    torch.manual_seed(0)
    layer_config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(layer_config, 0)
    if bf16 and (not trainable or lora_targets):
        layer = layer.to(torch.bfloat16)  # frozen weights are loaded in bf16, trainable ones are fp32 masters
    layer.requires_grad_(trainable and not lora_targets)
    if lora_targets:
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                           target_modules=lora_targets), layer)
        for name, p in layer.named_parameters():
            if ".lora_" in name:
                p.data = p.data.float()  # train.py's fp32 masters for what trains
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    x = torch.randn(2, tokens_per_sequence, layer_config.hidden_size, requires_grad=True)
    position_ids = torch.arange(tokens_per_sequence)[None]
    cos_sin = LlamaRotaryEmbedding(layer_config)(x, position_ids)
    shared = {t.untyped_storage().data_ptr() for t in cos_sin}  # computed once per forward, not per layer
    kept = {}

    def pack(t):
        pointer = t.untyped_storage().data_ptr()
        if pointer not in params and pointer not in shared:
            kept[pointer] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = x.to(torch.bfloat16) if bf16 else x  # the previous layer's output dtype
        layer(hidden, position_embeddings=cos_sin, position_ids=position_ids)
    return sum(kept.values())


@pytest.mark.parametrize("bf16, trainable, tolerance", [
    (False, False, 0.0), (False, True, 0.0), (True, False, 0.0),
    (True, True, 0.1),  # autocast keeps a few more bf16 copies than the formula lists (within 10 %)
])
def test_decoder_layer_formula_matches_what_autograd_keeps(bf16, trainable, tolerance):
    layer_config = LlamaConfig(hidden_size=128, intermediate_size=344, num_attention_heads=2, num_key_value_heads=2)
    tokens = 96
    measured = _saved_bytes(layer_config, tokens, bf16, trainable)
    planned = memory_plan.decoder_layer_bytes(layer_config, 2 * tokens, bf16, trainable)
    assert abs(planned - measured) <= tolerance * measured, (planned, measured)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("targets", [list(memory_plan.LLAMA_PROJECTIONS), ["q_proj", "v_proj"], ["o_proj"],
                                     ["k_proj"], ["gate_proj", "up_proj"], ["down_proj"]], ids=",".join)
def test_lora_layer_formula_matches_what_autograd_keeps(bf16, targets):
    """--lora-targets: the kept inputs and A x of exactly the adapted projections (fp32 shares an input among
    q, k and v; under bf16 autocast each adapted projection keeps a copy of its own)."""
    layer_config = LlamaConfig(hidden_size=128, intermediate_size=344, num_attention_heads=2, num_key_value_heads=2)
    tokens, rank = 96, 4
    measured = _saved_bytes(layer_config, tokens, bf16, True, lora_targets=targets, lora_rank=rank)
    linears = {name.rsplit(".", 1)[-1]: module for name, module in LlamaDecoderLayer(layer_config, 0).named_modules()
               if isinstance(module, torch.nn.Linear)}
    adapter_weights = sum(rank * (linears[name].in_features + linears[name].out_features) for name in targets)
    planned = memory_plan.decoder_layer_bytes(layer_config, 2 * tokens, bf16, True, lora_rank=rank,
                                              lora_weights=adapter_weights, lora_projections=targets)
    assert planned == measured


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Every way of reading weights raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("the planner tried to load weights")

    for cls in (transformers.LlavaForConditionalGeneration, transformers.LlamaForCausalLM,
                transformers.SiglipVisionModel, transformers.CLIPVisionModel):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(models, "load_file", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("layout", ["llava", "vila", "vila-top-level"])
def test_plan_runs_on_config_only_folders_and_loads_no_weights(layout, tmp_path, capsys, request):
    if layout == "llava":
        folder, _ = llava_folder(tmp_path)
        expected = sum(p.numel() for p in models.load_model("tiny-llava").model.parameters())
    else:
        folder, mllm = vila_folder(tmp_path, top_level_only=layout == "vila-top-level")
        expected = sum(p.numel() for p in mllm.model.parameters())
    request.getfixturevalue("no_weight_loading")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == \
        sorted(p.name for p in tmp_path.rglob("config.json"))  # nothing but config files
    result = train.main(train.parse_config(["--plan", "--model", folder, "--gpu-memory", "24", "--plan-ranks", "8",
                                            "--fsdp", "--micro-batch-size", "2", "--preset", "llava"]))
    printed = capsys.readouterr().out
    assert f"{expected / 1e9:.2f}B parameters" in printed and "8 rank(s) x 24 GB, FSDP2" in printed
    assert "| activations |" in printed and "| **peak** |" in printed and "largest micro-batch" in printed
    assert result["peak"] > 0 and result["parts"]["activations"] > result["parts"]["activations, checkpointed"]


def test_plan_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        memory_plan.meta_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="neither a LLaVA config"):
        memory_plan.meta_model(str(tmp_path))


def test_fits_and_largest_micro_batch(tmp_path):
    folder, _ = llava_folder(tmp_path)
    mllm = memory_plan.meta_model(folder)
    run = memory_plan.RunShape(micro_batch=1, ranks=1)
    assert memory_plan.largest_micro_batch(mllm, run, gpu_memory_gib=1000, global_batch=16) == 16
    assert memory_plan.largest_micro_batch(mllm, run, gpu_memory_gib=0.5, global_batch=16) == 0  # below the reserve
    peak_4 = memory_plan.peak_bytes(memory_plan.estimate(mllm, memory_plan.RunShape(micro_batch=4)), False)
    peak_8 = memory_plan.peak_bytes(memory_plan.estimate(mllm, memory_plan.RunShape(micro_batch=8)), False)
    budget = (peak_4 + peak_8) / 2 / 2**30 + memory_plan.RESERVE_GIB  # between micro-batch 4 and 8
    assert memory_plan.largest_micro_batch(mllm, run, gpu_memory_gib=budget, global_batch=16) == 4
    with pytest.raises(ValueError, match="covers full and nrca"):
        memory_plan.estimate(mllm, memory_plan.RunShape(method="spider"))
