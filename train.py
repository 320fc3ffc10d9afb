"""Fine-tune an MLLM on a caption + multiple-choice mix with NRCA or a counterpart: LLaVA-1.5, VILA1.5 or any
transformers image-text-to-text folder (models.load_model picks the adapter; every method runs on every model
but for the exceptions in the README's "Models and methods").

Implements the training procedure of paper Sec. 4.1 and Algorithm 1: connector + last N decoder layers
trainable, AdamW with per-module learning rates, cosine schedule with warm-up, batch 16, E epochs.
The loss of one step comes from methods.py (Full FT, NRCA) or a counterpart file; everything else
(data sharding, distribution, checkpoints, logging, evaluation) is here; what may write into the run
folder and whether --resume continues the same run is in run_folder.py.

Run:
    python train.py                                   # embedded default: the testbed world, a tiny LLaVA
                                                      # pre-trained on it, NRCA beside Full FT (2.5 min, 2 cores)
    python train.py --preset llava --model /ckpt/llava-1.5-7b-hf \\
        --train caption:flickr30k=/data/flickr30k.json --train choice:scienceqa=/data/sqa.json \\
        --image-folder /data/images --out-dir runs/llava_nrca
    torchrun --nproc_per_node=8 train.py --preset vila --model /ckpt/VILA1.5-3b ... [--fsdp]
    python hf_tiny.py tiny-qwen2-vl runs/tiny-qwen2-vl && python train.py --model runs/tiny-qwen2-vl --method l2 \\
        --out-dir runs/qwen-l2
    python train.py --resume --out-dir runs/llava_nrca   # continue from the latest checkpoint
    python train.py --compare full --report-to tensorboard && tensorboard --logdir runs/embedded  # curves
    python train.py --lora-rank 8 --out-dir runs/lora   # LoRA on the last N layers (lora.py), connector in full

Data (README, "Your own data"): records.py's structural pass checks every record before step 1; samples are made
on the fly (loader.py), in --num-workers DataLoader workers.

Not here: QLoRA, sequence packing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pickle
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import confidence_gap
import data
import hf_models
import loader
import models
import records
import run_folder
import tensorboard_log
import testbed
from methods import METHODS, get_method, has_pictures, model_forward
from nrca import ALIGNMENTS


def _f(default, help):  # a dataclass field with its comment, which argparse shows as --help
    return field(default=default, metadata={"help": help})


BASE_NOISE_MAX_DELTA_DEFAULT = 0.6  # the embedded default's base augmentation (README, "The testbed": chosen by a rule)


@dataclass
class TrainConfig:
    preset: str = _f("embedded", "embedded | llava | vila: defaults of the paper's settings (Sec. 4.1)")
    # model and data
    model: str = _f("tiny-llava", "tiny-llava | tiny-vila | a LLaVA (transformers) or VILA1.5 checkpoint folder | any "
                                  "transformers image-text-to-text folder (Qwen2-VL, LLaVA-OneVision, Idefics3, ...)")
    train: list = _f(None, "TASK:NAME=PATH of a LLaVA/DataOptim JSON(L) file, repeatable; TASK is caption or "
                           "choice (prompts rewritten as the paper's, Sec. 4.1) or open (prompts as written). Empty: "
                           "the synthetic set in --data-dir")
    image_folder: str = _f("", "folder the records' image paths are relative to (default: the JSON's folder)")
    test: list = _f(None, "TASK:NAME=PATH of a test split for the per-epoch evaluation, repeatable; required with "
                          "--train (unless --no-eval-every-epoch); without --train the split of --data-dir is used")
    data_dir: str = _f("", "the testbed world (testbed.py), written here when absent (default: "
                           "data/testbed-seed{SEED})")
    base_epochs: int = _f(0, "built-in tiny models only: first pre-train the random model for this many epochs on "
                             "the testbed's pre-training corpus (every part trains, the vision tower included, with "
                             "noise augmentation), check the gates, cache it next to --out-dir per seed, and "
                             "fine-tune that base (default: 3 with --preset embedded and a built-in model, else 0)")
    base_noise_max_delta: float = _f(BASE_NOISE_MAX_DELTA_DEFAULT,
                                     "with --base-epochs: the base's noise augmentation, half of its pre-training "
                                     "pictures mixed with Eq. (2b) at delta ~ U(0, D) in both stages (0: clean "
                                     "pictures only). Sets how much less confident the base is on NRCA's noisy view "
                                     "(evaluate.py confidence-gap); cached per value")
    samples_per_dataset: int = _f(10_000, "k random records per dataset (paper: 10k); all (stored as -1): every record")
    max_length: int = _f(2048, "max tokens per sample, image tokens included (LLaVA-1.5 counted the image as 1); "
                                 "image tokens are never cut")
    skip_bad_records: bool = _f(False, "count and log bad records instead of stopping (before step 1, or while "
                                       "loading: the record's place in its batch gets no label)")
    check_images: bool = _f(False, "also open every image's header before step 1 (a process per CPU), so that a "
                                   "missing or unreadable image, or one the processor refuses, is named (or skipped) "
                                   "before training rather than when reached; on a generic family (Qwen2-VL, ...) also "
                                   "a record whose pictures leave no room within --max-length")
    num_workers: int = _f(0, "DataLoader worker processes that tokenise and load images ahead of the step (0: in the "
                             "training process)")
    max_pixels: int = _f(0, "dynamic-resolution families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): at most this many pixels "
                            "per image after resizing, the processor's max_pixels (0: the processor's own)")
    min_pixels: int = _f(0, "as --max-pixels, at least this many pixels per image (0: the processor's own)")
    out_dir: str = _f("runs/default", "run folder: checkpoints, metrics.jsonl, final model, eval")
    connector: str = _f("", "generic models only: connector module name(s), comma-separated, overriding "
                            "hf_models.CONNECTORS for a family it does not know (see model.named_modules())")
    vila_downsample_order: str = _f("auto", "VILA connector's 2x2 block order: auto (from mm_projector/config.json: "
                                            "mlp_downsample = vila1.5, mlp_downsample_2x2_fix = nvila) | vila1.5 | "
                                            "nvila (mlp_downsample checkpoints trained with VILA's code from 2024-12)")
    # method
    method: str = _f("nrca", "one of: " + ", ".join(METHODS))
    lam: float = _f(2.0, "NRCA lambda, Eq. (6)")
    delta: float = _f(0.5, "Noisy Visual Mixup ratio, Eq. (2b)")
    noise_stats: str = _f("image", "image (paper: each image's own mu, sigma) | batch (released code)")
    min_open_tokens: int = _f(3, "open-response sample = at least this many answer tokens (released: > 2)")
    nrca_impl: str = _f("fused", "fused (one 2B forward, fused kernel) | released (two forwards, fp32 logits)")
    nrca_alignment: str = _f("paper", "Eq. (5b) as published (paper) or a variant beyond the paper: squared | "
                                      "difference | squared-difference | hinge (Eq. 5b where I~ < I only, "
                                      "Appendix C's regime) (nrca.py; README, 'The testbed')")
    reg_lam: float = _f(None, "L2-Reg / Grafting strength (default: 1e-3 for L2-Reg, 1e-6 for Grafting)")
    mask_ratio: float = _f(0.5, "Random / Magnitude Mask: share of elements kept at pre-trained values")
    mask_redraw: str = _f("once", "Random Mask: once (released code) | every-step (paper text)")
    mi_lam: float = _f(0.01, "modality-interference consistency weight")
    mi_divergence: str = _f("kl", "modality-interference consistency: kl | js")
    mi_eps: float = _f(1e-3, "PGD epsilon on input embeddings")
    mi_alpha: float = _f(0.1, "PGD step size")
    mi_pgd_steps: int = _f(None, "PGD steps (default: 2 with kl, 1 with js, as the paper)")
    mi_heuristic: bool = _f(True, "modality interference: heuristic (misleading text / blank image) copies")
    mi_pgd: bool = _f(True, "modality interference: PGD copies on the input embeddings")
    # optimisation
    epochs: int = _f(3, "training epochs E (paper: 3 or 5)")
    batch_size: int = _f(16, "global batch size B (paper: 16) = micro batch x accumulation x ranks")
    micro_batch_size: int = _f(16, "samples per forward on one rank")
    lr_llm: float = _f(2e-4, "learning rate of the LLM decoder layers")
    lr_connector: float = _f(2e-5, "learning rate of the connector")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.03, "linear warm-up share of all steps, then cosine decay")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    tune_last_layers: int = _f(2, "trainable decoder layers, counted from the top (-1: all; 0: the connector alone)")
    lora_rank: int = _f(0, "LoRA rank R on the linear layers of the --tune-last-layers decoder layers instead of "
                           "training them in full (lora.py, through peft; 0: off, partial fine-tuning as Sec. 3.1)")
    lora_alpha: float = _f(None, "LoRA alpha: the update is (alpha / R) B A (default: 2 x --lora-rank)")
    lora_dropout: float = _f(0.0, "dropout on the input of each LoRA update")
    lora_targets: str = _f("", "comma-separated names of the linear layers in those decoder layers that get LoRA, "
                               "e.g. q_proj,v_proj (default: every linear layer there, attention and MLP projections)")
    lora_connector: bool = _f(False, "LoRA on the connector's linear layers too, instead of training it in full")
    merge_lora: bool = _f(False, "write the final model with the LoRA update merged into its weights, in the "
                                 "starting model's format, instead of the base + a peft adapter")
    seed: int = _f(0, "seed of data order, noise and masks")
    # hardware
    precision: str = _f("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32")
    fsdp: bool = _f(False, "shard trainable layers and optimizer state with FSDP2 instead of DDP")
    compile: bool = _f(False, "torch.compile each decoder block")
    activation_checkpointing: bool = _f(False, "recompute every decoder layer's activations in the backward pass "
                                               "instead of keeping them (frozen layers too: the gradient to the "
                                               "connector flows through all of them)")
    plan: bool = _f(False, "print the per-rank memory plan of this run (memory_plan.py; reads config.json only, "
                           "loads no weights) and exit")
    gpu_memory: float = _f(24.0, "--plan: memory of one GPU in GB (paper: 24)")
    plan_ranks: int = _f(0, "--plan: number of ranks (0: WORLD_SIZE or 1)")
    plan_text_tokens: int = _f(80, "--plan: prompt + answer tokens per sample besides the image tokens")
    plan_answer_tokens: int = _f(24, "--plan: answer tokens per sample (logit rows)")
    # checkpoints, evaluation
    save_every: int = _f(0, "checkpoint every N optimizer steps (0: only at epoch ends)")
    resume: bool = _f(False, "continue from the latest checkpoint in --out-dir")
    stop_at_step: int = _f(0, "stop (with a checkpoint) after this step; the schedule still spans all epochs")
    eval_every_epoch: bool = _f(True, "evaluate on --eval-split after every epoch (Fig. 1 curves)")
    eval_max_new_tokens: int = _f(24, "generation length for evaluation")
    eval_limit: int = _f(0, "evaluate on the first N records per task (0: all)")
    eval_split: str = _f("test", "split of --data-dir the per-epoch evaluation reads: test | val (the testbed's "
                                 "validation split, for choices made by looking at results)")
    eval_noisy_final: bool = _f(False, "also evaluate the final model on delta = 0.5 inputs (Fig. 3), on --eval-split: "
                                       "eval_noisy.json")
    compare: str = _f("", "comma-separated methods also trained from the same base, with the same data and "
                          "schedule, into OUT_DIR/METHOD; their per-epoch scores are printed side by side "
                          "(default: none; full when `python train.py` runs without options)")
    diagnose_every: int = _f(0, "NRCA: every N steps, the norms of the CE and alignment gradients and their cosine "
                                "(one extra backward; single process)")
    tune_vision_tower: bool = _f(False, "train the vision tower too (the testbed's base pre-training only; the "
                                        "paper freezes it)")
    overwrite: bool = _f(False, "delete the run already in --out-dir (checkpoints, final model, metrics) and start "
                                "again; without it (or --resume) such a folder is refused")
    report_to: str = _f("none", "none | tensorboard: also write every scalar of metrics.jsonl (losses, confidences, "
                                "lr, grad norm, per-epoch evaluation) as TensorBoard events in OUT_DIR/tensorboard "
                                "(tensorboard_log.py; rank 0)")


BASE_EPOCHS = 3  # the embedded default's base pre-training (testbed.py), see pretrain_base_model
BASE_LR = 1e-3  # its learning rate (every part of the tiny model)
BASE_TOWER_EPOCHS = 12  # stage 1: the vision tower alone (testbed.pretrain_vision_tower)
PRESETS = {
    # A tiny random-weight model learns the synthetic set from scratch: all layers, larger lr.
    # A tiny random-weight model is first "pre-trained" (base_epochs), then fine-tuned as in the paper.
    "embedded": dict(model="tiny-llava", base_epochs=BASE_EPOCHS, epochs=5, batch_size=16, micro_batch_size=16,
                     lr_llm=1e-3, lr_connector=1e-3, tune_last_layers=2, max_length=256, warmup_ratio=0.05,
                     out_dir="runs/embedded", eval_max_new_tokens=24, eval_noisy_final=True),
    "llava": dict(lr_llm=2e-4, lr_connector=2e-5, batch_size=16, epochs=3, tune_last_layers=2),
    "vila": dict(lr_llm=1e-4, lr_connector=1e-4, batch_size=16, epochs=3, tune_last_layers=2),
}


def help_text(f: dataclasses.Field) -> str:
    """A field's comment with its default named once, for --help: the value under the default preset, then the
    other presets' values where they differ, e.g. "(default: 5; 3 with --preset llava or vila)". A comment that
    names its default itself ("(default: the JSON's folder)") is kept as it is; None and "" (unset) are not shown."""
    text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help texts
    shown = lambda value: "on" if value is True else "off" if value is False else f"{value:g}" \
        if isinstance(value, float) else str(value)
    values = {}  # shown value -> the presets that have it, the default preset first
    for preset in dict.fromkeys([TrainConfig.preset, *PRESETS]):
        value = PRESETS[preset].get(f.name, f.default)
        if value is not None and value != "":
            values.setdefault(shown(value).replace("%", "%%"), []).append(preset)
    if "(default" in text or not values:
        return text
    first, *others = values
    if values[first][0] != TrainConfig.preset:  # unset under the default preset, set by others: say so
        others, first = values, "none"
    presets = lambda names: " or ".join(names)
    return text + f" (default: {first}" + "".join(f"; {v} with --preset {presets(values[v])}" for v in others) + ")"


def build_parser() -> argparse.ArgumentParser:
    """argparse built from TrainConfig; every default None, so that only explicit flags override (parse_config)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text(f))
        elif f.name in ("train", "test"):
            parser.add_argument(flag, action="append", default=None, help=help_text(f))
        elif f.name == "samples_per_dataset":
            parser.add_argument(flag, type=lambda v: -1 if v == "all" else int(v), default=None, help=help_text(f))
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(flag, type=kind, default=None, help=help_text(f))
    return parser


def parse_config(argv=None) -> TrainConfig:
    """Precedence: field defaults < --preset < explicit flags."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if not argv:  # `python train.py`: the embedded default shows NRCA beside Full FT from the same base
        args["compare"] = "full"
    return make_config(**args)


def make_config(**overrides) -> TrainConfig:
    preset = overrides.get("preset", TrainConfig.preset)
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: expected one of {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    settings = {**PRESETS[preset], **overrides}
    if "base_epochs" not in overrides and settings.get("model", TrainConfig.model) not in models.BUILT_IN:
        settings["base_epochs"] = 0  # the embedded preset pre-trains a base for the built-in tiny models only
    cfg = TrainConfig(**settings)
    if not cfg.data_dir:
        cfg.data_dir = f"data/testbed-seed{cfg.seed}"
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """Every bad value is reported before any model loads."""
    for f in dataclasses.fields(cfg):  # inf / nan pass every range check below and surface as a bad loss later
        value = getattr(cfg, f.name)
        if f.type in ("float", float) and value is not None and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} {value}: expected a finite number")
    checks = [
        (cfg.method in METHODS, f"--method {cfg.method!r}: expected one of {sorted(METHODS)}"),
        (cfg.lam >= 0, f"--lam {cfg.lam}: expected >= 0"),
        (0 <= cfg.delta <= 1, f"--delta {cfg.delta}: expected in [0, 1] (Eq. 2b)"),
        (0 <= cfg.base_noise_max_delta <= 1,
         f"--base-noise-max-delta {cfg.base_noise_max_delta}: expected in [0, 1] (Eq. 2b)"),
        (cfg.noise_stats in ("image", "batch"), f"--noise-stats {cfg.noise_stats!r}: expected image or batch"),
        (cfg.nrca_impl in ("fused", "released"), f"--nrca-impl {cfg.nrca_impl!r}: expected fused or released"),
        (cfg.nrca_alignment in ALIGNMENTS, f"--nrca-alignment {cfg.nrca_alignment!r}: expected one of {ALIGNMENTS}"),
        (cfg.mask_redraw in ("once", "every-step"), f"--mask-redraw {cfg.mask_redraw!r}: once or every-step"),
        (0 < cfg.mask_ratio < 1, f"--mask-ratio {cfg.mask_ratio}: expected in (0, 1)"),
        (cfg.mi_divergence in ("kl", "js"), f"--mi-divergence {cfg.mi_divergence!r}: expected kl or js"),
        (cfg.mi_eps >= 0 and cfg.mi_alpha >= 0, "--mi-eps and --mi-alpha must be >= 0"),
        (cfg.mi_heuristic or cfg.mi_pgd, "--no-mi-heuristic and --no-mi-pgd together leave no perturbed view"),
        (cfg.epochs >= 1, f"--epochs {cfg.epochs}: expected >= 1"),
        (cfg.micro_batch_size >= 1, f"--micro-batch-size {cfg.micro_batch_size}: expected >= 1"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: expected >= 1"),
        (cfg.lr_llm > 0 and cfg.lr_connector > 0, "--lr-llm and --lr-connector must be > 0"),
        (0 <= cfg.warmup_ratio < 1, f"--warmup-ratio {cfg.warmup_ratio}: expected in [0, 1)"),
        (cfg.max_grad_norm >= 0, f"--max-grad-norm {cfg.max_grad_norm}: expected >= 0"),
        (cfg.precision in ("auto", "bf16", "fp32"), f"--precision {cfg.precision!r}: auto, bf16 or fp32"),
        (cfg.eval_split in ("test", "val"), f"--eval-split {cfg.eval_split!r}: expected test or val"),
        (cfg.report_to in ("none", "tensorboard"), f"--report-to {cfg.report_to!r}: expected none or tensorboard"),
        (cfg.report_to != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
         "--report-to tensorboard: the tensorboard package is not installed (pip install tensorboard, in "
         "requirements.txt)"),
        (cfg.vila_downsample_order in ("auto", *models.DOWNSAMPLE_ORDERS),
         f"--vila-downsample-order {cfg.vila_downsample_order!r}: auto, vila1.5 or nvila"),
        (cfg.max_length >= 8, f"--max-length {cfg.max_length}: too small"),
        (cfg.save_every >= 0 and cfg.stop_at_step >= 0, "--save-every / --stop-at-step must be >= 0"),
        (cfg.tune_last_layers >= -1,
         f"--tune-last-layers {cfg.tune_last_layers}: expected -1 (all) or >= 0 (0: the connector alone)"),
        (cfg.lora_rank >= 0, f"--lora-rank {cfg.lora_rank}: expected >= 0 (0: off)"),
        (cfg.lora_alpha is None or cfg.lora_alpha > 0, f"--lora-alpha {cfg.lora_alpha}: expected > 0"),
        (0 <= cfg.lora_dropout < 1, f"--lora-dropout {cfg.lora_dropout}: expected in [0, 1)"),
        (cfg.lora_rank or not (cfg.lora_targets or cfg.lora_connector or cfg.merge_lora or cfg.lora_alpha is not None
                               or cfg.lora_dropout), "--lora-alpha/-dropout/-targets/-connector, --merge-lora: "
                                                     "they need --lora-rank R > 0"),
        (not cfg.lora_rank or cfg.tune_last_layers != 0 or cfg.lora_connector,
         "--lora-rank with --tune-last-layers 0 adapts nothing (pass --lora-connector, or train layers)"),
        (not cfg.lora_rank or importlib.util.find_spec("peft") is not None,
         "--lora-rank: the peft package is not installed (pip install peft, in requirements.txt)"),
        (cfg.samples_per_dataset >= 1 or cfg.samples_per_dataset == -1,
         f"--samples-per-dataset {cfg.samples_per_dataset}: expected >= 1, or all"),
        (cfg.num_workers >= 0, f"--num-workers {cfg.num_workers}: expected >= 0"),
        (cfg.max_pixels >= 0 and cfg.min_pixels >= 0, "--max-pixels / --min-pixels must be >= 0 (0: the processor's)"),
        (not (cfg.max_pixels and cfg.min_pixels > cfg.max_pixels),
         f"--min-pixels {cfg.min_pixels} is above --max-pixels {cfg.max_pixels}"),
        (cfg.min_open_tokens >= 1, f"--min-open-tokens {cfg.min_open_tokens}: expected >= 1"),
        (cfg.reg_lam is None or cfg.reg_lam >= 0, f"--reg-lam {cfg.reg_lam}: expected >= 0"),
        (cfg.mi_pgd_steps is None or cfg.mi_pgd_steps >= 0, f"--mi-pgd-steps {cfg.mi_pgd_steps}: expected >= 0"),
        (cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay}: expected >= 0"),
        (cfg.eval_limit >= 0, f"--eval-limit {cfg.eval_limit}: expected >= 0 (0: all records)"),
        (cfg.eval_max_new_tokens >= 1, f"--eval-max-new-tokens {cfg.eval_max_new_tokens}: expected >= 1"),
        (cfg.diagnose_every >= 0, f"--diagnose-every {cfg.diagnose_every}: expected >= 0"),
        (not (cfg.diagnose_every and int(os.environ.get("WORLD_SIZE", 1)) > 1),
         "--diagnose-every runs single-process only (the extra backward would bypass DDP/FSDP's gradient sync)"),
        (cfg.gpu_memory > 0 and cfg.plan_ranks >= 0, "--gpu-memory must be > 0 and --plan-ranks >= 0"),
        (1 <= cfg.plan_answer_tokens <= cfg.plan_text_tokens,
         f"--plan-answer-tokens {cfg.plan_answer_tokens}: expected in [1, --plan-text-tokens {cfg.plan_text_tokens}]"),
    ]
    for name in compared_methods(cfg):
        checks.append((name in METHODS, f"--compare {name!r}: expected methods from {sorted(METHODS)}"))
    if cfg.lora_rank:
        import lora

        for name in dict.fromkeys([cfg.method] + compared_methods(cfg)):
            checks.append((not lora.check_method(name), f"--method {name} with --lora-rank: {lora.check_method(name)}"))
    # Per-epoch evaluation runs unless FSDP2 shards the model over several ranks (see _train).
    evaluates = cfg.eval_every_epoch and not (cfg.fsdp and int(os.environ.get("WORLD_SIZE", 1)) > 1)
    checks.append((not (cfg.train and evaluates and not cfg.test),
                   "--train given without --test: name the test splits for the per-epoch evaluation "
                   "(or pass --no-eval-every-epoch)"))
    checks.append((not (cfg.train and cfg.eval_split != "test"),
                   f"--eval-split {cfg.eval_split}: reads a split of --data-dir; with --train, --test names the "
                   "splits to evaluate on"))
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for spec in (cfg.train or []) + (cfg.test or []):
        parse_train_spec(spec)
    root = Path(cfg.data_dir)  # the testbed world is written there when it holds no data set
    if not cfg.train and root.exists() and not root.is_dir():
        raise ValueError(f"--data-dir {root} is a file; expected a data folder (train_caption.json, ...) or a new "
                         "folder for the testbed world")
    if not cfg.train and root.is_dir() and not (root / "train_caption.json").exists() and \
            ((root / "config.json").exists() or any(root.glob("*.safetensors"))):
        raise ValueError(f"--data-dir {root} is a model folder (config.json / *.safetensors, no train_caption.json): "
                         "the testbed world would be written into it; pass a data folder or a new one")


def compared_methods(cfg: TrainConfig) -> list[str]:
    return [name.strip() for name in cfg.compare.split(",") if name.strip()]


def parse_train_spec(spec: str):
    """'caption:flickr30k=/data/f30k.json' -> ('caption', 'flickr30k', '/data/f30k.json')."""
    head, sep, path = spec.partition("=")
    task, sep2, name = head.partition(":")
    if not (sep and sep2 and task in records.KINDS and name and path):
        raise ValueError(f"--train/--test {spec!r}: expected TASK:NAME=PATH with TASK one of "
                         f"{', '.join(records.KINDS)}")
    if not Path(path).is_file():
        raise ValueError(f"--train/--test {spec!r}: file {path} does not exist")
    return task, name, path


# ---------------------------------------------------------------------------------------------
# Distribution: torchrun's environment, one small function that wraps the model.
# ---------------------------------------------------------------------------------------------
def init_distributed():
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def parallelize(mllm, cfg: TrainConfig, world: int):
    """Activation checkpointing, then DDP over the whole model (frozen parts need no sync) or FSDP2: every
    decoder layer, every vision-tower layer and the connector's modules become units sharded over the ranks
    (frozen ones too, so each rank holds about 1/world of their weights; embeddings (token, patch, position),
    lm_head and the norms outside the layers stay whole on every rank). A trainable parameter outside those
    units (LLaVA-OneVision's image_newline, or the tower's embeddings when it trains) would not be synced: then
    the whole model becomes the root unit too, which shards the rest.
    The model is left in training mode: transformers checkpoints only there, and dropout is 0 in these models,
    so the numbers are those of eval mode (evaluation switches to eval mode and back).
    Returns (the model to call, the FSDP2 units whose weights train)."""
    mllm.model.train()
    if cfg.activation_checkpointing:
        checkpoint_decoder_layers(mllm.language_model)
    if cfg.compile:
        for layer in mllm.decoder_layers:
            layer.compile()
    if world == 1:
        return mllm.model, []
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        # The tower's layers; the tower itself stays unwrapped (transformers records its hidden states by hooks
        # on it).
        frozen_units = list(mllm.vision_layers)
        units = mllm.connector_modules() + list(mllm.decoder_layers)
        # Every unit reshards after its forward (explicitly: a unit outside any other is its own FSDP2 root,
        # which would otherwise keep its gathered weights until the backward pass).
        for unit in frozen_units + units:
            fully_shard(unit, reshard_after_forward=True)
        inside = {id(p) for unit in frozen_units + units for p in unit.parameters()}
        outside = [n for n, p in mllm.model.named_parameters() if p.requires_grad and id(p) not in inside]
        if outside:  # e.g. LLaVA-OneVision's image_newline: the whole model becomes the root unit, so they sync too
            fully_shard(mllm.model, reshard_after_forward=True)
            units.append(mllm.model)
        return mllm.model, [u for u in units if any(p.requires_grad for p in u.parameters())]
    from torch.nn.parallel import DistributedDataParallel

    ids = [mllm.model.device.index] if next(mllm.model.parameters()).is_cuda else None
    return DistributedDataParallel(mllm.model, device_ids=ids), []


def checkpoint_decoder_layers(decoder) -> None:
    """Activation checkpointing of every decoder layer of `decoder` (a transformers decoder stack, e.g.
    LlamaModel), with transformers' own mechanism: from 5.24 on, each `GradientCheckpointingLayer` checkpoints
    its `forward` (torch.utils.checkpoint, non-reentrant), so module hooks (FSDP2's all-gather) stay outside
    the recomputed region, and the KV cache is switched off inside it whatever the family calls it (`cache`,
    `past_key_values`). Same numbers as without it: the recomputation repeats the same deterministic ops
    (dropout is 0 in these models). transformers also hooks the token embeddings to make their output require
    grad (for adapters on a fully frozen model); here the connector's trainable image features already carry
    the gradient through every layer, so the hook is removed and the autograd graph is the one without
    checkpointing."""
    decoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    decoder.disable_input_require_grads()


def full_tensor(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def on_rank0(fn, rank: int, world: int):
    """fn() on rank 0 only; an error there is raised on every rank (the others would wait for it forever)."""
    error = None
    if rank == 0:
        try:
            fn()
        except Exception as caught:  # re-raised below, on every rank
            error = caught
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


@contextlib.contextmanager
def claimed_run_folder(cfg: TrainConfig, rank: int, world: int, keep: tuple = ()):
    """Rank 0 locks --out-dir for the run and refuses a folder holding another run, a folder that is no run and
    the --model folder (run_folder.claim; `keep`: names the caller keeps beside the run)."""
    locks = []
    on_rank0(lambda: locks.append(run_folder.claim(cfg.out_dir, cfg.resume, cfg.overwrite, model=cfg.model,
                                                   keep=keep)), rank, world)
    try:
        yield
    finally:
        for lock in locks:
            lock.release()


# ---------------------------------------------------------------------------------------------
# Data: the multi-task mix, sharded over ranks so each record is trained on once per epoch.
# ---------------------------------------------------------------------------------------------
def training_sources(cfg: TrainConfig) -> list[tuple[str, str, str]]:
    """(task, name, path) of each training file: --train, else the synthetic set in --data-dir."""
    if cfg.train:
        return [parse_train_spec(s) for s in cfg.train]
    root = Path(cfg.data_dir)
    return [("caption", "synthetic-caption", str(root / "train_caption.json")),
            ("choice", "synthetic-choice", str(root / "train_choice.json"))]


def check_test_splits(cfg: TrainConfig, world: int, size_error=None) -> None:
    """The --test files the per-epoch evaluation will read (the records it evaluates, --eval-limit of them): valid
    test records whose images open, checked before training rather than at the end of the first epoch. With
    `size_error` (the loaded model's processor rule, HFMLLM.image_size_error) also their images' sizes: the second
    call, once the model has loaded and before step 1."""
    if not cfg.train or not cfg.test or not (cfg.eval_every_epoch and not (cfg.fsdp and world > 1)):
        return
    import evaluate

    for spec in cfg.test:
        task, name, path = evaluate.parse_test_spec(spec)
        test_records = evaluate.load_test_split(path, task)
        folder = Path(cfg.image_folder) if cfg.image_folder else Path(path).parent  # as evaluate_model
        for record in test_records[:cfg.eval_limit or None]:
            records.check_image(folder / record["image"], f"--test {task}:{name} record {record['id']!r}", size_error)


def build_dataset(cfg: TrainConfig, mllm, rank: int, world: int) -> loader.LazySamples:
    """The training mix as lazily loaded samples: records.py's structural pass over every file (and with
    --check-images every image's header, and on a generic family every record's length), LLaVA-1.5 / VILA1.5
    lengths against --max-length; a generic family's first sample is made here, so that a --max-length too
    small for its image tokens stops the run before step 1."""
    sources = training_sources(cfg)
    if cfg.train:
        image_folder = cfg.image_folder or str(Path(sources[0][2]).parent)
    else:
        root = Path(cfg.data_dir)
        if rank == 0 and testbed.ensure_world(root, seed=cfg.seed):
            print(f"wrote the testbed world (seed {cfg.seed}) in {root}")
        if world > 1:
            dist.barrier()
        image_folder = cfg.image_folder or str(root)
    skipped = records.Skipped()
    k = None if cfg.samples_per_dataset == -1 else cfg.samples_per_dataset  # --samples-per-dataset all
    store = loader.checked_mix(mllm, sources, k, cfg.seed, cfg.max_length, cfg.skip_bad_records, skipped)
    if cfg.check_images:
        store = records.check_images(store, image_folder, cfg.skip_bad_records, skipped,
                                     size_error=getattr(mllm, "image_size_error", None),
                                     length_error=loader.generic_length_check(mllm, cfg.max_length, image_folder))
    elif rank == 0 and (getattr(mllm, "max_image_tokens", None) or 0) >= cfg.max_length:
        print(f"note: a picture at the processor's max_pixels becomes about {mllm.max_image_tokens} image tokens, "
              f"over --max-length {cfg.max_length}: a record with a large picture stops the run when its batch loads "
              "(or is skipped there with --skip-bad-records); --check-images names such records before step 1, and "
              "--max-pixels lowers the budget")
    dataset = loader.LazySamples(store, image_folder, mllm, cfg.max_length, cfg.skip_bad_records)
    dataset.skipped = skipped
    if mllm.kind == "hf":
        dataset[0]
    if rank == 0 and store.n_truncated:
        print(f"{store.n_truncated} of {len(store)} records are longer than --max-length {cfg.max_length} and will be "
              "truncated (an answer's tail, or whole later turns; data.assemble_turns)")
    if rank == 0 and len(skipped):
        print(f"--skip-bad-records: {len(skipped)} records left out before step 1: "
              + ", ".join(f"{n} x {reason}" for reason, n in skipped.summary().items()))
    return dataset


def epoch_batches(n_items: int, epoch: int, cfg: TrainConfig, rank: int, world: int):
    """This rank's micro-batches of one epoch: a seeded permutation, rank r takes every world-th item.

    The list is padded to a whole number of steps for every rank; padding items are marked (index
    given as -1 - i) and contribute no answer token, so each record is trained on exactly once.
    """
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
    per_step = cfg.micro_batch_size * world
    padded = math.ceil(n_items / per_step) * per_step
    order = order.tolist() + [-1 - order[i % n_items].item() for i in range(padded - n_items)]
    mine = order[rank::world]
    return [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]


@contextlib.contextmanager
def anchored_to_pictures(mllm):
    """For a micro-batch of text-only samples on several ranks: inside the model's forward, where its input
    embeddings are made (a forward hook on them), the vision tower and the connector run on a blank picture
    (mllm.blank_image_features) and 0 x their sum is added to the embeddings. So every rank runs the tower and the
    connector in every step, in the order a rank with pictures does (embeddings, tower, connector, decoder), and the
    connector's (zero) gradient arrives after the decoder's: DDP expects a gradient for every trainable tensor, and
    FSDP2 gathers and reduces its units in the same order on every rank. Without it, a rank without pictures stops
    DDP ("parameters that were not used") and hangs FSDP2. LLaVA's code does the same for its text-only samples
    (image_features[0:0] concatenated). The values are unchanged (x + 0 = x)."""

    def hook(module, args, embeddings):
        return embeddings + (0.0 * mllm.blank_image_features().float().sum()).to(embeddings.dtype)

    handle = mllm.model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def noise_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of Eq. (2)'s noise for one micro-batch (also hf_trainer.py's): reproducible across resume, distinct
    per rank and micro-batch."""
    return ((seed * 1_000_003 + step) * 64 + micro) * 1024 + rank


def load_batch(dataset, indices, mllm, device):
    """One micro-batch made in this process (padding indices negative), as the DataLoader makes it."""
    return data.to_device(loader.collate_loaded(mllm)([dataset[index] for index in indices]), device)


def next_batch(batches, device):
    """The next micro-batch of the epoch's DataLoader, on `device`."""
    return data.to_device(next(batches), device)


# ---------------------------------------------------------------------------------------------
# Checkpoints: trainable weights (safetensors) + optimizer, scheduler, RNG, data position.
# ---------------------------------------------------------------------------------------------
def save_checkpoint(out_dir: Path, step: int, named_params, optimizer, scheduler, method, position, rank):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optim_state = (optimizer.state_dict() if not dist.is_initialized() else
                   get_optimizer_state_dict(_OwnerModel.of(named_params), optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    weights = {name: full_tensor(p.detach()).cpu().contiguous() for name, p in named_params}
    method_state = method.state_dict()
    if rank != 0:
        return None
    metrics = out_dir / "metrics.jsonl"  # its length now: a resume cuts it back to this (steps redone are logged once)
    position = {**position, "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0}
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp"
    target = tmp
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        target = tmp / "trainable.safetensors"
        save_file(weights, str(target))
        target = tmp / "state.pt"
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(), "method": method_state,
                    "position": position, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
                   target)
        target = final
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the checkpoint appears whole or not at all
        target = out_dir / ".latest.tmp"
        target.write_text(final.name)
        os.replace(target, out_dir / "latest")
    except (OSError, RuntimeError, SafetensorError) as error:  # disk full, no permission: torch.save and
        # safetensors raise their own types ("inline_container.cc ... unexpected pos", "I/O error ... os error 28")
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(target, out_dir, error) from error
    for old in out_dir.glob("checkpoint-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_error(path: Path, out_dir: Path, error: Exception) -> OSError:
    """A failed save, naming the file, the free space and what is kept."""
    free = shutil.disk_usage(out_dir).free / 2**20 if out_dir.exists() else float("nan")
    latest = out_dir / "latest"
    kept = (f"the previous checkpoint {out_dir / latest.read_text().strip()} is kept and --resume continues from it"
            if latest.exists() else "no earlier checkpoint exists")
    return OSError(f"cannot write {path}: {error} ({free:.0f} MiB free on its disk); {kept}")


class _OwnerModel(torch.nn.Module):
    """A module that owns exactly the trainable parameters, for the distributed state-dict helpers."""

    @staticmethod
    def of(named_params):
        owner = _OwnerModel()
        for name, p in named_params:
            owner.register_parameter(name.replace(".", "__"), p)
        return owner


def load_checkpoint(out_dir: Path, named_params, optimizer, scheduler, method):
    pointer = out_dir / "latest"
    if not pointer.exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir} (missing {pointer})")
    folder = out_dir / pointer.read_text().strip()
    models.check_safetensors(folder / "trainable.safetensors")  # truncated or damaged: named, not a SafetensorError
    weights = load_file(str(folder / "trainable.safetensors"))
    missing = [name for name, _ in named_params if name not in weights]
    if missing:
        raise ValueError(f"{folder}/trainable.safetensors lacks trainable tensors {missing[:5]}")
    with torch.no_grad():
        for name, p in named_params:
            value = weights[name].to(p.device, p.dtype)
            if hasattr(p, "full_tensor"):  # FSDP2: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, p.device_mesh, p.placements)
            p.copy_(value)
    try:
        state = torch.load(folder / "state.pt", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"{folder / 'state.pt'}: not a readable checkpoint state ({error}); the file is truncated "
                         "or damaged") from error
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(_OwnerModel.of(named_params), optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    method.load_state_dict(state["method"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    position = state["position"]
    evaluated = folder / "evaluated.json"  # written when the epoch-end evaluation after this checkpoint finished
    if evaluated.is_file() and json.loads(evaluated.read_text())["epoch"] == position.get("eval_due"):
        position = {**position, "eval_due": None, "metrics_bytes": json.loads(evaluated.read_text())["metrics_bytes"]}
    return position, folder


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------
def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(cfg: TrainConfig) -> dict:
    """Train cfg.method (and every --compare method, each into OUT_DIR/METHOD from the same base).
    Returns the last per-epoch evaluation of cfg.method ({} without evaluation)."""
    validate_config(cfg)  # also for a TrainConfig built or edited in code: fail before any model loads
    if cfg.plan:
        import memory_plan

        return memory_plan.print_plan(cfg, cfg.gpu_memory, cfg.plan_ranks or int(os.environ.get("WORLD_SIZE", 1)))
    rank, world, device = init_distributed()
    try:
        if cfg.base_epochs:
            cfg = dataclasses.replace(cfg, model=str(pretrain_base_model(cfg, rank, world, device)), base_epochs=0)
        runs = [cfg]
        if compared_methods(cfg):
            runs = [dataclasses.replace(cfg, method=name, compare="", out_dir=str(Path(cfg.out_dir) / name))
                    for name in dict.fromkeys([cfg.method] + compared_methods(cfg))]
        results = []
        for run in runs:
            with claimed_run_folder(run, rank, world):
                results.append(_train(run, rank, world, device))
        if rank == 0 and len(runs) > 1:
            import reporting

            print("\n" + reporting.format_side_by_side([Path(run.out_dir) for run in runs]))
        if dist.is_initialized():
            dist.barrier()  # no rank tears gloo/NCCL down while another still has messages in flight to it
        return results[0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def gate_answerer(mllm, root, batch_size: int = 32):
    """`answer` for testbed.gates: greedy answers of an MLLM (evaluate.generate_answers; noise seed 0). Here,
    not in testbed.py, so that the world's generator imports no evaluation (and evaluate.py -> models.py ->
    testbed.py closes no circle)."""
    import evaluate

    def answer(records, noisy):
        records = evaluate.validate_test_records(records, "choice", "testbed gates")  # adds "question"
        items = evaluate.generate_answers(mllm, records, Path(root), batch_size=batch_size, max_new_tokens=4,
                                          noisy=noisy, delta=testbed.GATE_DELTA)
        return {item["id"]: item["prediction"] for item in items}

    return answer


def base_model_name(model: str, seed: int, epochs: int, noise_max_delta: float) -> str:
    """The cached base's folder name (next to --out-dir): per model, pre-training corpus, seed, epochs and dial."""
    return f"base-{model}-testbed{testbed.PRETRAIN_VERSION}-seed{seed}-e{epochs}-noise{noise_max_delta:g}"


def pretrain_base_model(cfg: TrainConfig, rank: int, world: int, device) -> Path:
    """The embedded default's stand-in for a pre-trained MLLM (testbed.py): the random tiny model trains
    every part, its vision tower included, on the testbed's pre-training corpus (own images, plain
    captions, attribute questions) with noise augmentation (methods.NoisyAugmentedPretraining). Cached
    per model, seed and epochs, and shared by every method. Before any fine-tuning, the gates are
    checked on the downstream multiple-choice test split (testbed.gates): a base that does not see, or
    whose delta = 0.5 view has lost the picture, stops the run here."""
    if cfg.model not in models.BUILT_IN:
        raise ValueError(f"--base-epochs is for the tiny models; {cfg.model!r} is already pre-trained")
    root = Path(cfg.data_dir)
    base_dir = Path(cfg.out_dir).parent / base_model_name(cfg.model, cfg.seed, cfg.base_epochs,
                                                          cfg.base_noise_max_delta)
    if rank == 0 and testbed.ensure_world(root, seed=cfg.seed):
        print(f"wrote the testbed world (seed {cfg.seed}) in {root}")
    if not (root / "pretrain" / "train_caption.json").is_file():
        raise ValueError(f"--base-epochs pre-trains on the testbed world, but --data-dir {root} holds other data "
                         "(no pretrain/ corpus): pass an empty or testbed --data-dir")
    if world > 1:
        dist.barrier()
    if not (base_dir / "final" / "config.json").exists():
        tower_dir, started = base_dir / "vision-stage", time.perf_counter()
        if rank == 0 and not (tower_dir / "config.json").exists():
            torch.manual_seed(cfg.seed)
            mllm = models.load_model(cfg.model)
            accuracy = testbed.pretrain_vision_tower(mllm, root, epochs=BASE_TOWER_EPOCHS, seed=cfg.seed,
                                                     max_delta=cfg.base_noise_max_delta)
            print(f"stage 1: the vision tower names the attributes of the pre-training images (% correct, last "
                  f"epoch, half of them noisy): {accuracy}")
            mllm.save(str(tower_dir))
            run_folder.write_json_atomic(base_dir / "seconds.json", {"vision_tower": time.perf_counter() - started})
        if world > 1:
            dist.barrier()
        base = dataclasses.replace(cfg, model=str(tower_dir), method="pretrain", epochs=cfg.base_epochs, base_epochs=0,
                                   tune_last_layers=-1,
                                   tune_vision_tower=True, lr_llm=BASE_LR, lr_connector=BASE_LR, warmup_ratio=0.05,
                                   data_dir=str(root / "pretrain"), image_folder=str(root), out_dir=str(base_dir),
                                   samples_per_dataset=1_000_000, eval_every_epoch=False, eval_noisy_final=False,
                                   compare="", resume=False, stop_at_step=0, train=None, diagnose_every=0,
                                   overwrite=True,  # a cache: an interrupted pre-training starts again
                                   lora_rank=0, lora_alpha=None, lora_dropout=0.0, lora_targets="",
                                   lora_connector=False, merge_lora=False)  # every part trains in full
        if rank == 0:
            print(f"stage 2: pre-training the base {cfg.model} in {base_dir} ({cfg.base_epochs} epochs, every part "
                  "trains, noise-augmented)")
        started = time.perf_counter()
        with claimed_run_folder(base, rank, world, keep=(tower_dir.name, "seconds.json")):
            _train(base, rank, world, device)
        if rank == 0:
            timing = base_dir / "seconds.json"  # where the base's time went (README, testbed study)
            seconds = json.loads(timing.read_text()) if timing.is_file() else {}
            run_folder.write_json_atomic(timing, {**seconds, "pretraining": time.perf_counter() - started})
        if world > 1:
            dist.barrier()
    report = base_dir / f"gates-world{testbed.WORLD_VERSION}.json"  # on this world's test split
    gap_report = base_dir / "confidence_gap.json"  # on the fine-tuning mix (evaluate.py confidence-gap)
    if rank == 0 and not (report.is_file() and gap_report.is_file()):
        mllm = models.load_model(str(base_dir / "final"), device=device)
        if not report.is_file():
            report.write_text(json.dumps(testbed.gates(gate_answerer(mllm, root), root), indent=2) + "\n")
        if not gap_report.is_file():
            gap = confidence_gap.measure(mllm, training_sources(dataclasses.replace(cfg, train=None)), root,
                                         deltas=(testbed.GATE_DELTA,), progress=False)
            run_folder.write_json_atomic(gap_report, gap)
    if world > 1:
        dist.barrier()
    rows = json.loads(report.read_text())
    gap = json.loads(gap_report.read_text())
    # The noisy-view gate guards the embedded default's base; another --base-noise-max-delta sets the noisy view's
    # quality on purpose (the gap study), so there it is reported, not enforced.
    enforced = {"sees"} | ({"noisy view keeps the picture"}
                           if cfg.base_noise_max_delta == BASE_NOISE_MAX_DELTA_DEFAULT else set())
    if rank == 0:
        print(testbed.format_gates(rows, enforced))
        print(f"the base's confidence on the fine-tuning mix, clean vs delta = {testbed.GATE_DELTA} views "
              f"(evaluate.py confidence-gap):\n{confidence_gap.format_gap(gap)}")
    failed = [row["gate"] for row in rows if not row["passed"] and row["gate"] in enforced]
    if failed:  # every rank stops
        raise SystemExit(f"the base model in {base_dir} misses the testbed gate(s) {', '.join(failed)}: fine-tuning "
                         "it could not show the paper's question (README, 'The testbed'); try more --base-epochs")
    return base_dir / "final"


def _train(cfg: TrainConfig, rank: int, world: int, device) -> dict:
    out_dir = Path(cfg.out_dir)
    accumulation, remainder = divmod(cfg.batch_size, cfg.micro_batch_size * world)
    if remainder or accumulation == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size "
                         f"{cfg.micro_batch_size} x {world} ranks")
    on_rank0(lambda: check_test_splits(cfg, world), rank, world)  # named before step 1, not after an epoch
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    load_dtype = torch.bfloat16 if use_bf16 else torch.float32
    downsample_order = None if cfg.vila_downsample_order == "auto" else cfg.vila_downsample_order
    mllm = models.load_model(cfg.model, dtype=load_dtype, device=device, downsample_order=downsample_order)
    if cfg.connector:
        if mllm.kind != "hf":
            raise ValueError(f"--connector {cfg.connector}: {cfg.model} is a {mllm.kind} model, whose connector is "
                             "fixed by its architecture")
        mllm.connector_names = tuple(name.strip() for name in cfg.connector.split(",") if name.strip())
    hf_models.set_resolution(mllm, cfg.max_pixels, cfg.min_pixels)
    if getattr(mllm, "image_size_error", None):  # the processor's own size rule on the --test images (Qwen2-VL)
        on_rank0(lambda: check_test_splits(cfg, world, mllm.image_size_error), rank, world)
    layers = cfg.tune_last_layers if cfg.tune_last_layers >= 0 else len(mllm.decoder_layers)
    # --lora-rank: the decoder layers stay frozen and get adapters (lora.py); the connector trains in full unless
    # --lora-connector adapts it too.
    groups = models.freeze_for_finetuning(mllm, tune_last_layers=0 if cfg.lora_rank else layers,
                                          tune_connector=not (cfg.lora_rank and cfg.lora_connector),
                                          tune_vision_tower=cfg.tune_vision_tower)
    if cfg.lora_rank:
        import lora

        groups = lora.add_adapters(mllm, cfg, layers, groups)
    for group in groups:  # fp32 master weights for what trains; frozen weights stay in bf16 on GPU
        for p in group["params"]:
            p.data = p.data.float()
    dataset = build_dataset(cfg, mllm, rank, world)
    group_by_id = {id(p): g["name"] for g in groups for p in g["params"]}
    group_of = {n: group_by_id[id(p)] for n, p in mllm.model.named_parameters() if id(p) in group_by_id}
    wrapped, fsdp_units = parallelize(mllm, cfg, world)
    named_params = [(n, p) for n, p in mllm.model.named_parameters() if p.requires_grad]
    # fully_shard replaces each parameter by a new (DTensor) one: the optimizer must get those, found by name.
    groups = [{"name": g["name"], "params": [p for n, p in named_params if group_of[n] == g["name"]]} for g in groups]
    method = get_method(cfg.method)(cfg, mllm, named_params)
    forward = model_forward(wrapped)

    lrs = {"connector": cfg.lr_connector, "llm": cfg.lr_llm, "vision": cfg.lr_llm}
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": lrs[g["name"]]} for g in groups if g["params"]],
                                  weight_decay=cfg.weight_decay)
    steps_per_epoch = len(epoch_batches(len(dataset), 0, cfg, rank, world)) // accumulation
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, cfg.warmup_ratio))

    sources = training_sources(cfg)  # --resume: the same run (run_folder.check_resume), else record its start
    on_rank0(lambda: run_folder.check_resume(out_dir, cfg, sources, steps_per_epoch) if cfg.resume else
             run_folder.record_start(out_dir, cfg, sources, steps_per_epoch, dataset.skipped.summary()), rank, world)
    position, last_checkpoint = {"epoch": 0, "step_in_epoch": 0, "step": 0}, None
    if cfg.resume:
        position, last_checkpoint = load_checkpoint(out_dir, named_params, optimizer, scheduler, method)
        on_rank0(lambda: run_folder.truncate_metrics(out_dir / "metrics.jsonl", position.get("metrics_bytes")),
                 rank, world)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        n_trainable = sum(p.numel() for _, p in named_params)  # a DTensor reports its global numel: no collective
        print(f"{cfg.method} on {cfg.model}: {len(dataset)} records, {n_trainable / 1e6:.2f}M trainable "
              f"parameters, {world} rank(s), {total_steps} steps; extra memory of the method: "
              f"{method.extra_memory_bytes() / 2**20:.2f} MiB")
    metrics_file = out_dir / "metrics.jsonl"
    # --report-to tensorboard: events that follow metrics.jsonl, rebuilt from it here (a resume cut it back above)
    boards = []
    if cfg.report_to == "tensorboard":
        on_rank0(lambda: boards.append(tensorboard_log.MetricsBoard(out_dir, steps_per_epoch)), rank, world)
    board = boards[0] if boards else None
    # FSDP2 ranks would each generate a different number of tokens (early EOS) and hang in the all-gathers:
    # evaluate the saved model afterwards with `python evaluate.py OUT_DIR` instead.
    evaluate_each_epoch = cfg.eval_every_epoch and not (cfg.fsdp and world > 1)
    if cfg.eval_every_epoch and not evaluate_each_epoch and rank == 0:
        print("--fsdp: per-epoch evaluation is off; run `python evaluate.py OUT_DIR` on the final model")
    epoch_results = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    step = position["step"]
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc=cfg.method, dynamic_ncols=True)
    summary = {}
    if position.get("eval_due") and evaluate_each_epoch:  # resumed from an epoch end whose evaluation never finished
        summary = evaluate_epoch(cfg, mllm, position["eval_due"], rank, world, out_dir, board)
        epoch_results.append((position["eval_due"], summary))
    for epoch in range(position["epoch"], cfg.epochs):
        batches = epoch_batches(len(dataset), epoch, cfg, rank, world)
        first = position["step_in_epoch"] if epoch == position["epoch"] else 0
        loaded = iter(loader.batch_loader(dataset, batches[first * accumulation:steps_per_epoch * accumulation],
                                          mllm, cfg.num_workers))
        for step_in_epoch in range(first, steps_per_epoch):
            started = time.perf_counter()
            totals, n_tokens, ids, skipped = {}, 0, [], []
            for micro in range(accumulation):
                batch = next_batch(loaded, device)
                skipped += batch.pop("skipped")
                # Noise seed from (seed, step, micro, rank): reproducible across resume, distinct per rank.
                batch["noise_seed"] = noise_seed(cfg.seed, step, micro, rank)
                ids += batch["ids"]
                if cfg.diagnose_every:  # the extra backward of --diagnose-every, on its steps only
                    method.diagnose = (gradient_diagnostics(named_params) if (step + 1) % cfg.diagnose_every == 0
                                       else None)
                anchor = contextlib.nullcontext() if has_pictures(batch) or world == 1 else anchored_to_pictures(mllm)
                with autocast, anchor:
                    loss, metrics = method.loss(forward, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss ({loss.item()}) at step {step + 1} (epoch {epoch}, rank {rank}) on "
                        f"batch ids {batch['ids']}; last good checkpoint: {last_checkpoint or 'none yet'}")
                (loss / accumulation).backward()
                n_tokens += int(batch["attention_mask"].sum())
                for key, value in {"loss": loss.detach(), **metrics}.items():
                    totals[key] = totals.get(key, 0.0) + float(value) / accumulation
            if hasattr(method, "before_optimizer_step"):
                method.before_optimizer_step()
            grad_norm = (torch.nn.utils.clip_grad_norm_([p for _, p in named_params], cfg.max_grad_norm)
                         if cfg.max_grad_norm > 0 else None)
            optimizer.step()
            method.after_optimizer_step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            elapsed = time.perf_counter() - started
            record = {"step": step, "epoch": epoch + (step_in_epoch + 1) / steps_per_epoch, **totals,
                      "lr": scheduler.get_last_lr()[-1], "tokens_per_s": n_tokens * world / elapsed,
                      "seconds": elapsed,
                      "peak_memory_mb": peak_memory_mb(device)}
            if grad_norm is not None:
                record["grad_norm"] = float(full_tensor(grad_norm))
            if skipped:  # --skip-bad-records: records that failed while loading (their places got no label)
                record["skipped"] = skipped
                for message in skipped:
                    print(f"rank {rank}, step {step}: skipped a record that failed while loading: {message}",
                          file=sys.stderr)
            if rank == 0:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if board:
                    board.sync()
                bar.set_postfix(loss=f"{totals['loss']:.4f}")
                bar.update()
            position = {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "step": step}
            if step_in_epoch + 1 == steps_per_epoch:
                position = {"epoch": epoch + 1, "step_in_epoch": 0, "step": step, "eval_due": epoch + 1}
            stop = cfg.stop_at_step and step >= cfg.stop_at_step
            if stop or (cfg.save_every and step % cfg.save_every == 0) or position["step_in_epoch"] == 0:
                last_checkpoint = save_checkpoint(out_dir, step, named_params, optimizer, scheduler, method,
                                                  position, rank) or last_checkpoint
            if stop:
                bar.close()
                if board:
                    board.close()
                return {"stopped_at_step": step}
        if evaluate_each_epoch:
            summary = evaluate_epoch(cfg, mllm, epoch + 1, rank, world, out_dir, board)
            epoch_results.append((epoch + 1, summary))
    bar.close()
    if board:
        board.close()
    if not fsdp_units:  # the saved model gets the dtype it was loaded in (trainable tensors trained in fp32)
        for _, p in named_params:
            p.data = p.data.to(load_dtype)
    save_final_model(mllm, fsdp_units, out_dir / "final", rank, source=cfg.model, dtype=load_dtype,
                     lora_settings=cfg if cfg.lora_rank else None)
    if cfg.eval_noisy_final and evaluate_each_epoch:
        evaluate_epoch(cfg, mllm, cfg.epochs, rank, world, out_dir, noisy=True)
    if rank == 0 and epoch_results:  # every epoch's evaluation, those before a --resume too
        import reporting

        print_results(cfg, [(int(epoch), result) for epoch, result in reporting.epoch_evals(out_dir)],
                      attention=mllm.kind != "hf")  # Table 1's shares: LLaVA-1.5 / VILA1.5 only
    return summary


def save_final_model(mllm, fsdp_units, folder: Path, rank: int, source: str = "", dtype=torch.float32,
                     lora_settings=None):
    """The whole model in the input's format (a LLaVA folder or VILA's three folders).

    FSDP2's state-dict hooks always hand out the shards (even after `unshard()`), so with --fsdp every
    rank all-gathers the trainable tensors and rank 0 writes them into a fresh CPU copy of `source`
    (the model the run started from, loaded in `dtype`), which it saves. With LoRA (`lora_settings`, the run's
    config) always so: the copy gets the adapter and the trained connector, and is saved as base + adapter or
    merged (lora.save_final)."""
    if not fsdp_units and lora_settings is None:
        if rank == 0:
            save_model_whole(mllm, folder)
        return
    trained = {name: full_tensor(p.detach()).cpu() for name, p in mllm.model.named_parameters()
               if p.requires_grad}  # collectives (FSDP2's DTensors): every rank, same order
    if rank == 0:
        copy = models.load_model(source, dtype=dtype, downsample_order=mllm.model.mm_projector.order
                                 if mllm.kind == "vila" else None)  # any kind: the same adapter as the run's
        if getattr(mllm, "connector_names", None):  # --connector: the run's connector
            copy.connector_names = mllm.connector_names
        if lora_settings is not None:
            import lora

            layers = lora_settings.tune_last_layers
            lora.save_final(copy, trained, lora_settings, folder, save_model_whole,
                            layers if layers >= 0 else len(copy.decoder_layers), source=source)
            return
        params = dict(copy.model.named_parameters())
        with torch.no_grad():
            for name, value in trained.items():
                params[name].copy_(value)
        save_model_whole(copy, folder)


def save_model_whole(mllm, folder: Path, extra_files=()) -> None:
    """Write into a temporary folder and rename it: a kill or a full disk never leaves a partial model.
    `extra_files` are copied in beside the model (a LoRA adapter)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        mllm.save(str(tmp))
        for path in extra_files:
            shutil.copyfile(path, tmp / Path(path).name)
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(tmp, folder.parent, error) from error
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def evaluate_epoch(cfg: TrainConfig, mllm, epoch: int, rank: int, world: int, out_dir: Path, board=None,
                   noisy: bool = False) -> dict:
    """Per-epoch evaluation on the --eval-split (paper Fig. 1), appended to metrics.jsonl as {"epoch", "eval",
    "seconds"} (and passed on to `board`, --report-to tensorboard). With noisy=True (--eval-noisy-final): the
    final model on delta = 0.5 inputs (Fig. 3), written to OUT_DIR/eval_noisy.json (what `evaluate.py table
    --noisy` reads), not to metrics.jsonl."""
    import evaluate

    started = time.perf_counter()
    mllm.model.eval()
    try:
        real_data = bool(cfg.train)
        result = evaluate.evaluate_model(mllm, None if real_data else cfg.data_dir,
                                         tests=cfg.test if real_data else None,
                                         image_folder=(cfg.image_folder or None) if real_data else None,
                                         out_dir=out_dir if noisy else out_dir / f"eval_epoch{epoch}",
                                         max_new_tokens=cfg.eval_max_new_tokens, limit=cfg.eval_limit,
                                         rank=rank, world_size=world, noisy=noisy, batch_size=32,
                                         split=cfg.eval_split)
    finally:
        mllm.model.train()
    if rank == 0 and not noisy:
        with (out_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"epoch": epoch, "eval": result, "seconds": time.perf_counter() - started}) + "\n")
        if board:
            board.sync()
        latest = out_dir / "latest"
        if latest.exists():  # the epoch-end checkpoint: its evaluation is done, a resume from it need not redo it
            run_folder.write_json_atomic(out_dir / latest.read_text().strip() / "evaluated.json",
                                         {"epoch": epoch, "metrics_bytes": (out_dir / "metrics.jsonl").stat().st_size})
    return result


def gradient_diagnostics(named_params):
    """--diagnose-every: a callable (ce, weighted alignment) -> {"grad_norm_ce", "grad_norm_alignment",
    "grad_cosine"} over the trainable tensors. Eq. (5b)'s gradient has size ~ lam * CE / I whatever the gap
    I~ - I, so at low confidence it can set the update's direction while worth little of the loss; this
    shows it. Costs one extra backward (the two terms' gradients are taken separately)."""
    params = [p for _, p in named_params]

    def diagnose(ce, alignment):
        g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
        g_al = torch.autograd.grad(alignment, params, retain_graph=True, allow_unused=True)
        flat = lambda grads: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                                        for g, p in zip(grads, params, strict=True)])
        a, b = flat(g_ce), flat(g_al)
        cosine = float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else 0.0
        return {"grad_norm_ce": float(a.norm()), "grad_norm_alignment": float(b.norm()), "grad_cosine": cosine}

    return diagnose


def print_results(cfg: TrainConfig, epoch_results: list, attention: bool = True):
    """The per-epoch test scores (paper Fig. 1): CIDEr (x100), multiple-choice accuracy (%), their mean."""
    print(f"\n{cfg.method} on {cfg.model} ({cfg.out_dir}):")
    keys = ["cider", "accuracy", "avg"] + (["open_exact_match"] if any("open_exact_match" in r for _, r in
                                                                         epoch_results) else [])
    print("| epoch | CIDEr | accuracy | AVG | unparsable answers |" + (" open exact match |" if len(keys) > 3 else "")
          + "\n|---|---|---|---|---|" + ("---|" if len(keys) > 3 else ""))
    for epoch, result in epoch_results:
        cells = [f"{result[k]:.2f}" if result.get(k) is not None else "-" for k in keys]
        print(f"| {epoch} | {' | '.join(cells[:3])} | {result.get('n_unparsable', '-')} |"
              + "".join(f" {cell} |" for cell in cells[3:]))
    print(f"model: {Path(cfg.out_dir) / 'final'}; more: python evaluate.py {cfg.out_dir} [--noisy]"
          + (" [--attention]" if attention else ""))


if __name__ == "__main__":
    import cli

    cli.run(lambda: 0 if main(parse_config()) is not None else 1)
