"""Training-step benchmark: Full FT vs NRCA (ours: one 2B forward + fused kernel) vs NRCA (released way:
two forwards, full fp32 logits, softmax + F.cross_entropy), side by side in one run.

Each configuration runs in its own subprocess so peak memory is its own: step time (median), tokens/s,
peak memory (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS growth after the model is loaded), and
the ratios NRCA/Full FT and ours/released.

    python bench/bench_step.py                    # tiny-llava on CPU (what CI's smoke test runs, shorter)
    python bench/bench_step.py --model llava-7b   # GPU: random-weight model with LLaVA-1.5-7B's shapes,
                                                  # bf16, batch 16, last 2 layers + connector trainable
    python bench/bench_step.py --model llava-7b --max-batch   # also the largest batch each method fits

A batch is half caption samples (answer of --answer-tokens tokens) and half multiple-choice samples
(letter + </s>), the paper's mix. Token ids are random: speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models  # noqa: E402
from methods import get_method, model_forward  # noqa: E402

CONFIGS = {  # name -> (method, nrca_impl)
    "full": ("full", "fused"),
    "nrca": ("nrca", "fused"),
    "nrca-released": ("nrca", "released"),
}


def build_llava_7b_shaped(device, dtype) -> models.MLLM:
    """LLaVA-1.5-7B's architecture (CLIP ViT-L/14-336, 2-layer MLP, Vicuna-7B, vocab 32064), random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       vocab_size=32064, max_position_embeddings=4096, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=576)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype)
    return models.MLLM(model, None, None, "llava", 576, 32000)


def make_batch(mllm, batch_size, prompt_tokens, answer_tokens, image_size, vocab, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n_image = mllm.num_image_tokens
    longest = 1 + prompt_tokens + n_image + answer_tokens + 1
    input_ids = torch.randint(5, min(vocab, 32000), (batch_size, longest), generator=generator)
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


def run_one(args) -> dict:
    """One configuration in this process: a few optimizer steps, timed."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method_name, impl = CONFIGS[args.one]
    if args.model == "llava-7b":
        mllm = build_llava_7b_shaped(device, torch.bfloat16)
        image_size, vocab = 336, 32064
    else:
        mllm = models.load_model(args.model, device=device)
        image_size, vocab = mllm.preprocess([__import__("PIL").Image.new("RGB", (8, 8))]).shape[-1], len(mllm.tokenizer)
    groups = models.freeze_for_finetuning(mllm, tune_last_layers=args.tune_last_layers)
    for group in groups:
        for p in group["params"]:
            p.data = p.data.float()
    named = [(n, p) for n, p in mllm.model.named_parameters() if p.requires_grad]
    cfg = SimpleNamespace(delta=0.5, noise_stats="image", nrca_impl=impl, lam=2.0, min_open_tokens=3, seed=0)
    method = get_method(method_name)(cfg, mllm, named)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-5)
    forward = model_forward(mllm.model)
    mllm.model.train()
    batch = make_batch(mllm, args.batch, args.prompt_tokens, args.answer_tokens, image_size, vocab, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        with autocast:
            loss, _ = method.loss(forward, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
    return {"config": args.one, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "step_s": step_s, "tokens_per_s": float(batch["attention_mask"].sum()) / step_s, "peak_mb": peak_mb,
            "loss": float(loss)}


def fits(args, config, batch) -> bool:
    result = subprocess.run(child_command(args, config, batch, steps=1, warmup=0), capture_output=True, text=True)
    return result.returncode == 0


def child_command(args, config, batch, steps=None, warmup=None):
    return [sys.executable, __file__, "--one", config, "--model", args.model, "--batch", str(batch),
            "--steps", str(steps if steps is not None else args.steps),
            "--warmup", str(warmup if warmup is not None else args.warmup),
            "--prompt-tokens", str(args.prompt_tokens), "--answer-tokens", str(args.answer_tokens),
            "--tune-last-layers", str(args.tune_last_layers)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llava", help="tiny-llava | tiny-vila | llava-7b (GPU)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=40, help="system + question tokens")
    parser.add_argument("--answer-tokens", type=int, default=24, help="caption answer length")
    parser.add_argument("--tune-last-layers", type=int, default=2)
    parser.add_argument("--max-batch", action="store_true", help="GPU: also search the largest batch that fits")
    parser.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if args.model == "llava-7b" and not torch.cuda.is_available():
        sys.exit("--model llava-7b needs a CUDA device")
    results = {}
    for config in CONFIGS:
        out = subprocess.run(child_command(args, config, args.batch), capture_output=True, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode != 0:
            sys.exit(f"{config} failed:\n{out.stderr[-3000:]}")
        results[config] = json.loads(out.stdout.strip().splitlines()[-1])
    device = results["full"]["device"]
    on_gpu = device != "cpu"
    print(f"\n{args.model}, batch {args.batch}, device {device}, torch {torch.__version__}")
    print("| config | step time | tokens/s | peak memory | step vs full | memory vs full | memory vs released |")
    print("|---|---|---|---|---|---|---|")
    full, released = results["full"], results["nrca-released"]
    for config, r in results.items():
        absolute = (f"{r['step_s'] * 1e3:.1f} ms | {r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} MiB" if on_gpu
                    else "(CPU: ratios only) | | ")
        memory_vs_full = r["peak_mb"] / max(full["peak_mb"], 1e-9)
        memory_vs_released = r["peak_mb"] / max(released["peak_mb"], 1e-9)
        print(f"| {config} | {absolute} | {r['step_s'] / full['step_s']:.2f}x | {memory_vs_full:.2f}x | "
              f"{memory_vs_released:.2f}x |")
    if args.max_batch and on_gpu:
        print("\nlargest batch that fits (powers of two, then bisection):")
        for config in CONFIGS:
            low, high = 0, 1
            while fits(args, config, high) and high <= 1024:
                low, high = high, high * 2
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if fits(args, config, middle) else (low, middle)
            print(f"| {config} | {low} |")


if __name__ == "__main__":
    main()
