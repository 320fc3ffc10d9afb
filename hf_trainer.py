"""NRCA inside `transformers.Trainer`: `NRCATrainer` (TRL's trainers subclass Trainer; combining them is untested).

HF Trainer users keep their model, data and `TrainingArguments`, swap `Trainer` for `NRCATrainer` and
get the loss train.py optimises (paper Sec. 3.2, Alg. 1), computed by the same code: methods.py's NRCA (one
forward of 2B samples, clean and Noisy-Visual-Mixup images with the text shared, Eq. 2), logits only at the
answer rows (hf_models.hf_forward: `logits_to_keep`), confidence_kernel.py's fused kernel, and nrca.py's
Eq. (4)-(6) with the released code's reduction (per-sample token mean, then the sample mean). Nothing of
the loss is written again here.

    from hf_trainer import NRCATrainer
    import hf_models
    mllm = hf_models.load("Qwen/Qwen2-VL-2B-Instruct")                 # or your model + processor
    hf_models.freeze(mllm, tune_last_layers=2)                         # connector + last 2 layers (Sec. 3.1)
    train_set = hf_models.HFDataset(records, image_folder, mllm)       # or your own samples via mllm.encode
    trainer = NRCATrainer(model=mllm.model, args=TrainingArguments(...), train_dataset=train_set,
                          data_collator=mllm.collate, processing_class=mllm.processor,
                          nrca={"lam": 2.0, "delta": 0.5})
    trainer.train()

The batches must hold input_ids, attention_mask, labels (-100 off the answer) and pixel_values, either a
(B, C, H, W) tensor (LLaVA-1.5, data.collate) or the dict of the processor's image tensors that
hf_models.HFMLLM.collate builds (Qwen2-VL's packed patches, anyres / Idefics3 tiles). The noise seed of a
micro-batch is train.py's `noise_seed(seed, step, micro, rank)`, so a run can be reproduced and a step's loss
equals train.py's on the same batch (tests/test_hf_trainer.py).

`nrca`: fields of train.py's TrainConfig that concern the loss (method "nrca" or "full", lam, delta,
noise_stats, min_open_tokens, nrca_impl, seed); the defaults are the paper's. The counterparts with state
(masks, SPIDER) and modality interference are train.py only.
Trainer divides the returned loss by the gradient-accumulation steps, as train.py does (each micro-batch's
loss is already its own mean, so it is not re-normalised by token counts).

The command line runs the whole recipe on any family: connector + last N decoder layers (Sec. 3.1), the
LLaVA/DataOptim records of train.py (or its synthetic set), HF Trainer with NRCATrainer, then greedy
generation on the test splits scored with CIDEr and accuracy (metrics.py); final model in OUT/final.

    python hf_trainer.py --model tiny-qwen2-vl --out-dir runs/hf-tiny      # tiny random model, synthetic data
    python hf_trainer.py --model Qwen/Qwen2-VL-2B-Instruct --train caption:flickr30k=/d/f30k.json \\
        --train choice:scienceqa=/d/sqa.json --test caption:flickr30k=/d/f30k_test.json \\
        --test choice:scienceqa=/d/sqa_test.json --image-folder /d/images --out-dir runs/qwen2vl_nrca
    torchrun --nproc_per_node=8 hf_trainer.py ...                          # Trainer's own DDP

Not here: the model and data (hf_models.py), the loss (methods.py, nrca.py, confidence_kernel.py).

    TRITON_INTERPRET=1 python -m pytest -q tests/test_hf_trainer.py
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import data
import hf_models
from methods import get_method
from train import TrainConfig, checkpoint_decoder_layers, make_config, noise_seed, parse_train_spec

SUPPORTED_METHODS = ("nrca", "full")


class NRCATrainer(Trainer):
    """`transformers.Trainer` whose `compute_loss` is methods.py's NRCA (or Full FT, the same reduction)."""

    def __init__(self, *args, nrca: TrainConfig | dict | None = None, **kwargs):
        self.nrca = nrca if isinstance(nrca, TrainConfig) else make_config(**(nrca or {}))
        if self.nrca.method not in SUPPORTED_METHODS:
            raise ValueError(f"NRCATrainer: method {self.nrca.method!r}; expected one of {SUPPORTED_METHODS} "
                             "(the other counterparts run in train.py)")
        super().__init__(*args, **kwargs)
        # Our loss is a per-micro-batch mean (train.py's reduction): let Trainer divide by the accumulation steps
        # and never hand the model a token count.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._method, self._step, self._micro = None, -1, 0
        self.nrca_metrics: dict = {}  # the last micro-batch's ce / alignment / n_open / n_empty

    def nrca_method(self, model):
        """methods.py's method object, built once on the model's trainable parameters."""
        if self._method is None:
            inner = getattr(model, "module", model)
            mllm = hf_models.HFMLLM(inner, self.processing_class)
            named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
            self._method = get_method(self.nrca.method)(self.nrca, mllm, named)
        return self._method

    def next_noise_seed(self) -> int:
        """train.py's seed for (step, micro-batch within the step, rank)."""
        if self.state.global_step != self._step:
            self._step, self._micro = self.state.global_step, 0
        seed = noise_seed(self.nrca.seed, self._step, self._micro, self.args.process_index)
        self._micro += 1
        return seed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
            if key not in inputs:
                raise KeyError(f"NRCATrainer.compute_loss: the batch lacks {key!r} (has {sorted(inputs)}); build "
                               "batches with hf_models.HFMLLM.collate or data.collate")
        # Training: train.py's seed of this micro-batch; evaluation (Trainer.evaluate) must not advance that count.
        seed = self.next_noise_seed() if model.training else noise_seed(self.nrca.seed, self.state.global_step, 0,
                                                                        self.args.process_index)
        batch = {**inputs, "noise_seed": seed}
        loss, metrics = self.nrca_method(model).loss(hf_models.hf_forward(model), batch)
        self.nrca_metrics = {key: float(value) for key, value in metrics.items()
                             if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)}
        return (loss, {"loss": loss}) if return_outputs else loss



# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model", default="tiny-qwen2-vl", help="tiny-qwen2-vl | tiny-llava-onevision | tiny-idefics3 | a folder "
        "or hub id that AutoModelForImageTextToText + AutoProcessor load")
    add("--method", default="nrca", choices=SUPPORTED_METHODS, help="NRCA or Full FT (same CE reduction)")
    add("--lam", type=float, default=None, help="NRCA lambda, Eq. (6) (default: train.py's, 2)")
    add("--delta", type=float, default=None, help="Noisy Visual Mixup ratio, Eq. (2b) (default 0.5)")
    add("--noise-stats", default=None, help="image (paper) | batch (released code)")
    add("--train", action="append", help="TASK:NAME=PATH of LLaVA/DataOptim records, repeatable (default: the "
        "synthetic set in --data-dir)")
    add("--test", action="append", help="TASK:NAME=PATH of a test split, repeatable (default: --data-dir's)")
    add("--image-folder", default="", help="folder the records' image paths are relative to")
    add("--data-dir", default="data/synthetic", help="synthetic data set, generated when absent")
    add("--samples-per-dataset", type=int, default=10_000, help="k random records per dataset (paper: 10k)")
    add("--max-length", type=int, default=2048, help="max tokens per sample (the prompt is never cut)")
    add("--connector", action="append", help="connector module name(s), overriding hf_models.CONNECTORS")
    add("--tune-last-layers", type=int, default=2, help="trainable decoder layers, from the top")
    add("--activation-checkpointing", action="store_true", help="recompute every decoder layer in the backward "
        "pass (transformers' own mechanism, as train.py; same weights)")
    add("--epochs", type=float, default=3, help="training epochs")
    add("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs decide)")
    add("--batch-size", type=int, default=16, help="global batch (paper: 16) = micro batch x accumulation x ranks")
    add("--micro-batch-size", type=int, default=4, help="samples per forward on one rank")
    add("--lr-llm", type=float, default=1e-4, help="learning rate of the decoder layers")
    add("--lr-connector", type=float, default=1e-4, help="learning rate of the connector")
    add("--seed", type=int, default=0, help="seed of data order and noise")
    add("--out-dir", default="runs/hf", help="Trainer output, final/ model, eval.json")
    add("--eval-max-new-tokens", type=int, default=24, help="generation length for evaluation")
    add("--eval-limit", type=int, default=0, help="first N test records per split (0: all)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    import hf_tiny
    from evaluate import resolve_splits

    world = int(os.environ.get("WORLD_SIZE", 1))
    accumulation, remainder = divmod(args.batch_size, args.micro_batch_size * world)
    if remainder or accumulation == 0:
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {world} ranks")
    nrca = make_config(method=args.method, seed=args.seed, **{k: v for k, v in
                       (("lam", args.lam), ("delta", args.delta), ("noise_stats", args.noise_stats)) if v is not None})
    cuda = torch.cuda.is_available()
    if args.model in hf_tiny.NAMES:
        mllm = hf_tiny.build(args.model)
    else:  # bf16 weights on GPU; the trainable tensors get fp32 master copies below, as in train.py
        mllm = hf_models.load(args.model, dtype=torch.bfloat16 if cuda else torch.float32)
    mllm.connector_names = tuple(args.connector or ())
    groups = hf_models.freeze(mllm, tune_last_layers=args.tune_last_layers)
    for group in groups:
        for p in group["params"]:
            p.data = p.data.float()
    if args.activation_checkpointing:
        checkpoint_decoder_layers(mllm.model.get_decoder())

    if args.train:
        sources = [parse_train_spec(spec) for spec in args.train]
        image_folder = Path(args.image_folder or Path(sources[0][2]).parent)
        tests = args.test
        if not tests:
            raise ValueError("--train given without --test: name the test splits to evaluate on")
    else:
        root = Path(args.data_dir)
        if not (root / "train_caption.json").exists():
            data.make_synthetic(root)
        sources = [("caption", "synthetic-caption", str(root / "train_caption.json")),
                   ("choice", "synthetic-choice", str(root / "train_choice.json"))]
        image_folder, tests = Path(args.image_folder or root), args.test
    records = data.mix_datasets([data.Source(name=n, path=p, task=t) for t, n, p in sources],
                                samples_per_dataset=args.samples_per_dataset, seed=args.seed)
    dataset = hf_models.HFDataset(records, image_folder, mllm, args.max_length)

    lrs = {"connector": args.lr_connector, "llm": args.lr_llm}
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": lrs[g["name"]]} for g in groups], weight_decay=0.0)
    training = TrainingArguments(
        output_dir=args.out_dir, per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=accumulation, num_train_epochs=args.epochs, max_steps=args.max_steps,
        lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], remove_unused_columns=False, seed=args.seed, bf16=cuda, use_cpu=not cuda,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = NRCATrainer(model=mllm.model, args=training, train_dataset=dataset, data_collator=mllm.collate,
                          processing_class=mllm.processor, optimizers=(optimizer, None), nrca=nrca)
    trainer.train()
    result = {}
    if trainer.is_world_process_zero():
        out = Path(args.out_dir)
        mllm.save(str(out / "final"))
        splits = {}
        for task, _name, path in resolve_splits(args.data_dir, tests):
            if task in splits:
                raise ValueError(f"--test: one split per task, got two {task} splits")
            split = json.loads(Path(path).read_text())
            splits[task] = split[:args.eval_limit] if args.eval_limit else split
        folder = Path(args.image_folder) if args.image_folder else Path(path).parent
        result = hf_models.evaluate(mllm, splits, folder, max_new_tokens=args.eval_max_new_tokens)
        scores = {k: v for k, v in result.items() if not k.endswith("_predictions")}
        if "cider" in scores and "accuracy" in scores:
            scores["avg"] = (scores["cider"] + scores["accuracy"]) / 2
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        scores.update(model=args.model, method=args.method, steps=trainer.state.global_step,
                      first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
        (out / "eval.json").write_text(json.dumps({**scores, **result}, indent=2) + "\n")
        cells = [f"{scores[k]:.2f}" if scores.get(k) is not None else "-" for k in ("cider", "accuracy", "avg")]
        print(f"\n{args.method} on {args.model}, {scores['steps']} steps, loss {scores['first_loss']:.4f} -> "
              f"{scores['last_loss']:.4f}\n| CIDEr | accuracy | AVG |\n|---|---|---|\n| {' | '.join(cells)} |\n"
              f"model: {out / 'final'}")
        result = scores
    return result


if __name__ == "__main__":
    import cli

    cli.run(lambda: 0 if main(parse_args()) is not None else 1)
