"""Training-step benchmark: Full FT vs NRCA (ours: one 2B forward + fused kernel) vs NRCA (released way:
two forwards, full fp32 logits, softmax + F.cross_entropy), and Full FT / NRCA with LoRA of rank --lora-rank on
the trained layers (lora.py; the connector in full) beside partial fine-tuning, each without and with
activation checkpointing, and memory_plan.py's estimate beside every measured peak.

Each configuration runs in its own subprocess: step time (median over --steps optimizer steps of --batch
samples as micro-batches of --micro-batch), tokens/s (non-padding tokens of the batch / step time; NRCA's
noisy copies not counted), and the peak memory of one micro-batch's forward + backward + optimizer step:
  GPU: torch.cuda.max_memory_allocated (all tensors, the CUDA context excluded);
  CPU: the peak of live tensor bytes seen by torch.distributed._tools.mem_tracker.MemTracker (a dispatch
       mode that follows every tensor storage: parameters, gradients, optimizer state, activations and
       temporaries; not the allocator's cache, not Python or library heap). The planner estimates the same
       quantity, so the two compare like with like.

    python bench/bench_step.py --model llava-narrow --micro-batch 4   # CPU: LLaVA-1.5's sequence shapes
        (CLIP 336/14 -> 576 image tokens + 80 text tokens, V = 32000, batch 16) on a width-reduced model:
        vision hidden 64 x 2 layers, Llama hidden 256 x 4 layers (the last 2 + connector trainable)
    python bench/bench_step.py                    # tiny-llava, a quick CPU smoke run
    python bench/bench_step.py --model llava-7b   # GPU: random-weight model with LLaVA-1.5-7B's shapes, bf16
    python bench/bench_step.py --model llava-7b --max-batch   # also the largest micro-batch each method fits

A batch is half caption samples (answer of --answer-tokens tokens) and half multiple-choice samples
(letter + </s>), the paper's mix. Token ids are random: speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memory_plan  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from methods import get_method, model_forward  # noqa: E402

CONFIGS = {  # name -> (method, nrca_impl, LoRA on the trained layers instead of training them in full)
    "full": ("full", "fused", False),
    "nrca": ("nrca", "fused", False),
    "nrca-released": ("nrca", "released", False),
    "full-lora": ("full", "fused", True),
    "nrca-lora": ("nrca", "fused", True),
}


def llava_config(narrow: bool):
    """LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336, 2-layer MLP, Vicuna-7B), or the same sequence shapes
    (336 px / 14 px patches -> 576 image tokens, V = 32000) on a narrow, shallow model that a CPU can train."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if narrow:
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
        text = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=32000)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32064)
    return LlavaConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **vision),
                       text_config=LlamaConfig(max_position_embeddings=4096, pad_token_id=0, **text),
                       image_token_index=text["vocab_size"] - 1 if narrow else 32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=576)


def build_llava(config, device, dtype) -> models.MLLM:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    return models.MLLM(model, None, None, "llava", 576, config.image_token_id)


def make_batch(mllm, batch_size, prompt_tokens, answer_tokens, image_size, vocab, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n_image = mllm.num_image_tokens
    longest = 1 + prompt_tokens + n_image + answer_tokens + 1
    input_ids = torch.randint(5, min(vocab, 32000) - 1, (batch_size, longest), generator=generator)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.ones_like(input_ids)
    start = 1 + prompt_tokens + n_image
    for b in range(batch_size):
        answer = answer_tokens if b % 2 == 0 else 1  # caption | letter
        input_ids[b, 1 + prompt_tokens // 2: 1 + prompt_tokens // 2 + n_image] = mllm.image_token_id
        labels[b, start:start + answer + 1] = input_ids[b, start:start + answer + 1]
        attention_mask[b, start + answer + 1:] = 0
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    batch = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, pixel_values=pixel_values)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch.update(ids=[str(i) for i in range(batch_size)], noise_seed=seed)
    return batch


class Step(torch.nn.Module):
    """One micro-batch's loss as a module call, so that MemTracker sees one iteration (the released NRCA
    calls the model twice inside it)."""

    def __init__(self, model, method, batch):
        super().__init__()
        self.model, self.method, self.batch = model, method, batch

    def forward(self):
        return self.method.loss(model_forward(self.model), self.batch)[0]


def setup(args, device):
    method_name, impl, adapted = CONFIGS[args.one]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model in ("llava-7b", "llava-narrow"):
        mllm = build_llava(llava_config(narrow=args.model == "llava-narrow"), device, dtype)
        image_size, vocab = 336, mllm.model.config.text_config.vocab_size
    else:
        mllm = models.load_model(args.model, device=device)
        image_size = mllm.preprocess([__import__("PIL").Image.new("RGB", (8, 8))]).shape[-1]
        vocab = len(mllm.tokenizer)
    groups = models.freeze_for_finetuning(mllm, tune_last_layers=0 if adapted else args.tune_last_layers)
    if adapted:
        import lora

        settings = SimpleNamespace(lora_rank=args.lora_rank, lora_alpha=None, lora_dropout=0.0, lora_targets="",
                                   lora_connector=False)
        groups = lora.add_adapters(mllm, settings, args.tune_last_layers, groups)
    for group in groups:
        for p in group["params"]:
            p.data = p.data.float()
    config = SimpleNamespace(activation_checkpointing=args.checkpointing, compile=False)
    train.parallelize(mllm, config, world=1)  # the same checkpointing hook train.py applies
    named = [(n, p) for n, p in mllm.model.named_parameters() if p.requires_grad]
    cfg = SimpleNamespace(delta=0.5, noise_stats="image", nrca_impl=impl, nrca_alignment="paper", lam=2.0,
                          min_open_tokens=3, seed=0)
    method = get_method(method_name)(cfg, mllm, named)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-5)
    batches = [make_batch(mllm, args.micro_batch, args.prompt_tokens, args.answer_tokens, image_size, vocab, device,
                          seed=i) for i in range(args.batch // args.micro_batch)]
    return mllm, method, optimizer, batches


def run_one(args) -> dict:
    """One configuration in this process: timed optimizer steps, then one micro-batch step with memory tracking."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mllm, method, optimizer, batches = setup(args, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    forward = model_forward(mllm.model)

    def optimizer_step(micro_batches):
        for batch in micro_batches:
            with autocast:
                loss, _ = method.loss(forward, batch)
            (loss / len(micro_batches)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = optimizer_step(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times) if times else float("nan")
    tokens = sum(float(b["attention_mask"].sum()) for b in batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        optimizer_step(batches[:1])
        peak, breakdown = torch.cuda.max_memory_allocated(), {}
    else:
        from torch.distributed._tools.mem_tracker import MemTracker

        step_module = Step(mllm.model, method, batches[0])
        tracker = MemTracker()
        tracker.track_external(step_module, optimizer)
        # MemTracker hooks every parameter's gradient, which a frozen parameter cannot take: mark those done.
        no_hook = SimpleNamespace(remove=lambda: None)
        for p in mllm.model.parameters():
            if not p.requires_grad:
                tracker._param_to_grad_hook_handles[p] = (no_hook, no_hook)
        with tracker:
            step_module().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        snapshot = tracker.get_tracker_snapshot("peak")[device]
        peak = snapshot["Total"]
        breakdown = {str(k).split(".")[-1].lower(): v for k, v in snapshot.items() if k != "Total"}
    return {"config": args.one, "checkpointing": args.checkpointing, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "peak_bytes": peak, "breakdown": breakdown, "planned_bytes": planned_peak(args, mllm, device),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "loss": float(loss)}


def planned_peak(args, mllm, device) -> float:
    """The planner on this model's structure and this run's shapes (it reads only shapes and configs)."""
    method_name, impl, adapted = CONFIGS[args.one]
    text_tokens = 1 + args.prompt_tokens + args.answer_tokens + 1
    # Logit rows per sample: captions (answer + </s>) and letters (letter + </s>) alternate.
    run = memory_plan.RunShape(method=method_name, nrca_impl=impl, micro_batch=args.micro_batch,
                               text_tokens=text_tokens, answer_tokens=(args.answer_tokens + 1 + 2) / 2,
                               bf16=device.type == "cuda", tune_last_layers=args.tune_last_layers,
                               activation_checkpointing=args.checkpointing,
                               lora_rank=args.lora_rank if adapted else 0)
    return memory_plan.peak_bytes(memory_plan.estimate(mllm, run), args.checkpointing)


def child_command(args, config, checkpointing, micro_batch=None, steps=None, warmup=None):
    micro_batch = micro_batch or args.micro_batch
    return [sys.executable, __file__, "--one", config, "--model", args.model, "--batch",
            str(args.batch if micro_batch == args.micro_batch else micro_batch), "--micro-batch", str(micro_batch),
            "--steps", str(args.steps if steps is None else steps),
            "--warmup", str(args.warmup if warmup is None else warmup),
            "--prompt-tokens", str(args.prompt_tokens), "--answer-tokens", str(args.answer_tokens),
            "--tune-last-layers", str(args.tune_last_layers), "--lora-rank", str(args.lora_rank)] + \
        (["--checkpointing"] if checkpointing else [])


def fits(args, config, checkpointing, micro_batch) -> bool:
    command = child_command(args, config, checkpointing, micro_batch=micro_batch, steps=1, warmup=0)
    return subprocess.run(command, capture_output=True, text=True).returncode == 0


def print_tables(args, results: dict) -> None:
    device = next(iter(results.values()))["device"]
    gib = 2**30
    print(f"\n{args.model}, batch {args.batch} as micro-batches of {args.micro_batch}, "
          f"{576 if args.model != 'tiny-llava' else 'tiny'} image + {args.prompt_tokens + args.answer_tokens + 2} "
          f"text tokens, device {device}, torch {torch.__version__}")
    print("| config | checkpointing | step time | tokens/s | measured peak | planner | planner / measured |"
          "\n|---|---|---:|---:|---:|---:|---:|")
    for (config, checkpointing), r in results.items():
        print(f"| {config} | {'yes' if checkpointing else 'no'} | {r['step_s']:.2f} s | {r['tokens_per_s']:.0f} | "
              f"{r['peak_bytes'] / gib:.3f} GiB | {r['planned_bytes'] / gib:.3f} GiB | "
              f"{r['planned_bytes'] / r['peak_bytes']:.2f} |")
    print("\n| ratio | without checkpointing | with checkpointing |\n|---|---:|---:|")
    rows = [("NRCA (ours) / Full FT, step time", "nrca", "full", "step_s"),
            ("NRCA (released) / Full FT, step time", "nrca-released", "full", "step_s"),
            ("NRCA (ours) / Full FT, peak memory", "nrca", "full", "peak_bytes"),
            ("NRCA (ours) / NRCA (released), peak memory", "nrca", "nrca-released", "peak_bytes"),
            ("NRCA (ours) / NRCA (released), step time", "nrca", "nrca-released", "step_s"),
            ("Full FT + LoRA / Full FT, peak memory", "full-lora", "full", "peak_bytes"),
            ("NRCA + LoRA / NRCA (ours), peak memory", "nrca-lora", "nrca", "peak_bytes"),
            ("NRCA + LoRA / NRCA (ours), step time", "nrca-lora", "nrca", "step_s")]
    for label, a, b, key in rows:
        cells = [f"{results[(a, c)][key] / results[(b, c)][key]:.2f}x" if (a, c) in results and (b, c) in results
                 else "-" for c in (False, True)]
        print(f"| {label} | {' | '.join(cells)} |")
    for checkpointing in (False, True):
        if ("nrca", checkpointing) in results and ("full", checkpointing) in results:
            extra = results[("nrca", checkpointing)]["peak_bytes"] - results[("full", checkpointing)]["peak_bytes"]
            print(f"\nNRCA's extra peak over Full FT ({'with' if checkpointing else 'without'} checkpointing): "
                  f"{extra / gib:.3f} GiB; at the peak, by MemTracker category: "
                  + ", ".join(f"{k} {(results[('nrca', checkpointing)]['breakdown'].get(k, 0) - v) / gib:+.3f}"
                              for k, v in results[("full", checkpointing)]["breakdown"].items() if v or
                              results[("nrca", checkpointing)]["breakdown"].get(k)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llava", help="tiny-llava | tiny-vila | llava-narrow (CPU) | llava-7b")
    parser.add_argument("--batch", type=int, default=16, help="samples per optimizer step (paper: 16)")
    parser.add_argument("--micro-batch", type=int, default=None, help="samples per forward (default: --batch)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=54, help="system + question tokens")
    parser.add_argument("--answer-tokens", type=int, default=24, help="caption answer length")
    parser.add_argument("--tune-last-layers", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the *-lora configurations")
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append", help="run only these configurations")
    parser.add_argument("--no-checkpointing-runs", action="store_true", help="skip the checkpointed configurations")
    parser.add_argument("--max-batch", action="store_true", help="GPU: also search the largest micro-batch that fits")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.micro_batch = args.micro_batch or args.batch
    if args.batch % args.micro_batch:
        sys.exit(f"--batch {args.batch} is not a multiple of --micro-batch {args.micro_batch}")
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if args.model == "llava-7b" and not torch.cuda.is_available():
        sys.exit("--model llava-7b needs a CUDA device")
    results = {}
    for checkpointing in (False,) if args.no_checkpointing_runs else (False, True):
        for config in args.only or CONFIGS:
            started = time.perf_counter()
            out = subprocess.run(child_command(args, config, checkpointing), capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode != 0:
                sys.exit(f"{config} (checkpointing {checkpointing}) failed:\n{out.stderr[-3000:]}")
            results[(config, checkpointing)] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{config}, checkpointing {checkpointing}: done in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
    print_tables(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps([{**r} for r in results.values()], indent=2))
    if args.max_batch and torch.cuda.is_available():
        print("\nlargest micro-batch that fits (powers of two, then bisection):")
        for checkpointing in (False, True):
            for config in CONFIGS:
                low, high = 0, 1
                while high <= 1024 and fits(args, config, checkpointing, high):
                    low, high = high, high * 2
                while high - low > 1:
                    middle = (low + high) // 2
                    low, high = (middle, high) if fits(args, config, checkpointing, middle) else (low, middle)
                print(f"| {config} | checkpointing {checkpointing} | {low} |")


if __name__ == "__main__":
    main()
