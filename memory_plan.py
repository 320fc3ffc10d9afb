"""Per-rank GPU memory of a fine-tuning run, planned from config.json alone, before launching it.

The paper fine-tunes LLaVA-1.5-7B on 8 x 24 GB cards (Sec. 4.1): connector + last 2 decoder layers trainable,
batch 16. Because the connector sits below every decoder layer, the backward pass runs through all of them,
so each rank keeps the activations of every layer; NRCA (Alg. 1) doubles the sequences (clean + noisy,
Eq. 2). This file adds up, per rank, what a step holds at its peak:

    frozen weights     load dtype (bf16 on GPU); with --fsdp the decoder layers and the vision-tower layers
                       are sharded over the ranks, embeddings / lm_head / norms stay whole on every rank
    trainable weights  fp32 master copies (train.py), gradients (fp32), AdamW's two moments (fp32);
                       with --fsdp sharded, with DDP plus DDP's gradient buckets (one more fp32 copy)
    activations        what autograd keeps for the backward pass: per token and decoder layer, the tensors
                       listed in `decoder_layer_bytes` (counted from transformers' Llama layer with SDPA
                       attention, no T x T score matrix) and the padded batch's (T x T) attention mask;
                       with activation checkpointing only each layer's input plus one layer recomputed
    loss head          ours (methods.py): logits only at answer rows, (N, V) plus their gradient and the
                       kernel's 3 floats per row; released: full (B, T, V) fp32 logits, log-softmax and
                       softmax kept for the backward pass, for each of the two forwards
    vision forward     the frozen tower keeps every layer's hidden state (`output_hidden_states`) while it
                       runs; that transient peak is compared with the decoder's

The model's structure comes from building it on the meta device (shapes, no storage), so a `--model` folder
needs only its config.json (a transformers LLaVA folder, or VILA1.5's config.json with llm/ and vision_tower/
config.json files or the top-level llm_cfg / vision_tower_cfg). No weight file is opened.

With --lora-rank R (lora.py) the last N layers are frozen weights in the load dtype and the trainable tensors
are the connector and R (in + out) per adapted linear layer of those layers (every one, or those named by
--lora-targets); `--plan` prints the plan of partial fine-tuning beside it.

Not counted: the CUDA context and allocator fragmentation (about 0.5-1 GB on a real GPU; `fits` keeps
`RESERVE_GIB` free for them), optimizer/method state of counterparts other than Full FT and NRCA, memory
of the data loader, and --lora-dropout's kept masks. bench/bench_step.py prints this estimate beside each
measured peak.

Run:
    python train.py --plan --gpu-memory 24 --plan-ranks 8 --preset llava --model /ckpt/llava-1.5-7b-hf --fsdp
    python memory_plan.py        # the README's tables: LLaVA-1.5-7B and VILA1.5-3B, 8 x 24 GB and 1 x 80 GB
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import torch

import lora
import models

GIB = 2**30
RESERVE_GIB = 1.0  # left free for the CUDA context and allocator fragmentation when deciding "fits"


@dataclass
class RunShape:
    """What the plan depends on besides the model."""

    method: str = "nrca"  # full | nrca
    nrca_impl: str = "fused"  # fused (ours) | released
    micro_batch: int = 16  # samples per forward on one rank
    text_tokens: int = 80  # prompt + answer tokens per sample, besides the image tokens
    answer_tokens: float = 24  # logit rows (answer tokens) per sample, mean (default: every sample a caption)
    ranks: int = 1
    fsdp: bool = False
    activation_checkpointing: bool = False
    bf16: bool = True  # bf16 weights + autocast (GPU); False: fp32 everywhere (CPU)
    tune_last_layers: int = 2
    lora_rank: int = 0  # > 0: those layers frozen, LoRA of this rank on their linear layers (lora.py)
    lora_connector: bool = False  # LoRA on the connector's linear layers instead of training it in full
    lora_targets: str = ""  # --lora-targets: names of the adapted linear layers ('' = every one of those layers)


# ---------------------------------------------------------------------------------------------
# The model's structure without its weights.
# ---------------------------------------------------------------------------------------------
def meta_model(name_or_path: str) -> models.MLLM:
    """An MLLM whose parameters live on the meta device (shapes only) from a folder's config.json files."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    if name_or_path in models.BUILT_IN:
        mllm = models.load_model(name_or_path)  # random weights built in memory, nothing read from disk
        mllm.model.to("meta")
        return mllm
    config_path = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"memory plan: {config_path} does not exist (the planner reads only config.json)")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("model_type") == "llava":
        llava = LlavaConfig(**config)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(llava)
        return models.MLLM(model, None, None, "llava", models._llava_num_image_tokens(llava),
                           llava.image_token_id)
    if "llm_cfg" in config or os.path.isdir(os.path.join(name_or_path, "llm")):
        llm_config = _sub_config(name_or_path, config, "llm", "llm_cfg")
        vision_config = _sub_config(name_or_path, config, "vision_tower", "vision_tower_cfg")
        llm_config.pop("model_type", None)
        vision_config.pop("model_type", None)
        with torch.device("meta"):
            llm = LlamaForCausalLM(LlamaConfig(**llm_config))
            vision = SiglipVisionModel(SiglipVisionConfig(**vision_config))
            projector = models.DownSampleProjector(vision.config.hidden_size, llm.config.hidden_size)
        model = models.VilaForConditionalGeneration(llm, vision, projector, image_token_id=-1)
        return models.MLLM(model, None, None, "vila", models._vila_num_image_tokens(vision.config), -1)
    raise ValueError(f"memory plan: {config_path} is neither a LLaVA config (model_type 'llava') nor a VILA1.5 "
                     "config (llm_cfg, or an llm/ subfolder); --plan models those two architectures only")


def _sub_config(folder: str, config: dict, sub: str, key: str) -> dict:
    path = os.path.join(folder, sub, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if isinstance(config.get(key), dict):
        return dict(config[key])
    raise ValueError(f"memory plan: VILA folder {folder} has neither {sub}/config.json nor '{key}' in config.json")


# ---------------------------------------------------------------------------------------------
# Bytes.
# ---------------------------------------------------------------------------------------------
def parameter_counts(mllm: models.MLLM, tune_last_layers: int, lora_rank: int = 0,
                     lora_connector: bool = False, lora_targets: str = "") -> dict:
    """Parameter counts: trainable (connector + last N layers), frozen ones that FSDP shards (decoder layers,
    vision-tower layers), frozen ones every rank keeps whole (embeddings, lm_head, norms), the largest unit.
    With `lora_rank` R the last N layers are frozen (sharded) and trainable are the connector and R (in + out)
    per adapted linear layer of those layers (`lora_layer`: one layer's; `lora_targets` as lora.target_modules
    reads --lora-targets), or of the connector with `lora_connector`; `lora_projections`: the own names of one
    layer's adapted linear layers."""
    layers = mllm.decoder_layers
    n_trainable_layers = len(layers) if tune_last_layers < 0 else tune_last_layers
    count = lambda module: sum(p.numel() for p in module.parameters())
    adapted = set(lora.target_modules(mllm, n_trainable_layers, lora_targets, lora_connector)) if lora_rank else set()
    path = {id(module): name for name, module in mllm.model.named_modules()}
    adapter = lambda module: sum(lora_rank * (m.in_features + m.out_features) for m in module.modules()
                                 if path[id(m)] in adapted)
    trainable_layers = list(layers)[len(layers) - n_trainable_layers:]
    frozen_layers = list(layers)[:len(layers) - n_trainable_layers]
    vision_layers = _vision_layers(mllm)
    sharded = sum(count(layer) for layer in frozen_layers) + sum(count(layer) for layer in vision_layers)
    if lora_rank:
        adapters = sum(adapter(layer) for layer in trainable_layers)
        adapters += adapter(mllm.connector) if lora_connector else 0
        trainable = adapters + (0 if lora_connector else count(mllm.connector))
        sharded += sum(count(layer) for layer in trainable_layers)
    else:
        adapters = 0
        trainable = count(mllm.connector) + sum(count(layer) for layer in trainable_layers)
    total = count(mllm.model) + adapters
    units = [count(layer) for layer in layers] + [count(layer) for layer in vision_layers]
    return {"trainable": trainable, "frozen_sharded": sharded, "frozen_whole": total - trainable - sharded,
            "total": total, "largest_unit": max(units), "trainable_layer": count(layers[-1]),
            "lora_layer": adapter(layers[-1]) if lora_rank else 0,
            "lora_projections": sorted(name.rsplit(".", 1)[-1] for name, module in layers[-1].named_modules()
                                       if path[id(module)] in adapted),
            "n_layers": len(layers), "n_trainable_layers": n_trainable_layers}


def _vision_layers(mllm: models.MLLM):
    tower = mllm.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers  # older transformers nest a vision_model


LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_layer_bytes(config, tokens: int, bf16: bool, trainable: bool, lora_rank: int = 0,
                        lora_weights: int = 0, lora_projections=LLAMA_PROJECTIONS) -> int:
    """Bytes autograd keeps for one Llama decoder layer over `tokens` tokens (transformers' LlamaDecoderLayer,
    SDPA attention). a = 2 (bf16 autocast) or 4 (fp32) bytes per activation element.

    frozen layer (its input needs a gradient, its weights do not; a frozen Linear keeps no input):
      the two RMSNorms keep their input in fp32 (4H + 4H bytes) and 1/rms (2 x 4 bytes);
      attention keeps q, k, v after RoPE and its output ((2H + 2 Hkv) a) and a log-sum-exp per head (4 bytes);
      the MLP keeps gate, silu(gate) and up (3 I a).
    trainable layer, in addition: each RMSNorm's normalised output and the Linear's input (2 x 2H a), the
      down projection's input (I a) and, under autocast, bf16 copies of its fp32 weights (2 bytes a weight).
    LoRA layer (`lora_rank` R > 0, `trainable`, adapters on `lora_projections`): the adapted Linears' inputs,
      which A's gradient needs (dropout 0), each projection's A x (R a; B's gradient needs it) and bf16 copies
      of the `lora_weights` adapter weights only (the frozen weights are bf16 already). In fp32 the inputs are
      shared: H a after the first norm if q, k or v is adapted, H a after the second if gate or up is, I a if
      down is (o's input, the attention output, is kept anyway). Under bf16 autocast each adapted projection
      keeps a copy of its own (peft casts the input to the fp32 adapter's dtype, autocast back to bf16): in
      features x a each. With --lora-dropout > 0 each projection keeps its own dropped input as well (not
      counted).
    """
    H, I = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = (config.num_key_value_heads or heads) * (getattr(config, "head_dim", None) or H // heads)
    a = 2 if bf16 else 4
    per_token = 8 * H + 8 + (2 * H + 2 * kv) * a + 4 * heads + 3 * I * a
    adapted = set(lora_projections)
    if trainable and not lora_rank:
        per_token += 4 * H * a + I * a
    if trainable and lora_rank and bf16:
        per_token += (H * len(adapted - {"down_proj"}) + I * ("down_proj" in adapted) + len(adapted) * lora_rank) * a
    if trainable and lora_rank and not bf16:
        per_token += (H * bool(adapted & {"q_proj", "k_proj", "v_proj"}) + H * bool(adapted & {"gate_proj", "up_proj"})
                      + I * ("down_proj" in adapted) + len(adapted) * lora_rank) * a
    weights = 0
    if trainable and bf16:
        weights = 2 * (lora_weights if lora_rank else 2 * H * H + 2 * H * kv + 3 * H * I)
    return tokens * per_token + weights


def estimate(mllm: models.MLLM, run: RunShape) -> dict:
    """Per-rank bytes of each part at the step's peak, with and without activation checkpointing."""
    if run.method not in ("full", "nrca"):
        raise ValueError(f"memory plan: --method {run.method!r}: the planner covers full and nrca")
    text = mllm.language_model.config
    counts = parameter_counts(mllm, run.tune_last_layers, run.lora_rank, run.lora_connector, run.lora_targets)
    ranks = run.ranks
    shard = ranks if (run.fsdp and ranks > 1) else 1
    weight_bytes = 2 if run.bf16 else 4
    a = 2 if run.bf16 else 4
    parts = {}
    # Weights: frozen in the load dtype; FSDP shards decoder + vision layers; all-gather buffers hold
    # one unit being used and the next one prefetched.
    parts["frozen weights"] = weight_bytes * (counts["frozen_sharded"] / shard + counts["frozen_whole"])
    if shard > 1:
        parts["frozen weights"] += 2 * weight_bytes * counts["largest_unit"]
    parts["trainable weights (fp32)"] = 4 * counts["trainable"] / shard
    parts["gradients (fp32)"] = 4 * counts["trainable"] / shard * (2 if (ranks > 1 and not run.fsdp) else 1)
    parts["AdamW state (fp32)"] = 8 * counts["trainable"] / shard

    # Sequences in flight: NRCA runs clean + noisy (one forward of 2B, or the released two forwards of B).
    branches = 2 if run.method == "nrca" else 1
    sequences = branches * run.micro_batch
    tokens = sequences * (mllm.num_image_tokens + run.text_tokens)
    n_frozen = counts["n_layers"] - counts["n_trainable_layers"]
    frozen_layer = decoder_layer_bytes(text, tokens, run.bf16, trainable=False)
    trainable_layer = decoder_layer_bytes(text, tokens, run.bf16, trainable=True, lora_rank=run.lora_rank,
                                          lora_weights=counts["lora_layer"],
                                          lora_projections=counts["lora_projections"])
    connector = _connector_bytes(mllm, sequences, a)
    final_norm = tokens * (4 * text.hidden_size + 4)
    # A padded batch gets a (S, 1, T, T) attention mask, which SDPA keeps per layer in the activation dtype
    # (measured on CPU: one copy per layer; a batch without padding gets none, the plan assumes padding).
    sequence = mllm.num_image_tokens + run.text_tokens
    mask = sequences * sequence * sequence * a
    activations = (n_frozen * frozen_layer + counts["n_trainable_layers"] * trainable_layer
                   + counts["n_layers"] * mask + connector + final_norm)
    # Checkpointing: each layer keeps only its input (a bytes per element; the mask and fp32 cos/sin are
    # shared), and the backward pass recomputes one layer at a time (the largest, a trainable one).
    checkpointed = (counts["n_layers"] * tokens * text.hidden_size * a + max(trainable_layer, frozen_layer)
                    + 2 * mask + connector + final_norm)
    parts["activations"] = activations
    parts["activations, checkpointed"] = checkpointed
    parts["loss head"] = _loss_head_bytes(run, text, sequences, tokens, a)
    parts["vision forward (transient)"] = _vision_forward_bytes(mllm, sequences, a)
    return parts


def _connector_bytes(mllm: models.MLLM, sequences: int, a: int) -> int:
    """LLaVA: the MLP keeps its input and GELU's input and output; VILA: LayerNorm's fp32 input (4C), the
    Linear's input (4C a), GELU's input and output."""
    vision = mllm.vision_tower.config
    H, C = mllm.language_model.config.hidden_size, vision.hidden_size
    if mllm.kind == "llava":
        per_token = C * a + 2 * H * a
        tokens = sequences * mllm.num_image_tokens
    else:
        per_token = 4 * C * 4 + 4 * C * a + 2 * H * a
        tokens = sequences * mllm.num_image_tokens
    return tokens * per_token


def _loss_head_bytes(run: RunShape, text, sequences: int, tokens: int, a: int) -> int:
    V = text.vocab_size
    if run.method == "full" or run.nrca_impl == "fused":
        rows = int(sequences * run.answer_tokens)
        # answer-row logits (kept by the kernel) + their gradient in the backward pass + 3 fp32 per row
        return rows * (2 * V * a + 12)
    # Released: each forward makes (B, T, V) fp32 logits (.float()) and keeps F.cross_entropy's log-softmax and
    # the softmax for the backward pass (4 + 4 bytes). Peak at the end of the second forward: the first one's
    # kept tensors, the second one's logits and its kept tensors (8 + 4 + 8 bytes an element; measured on CPU,
    # the backward pass frees as it goes and stays below).
    per_branch = tokens // 2 * V
    return per_branch * (8 + 4 + 8)


def _vision_forward_bytes(mllm: models.MLLM, sequences: int, a: int) -> int:
    """The frozen tower runs without autograd state but keeps every hidden state (output_hidden_states)."""
    vision = mllm.vision_tower.config
    grid = (vision.image_size // vision.patch_size) ** 2 + (1 if mllm.kind == "llava" else 0)
    per_layer = sequences * grid * vision.hidden_size * a
    working = sequences * grid * (vision.intermediate_size + 4 * vision.hidden_size) * a
    return (vision.num_hidden_layers + 1) * per_layer + working


def peak_bytes(parts: dict, checkpointing: bool) -> float:
    """Static parts + the larger of the vision forward and the decoder's activations with the loss head."""
    static = sum(v for k, v in parts.items() if not k.startswith(("activations", "loss head", "vision")))
    dynamic = parts["activations, checkpointed" if checkpointing else "activations"] + parts["loss head"]
    return static + max(dynamic, parts["vision forward (transient)"])


def largest_micro_batch(mllm, run: RunShape, gpu_memory_gib: float, global_batch: int) -> int:
    """The largest micro-batch (dividing global batch / ranks) whose plan fits; 0 if none."""
    per_rank = global_batch // run.ranks
    best = 0
    for b in range(1, per_rank + 1):
        if per_rank % b == 0:
            parts = estimate(mllm, _replace(run, micro_batch=b))
            if peak_bytes(parts, run.activation_checkpointing) / GIB + RESERVE_GIB <= gpu_memory_gib:
                best = b
    return best


def _replace(run: RunShape, **changes) -> RunShape:
    import dataclasses

    return dataclasses.replace(run, **changes)


def format_plan(mllm, run: RunShape, gpu_memory_gib: float, global_batch: int, title: str = "") -> str:
    """A Markdown table: each part without and with activation checkpointing, the peak, fits, largest micro-batch."""
    parts = estimate(mllm, run)
    lines = [title] if title else []
    lines += ["| per rank (GiB) | without checkpointing | with checkpointing |", "|---|---:|---:|"]
    for key, value in parts.items():
        if key == "activations":
            lines.append(f"| activations | {value / GIB:.2f} | {parts['activations, checkpointed'] / GIB:.2f} |")
        elif key != "activations, checkpointed":
            lines.append(f"| {key} | {value / GIB:.2f} | {value / GIB:.2f} |")
    peaks = [peak_bytes(parts, c) / GIB for c in (False, True)]
    lines.append(f"| **peak** | **{peaks[0]:.2f}** | **{peaks[1]:.2f}** |")
    fits = [("yes" if p + RESERVE_GIB <= gpu_memory_gib else "no") for p in peaks]
    lines.append(f"| fits in {gpu_memory_gib:g} GB with {RESERVE_GIB:g} GiB reserve | {fits[0]} | {fits[1]} |")
    largest = [largest_micro_batch(mllm, _replace(run, activation_checkpointing=c), gpu_memory_gib, global_batch)
               for c in (False, True)]
    lines.append(f"| largest micro-batch that fits (of {global_batch // run.ranks} per rank) | "
                 f"{largest[0] or 'none'} | {largest[1] or 'none'} |")
    return "\n".join(lines)


def print_plan(cfg, gpu_memory_gib: float, ranks: int) -> dict:
    """`python train.py --plan`: the plan of the configured run; returns the parts (bytes) and peaks."""
    mllm = meta_model(cfg.model)
    bf16 = cfg.precision == "bf16" or cfg.precision == "auto"  # the plan is for a GPU
    if ranks < 1 or cfg.batch_size % (cfg.micro_batch_size * ranks):
        raise ValueError(f"--plan: --batch-size {cfg.batch_size} is not a multiple of --micro-batch-size "
                         f"{cfg.micro_batch_size} x {ranks} ranks (--plan-ranks)")
    run = RunShape(method=cfg.method, nrca_impl=cfg.nrca_impl, micro_batch=cfg.micro_batch_size,
                   text_tokens=cfg.plan_text_tokens, answer_tokens=min(cfg.plan_answer_tokens, cfg.plan_text_tokens),
                   ranks=ranks, fsdp=cfg.fsdp, activation_checkpointing=cfg.activation_checkpointing, bf16=bf16,
                   tune_last_layers=cfg.tune_last_layers, lora_rank=cfg.lora_rank, lora_connector=cfg.lora_connector,
                   lora_targets=cfg.lora_targets)
    counts = parameter_counts(mllm, cfg.tune_last_layers, cfg.lora_rank, cfg.lora_connector, cfg.lora_targets)
    adapted = (f", LoRA rank {cfg.lora_rank} on the last {cfg.tune_last_layers} layers"
               + (" and the connector" if cfg.lora_connector else "")) if cfg.lora_rank else ""
    title = (f"{cfg.method} ({cfg.nrca_impl if cfg.method == 'nrca' else 'plain CE'}{adapted}) on {cfg.model}: "
             f"{counts['total'] / 1e9:.2f}B parameters, {counts['trainable'] / 1e6:.1f}M trainable; {ranks} rank(s) x "
             f"{gpu_memory_gib:g} GB, {'FSDP2' if cfg.fsdp and ranks > 1 else 'DDP' if ranks > 1 else 'one GPU'}, "
             f"micro-batch {cfg.micro_batch_size} of {mllm.num_image_tokens} + {run.text_tokens} tokens, "
             f"{'bf16' if bf16 else 'fp32'}; run with checkpointing: {cfg.activation_checkpointing}\n")
    print(format_plan(mllm, run, gpu_memory_gib, cfg.batch_size, title))
    parts = estimate(mllm, run)
    if cfg.lora_rank:  # beside it: the same run with those layers (and the connector) trained in full, Sec. 3.1
        partial = estimate(mllm, _replace(run, lora_rank=0, lora_connector=False, lora_targets=""))
        print(f"\nthe same run, partial fine-tuning (no --lora-rank): peak {peak_bytes(partial, False) / GIB:.2f} GiB "
              f"without checkpointing, {peak_bytes(partial, True) / GIB:.2f} GiB with; LoRA: "
              f"{peak_bytes(parts, False) / GIB:.2f} / {peak_bytes(parts, True) / GIB:.2f} GiB")
    return {"parts": parts, "peak": peak_bytes(parts, cfg.activation_checkpointing)}


# ---------------------------------------------------------------------------------------------
# The paper's two models as config-only folders (README tables).
# ---------------------------------------------------------------------------------------------
# llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 + 2-layer MLP + Vicuna-7B (vocab 32064 with <image>, <pad>).
LLAVA_15_7B = {"model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
               "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
               "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                               "vocab_size": 32064, "max_position_embeddings": 4096},
               "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                                 "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
                                 "patch_size": 14, "projection_dim": 768}}
# Efficient-Large-Model/VILA1.5-3b: SigLIP-so400m-384 + mlp_downsample + Sheared-LLaMA-2.7B.
VILA15_3B = {"llm_cfg": {"hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 32,
                         "num_attention_heads": 20, "num_key_value_heads": 20, "vocab_size": 32000},
             "vision_tower_cfg": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                  "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
             "mm_projector_cfg": {"mm_projector_type": "mlp_downsample"}}


def write_config_folder(folder: str, config: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder


def readme_tables() -> str:
    """LLaVA-1.5-7B and VILA1.5-3B at the paper's settings (batch 16, last 2 layers + connector, bf16) on
    8 x 24 GB (FSDP2, micro-batch 2) and 1 x 80 GB (micro-batch 16): the peak of each method, then NRCA's parts."""
    settings = ((8, 24, 2), (1, 80, 16))
    methods = (("Full FT", "full", "fused"), ("NRCA (ours)", "nrca", "fused"), ("NRCA (released)", "nrca", "released"))
    summary = ["| model | GPUs | micro-batch | " + " | ".join(f"{m} peak, without / with checkpointing"
                                                             for m, _, _ in methods) + " |",
               "|---|---|---:|" + "---:|" * len(methods)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in (("LLaVA-1.5-7B", LLAVA_15_7B), ("VILA1.5-3B", VILA15_3B)):
            mllm = meta_model(write_config_folder(os.path.join(tmp, name), config))
            for ranks, gib, micro in settings:
                cells = []
                for _, method, impl in methods:
                    parts = estimate(mllm, RunShape(method=method, nrca_impl=impl, micro_batch=micro, ranks=ranks,
                                                    fsdp=ranks > 1))
                    peaks = [peak_bytes(parts, c) / GIB for c in (False, True)]
                    cells.append(" / ".join(f"{p:.1f} GiB" + ("" if p + RESERVE_GIB <= gib else " (no)")
                                            for p in peaks))
                summary.append(f"| {name} | {ranks} x {gib} GB | {micro} | " + " | ".join(cells) + " |")
        out.append("\n".join(summary) + "\n\n(no): does not fit with the 1 GiB reserve.")
        for name, config in (("LLaVA-1.5-7B", LLAVA_15_7B), ("VILA1.5-3B", VILA15_3B)):
            mllm = meta_model(write_config_folder(os.path.join(tmp, name), config))
            for ranks, gib, micro in settings:
                run = RunShape(method="nrca", micro_batch=micro, ranks=ranks, fsdp=ranks > 1)
                title = (f"**{name}, NRCA (ours), {ranks} x {gib} GB{', --fsdp' if ranks > 1 else ''}, "
                         f"micro-batch {micro}** ({mllm.num_image_tokens} image + {run.text_tokens} text tokens)\n")
                out.append(format_plan(mllm, run, gib, 16, title))
    return "\n\n".join(out)


if __name__ == "__main__":
    print(readme_tables())
