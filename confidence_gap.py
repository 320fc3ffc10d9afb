"""The clean-noisy confidence gap of a model: the premise of NRCA's Eq. (5b), measured before any training.

Eq. (5b) aligns I~, the model's mean confidence in the answer tokens when the picture is replaced by its Noisy
Visual Mixup view (Eq. 2b), with I, its confidence on the clean picture. The paper's Appendix C (Eq. 8-10) reasons
in the regime I >= I~: a noisy picture makes the model *less* sure, and Eq. (5b) pulls I~ up towards I. Where a
model is as sure on the noisy view as on the clean one (I~ ~ I; I~ > I on about half of the samples), Eq. (5b)'s
gradient, of size lam * CE / I whatever the gap, has a random sign: it pushes I~ down on those samples. On the
testbed this is what broke NRCA in the first study (README, "The testbed"). So before spending GPU hours on NRCA,
measure where a checkpoint sits:

    python evaluate.py confidence-gap RUN_OR_MODEL                        # the testbed's fine-tuning mix
    python evaluate.py confidence-gap /ckpt/llava-v1.5-7b --train caption:coco=/d/coco.json \\
        --train choice:sqa=/d/sqa.json --image-folder /d/images --delta 0.25 --delta 0.5 --limit 512

Forward passes only, on `--limit` records per training file (drawn as train.py draws them, records.mix,
seed 0), each twice: the clean picture and its Eq. (2b) view (delta per `--delta`, the paper's per-image
statistics, a fixed noise seed per batch). Per task and per delta, over the open-response samples (>= 3 answer
tokens, NRCA's own rule, nrca.sample_confidences): `clean_confidence` (mean I), `noisy_confidence` (mean I~),
`share_noisy_above_clean` (share of samples with I~ > I: where Eq. 5b pushes the noisy confidence down) and
`n_open`. Fixed-choice samples (a letter + end token) are never open, so a choice task reports n_open = 0.
Written to OUT/confidence_gap.json (default: the run or model folder) and printed.

How to read it: the premise of Appendix C holds when the clean view is the more confident one on most samples
(share_noisy_above_clean well below 1/2) and I~ is clearly below I; a share near 1/2 with I~ ~ I is the regime
where the testbed's NRCA diverged. README, "The testbed", gives the measured shares next to NRCA's outcomes.

Not here: the gradients (train.py --diagnose-every), multi-GPU sharding (one process; it is forward passes only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import data
import loader
from confidence_kernel import token_confidence
from methods import has_pictures
from nrca import answer_positions, sample_confidences, to_grid

DEFAULT_DELTAS = (0.5,)  # the paper's delta (Sec. 4.1)
DEFAULT_LIMIT = 500  # records per training file: the testbed's whole fine-tuning mix (k = 500 per task)
NOISE_SEED = 0
MAX_LENGTH = 2048  # train.py's default --max-length


def check_deltas(deltas) -> None:
    for delta in deltas:
        if not 0 <= float(delta) <= 1:
            raise ValueError(f"confidence-gap: --delta {delta}: expected in [0, 1] (Eq. 2b; 0 gives I~ = I)")


@torch.no_grad()
def confidence_gap(mllm, dataset, deltas=DEFAULT_DELTAS, batch_size: int = 16, min_open_tokens: int = 3,
                   noise_stats: str = "image", noise_seed: int = NOISE_SEED, progress: bool = True) -> dict:
    """{delta: {"clean_confidence", "noisy_confidence", "share_noisy_above_clean", "n_open", "n_records"}} over the
    open-response samples of `dataset` (training samples of one file: loader.LazySamples, or an eager
    mllm.dataset). Confidences are means of the per-sample I and I~ of Eq. (4); None where no sample is open. A
    text-only sample has no noisy view: it is never open here, as in NRCA (nrca.py, has_image)."""
    from methods import model_forward
    from noise import noisy_pixel_values

    check_deltas(deltas)
    forward = model_forward(mllm.model)
    mllm.model.eval()
    sums = {delta: {"clean": 0.0, "noisy": 0.0, "above": 0, "n_open": 0} for delta in deltas}
    starts = range(0, len(dataset), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="confidence gap", unit="batch")
    for start in starts:
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = data.to_device(mllm.collate(items), mllm.device)
        if not has_pictures(batch):  # text-only samples alone: nothing to measure
            continue
        logits_mask, targets = answer_positions(batch["labels"])  # (B, T), (N,)
        clean_logits = forward(batch["attention_mask"], logits_mask, input_ids=batch["input_ids"],
                               pixel_values=batch["pixel_values"])  # (N, V)
        clean = to_grid(token_confidence(clean_logits.float(), targets)[0], logits_mask)  # (B, T) p_t
        for delta in deltas:
            generator = torch.Generator(device=batch["attention_mask"].device)
            generator.manual_seed(noise_seed * 1_000_003 + start)
            noisy_pixels = noisy_pixel_values(batch["pixel_values"], getattr(mllm.model, "config", None),
                                              delta=float(delta), stats=noise_stats, generator=generator)  # Eq. (2)
            noisy_logits = forward(batch["attention_mask"], logits_mask, input_ids=batch["input_ids"],
                                   pixel_values=noisy_pixels)  # (N, V)
            noisy = to_grid(token_confidence(noisy_logits.float(), targets)[0], logits_mask)  # (B, T) p~_t
            clean_mean, noisy_mean, is_open = sample_confidences(clean, noisy, logits_mask, min_open_tokens)
            if "has_image" in batch:
                is_open = is_open & batch["has_image"]
            total = sums[delta]
            total["clean"] += float(clean_mean[is_open].sum())
            total["noisy"] += float(noisy_mean[is_open].sum())
            total["above"] += int((noisy_mean > clean_mean)[is_open].sum())
            total["n_open"] += int(is_open.sum())
    result = {}
    for delta, total in sums.items():
        n = total["n_open"]
        result[delta] = {"clean_confidence": total["clean"] / n if n else None,
                         "noisy_confidence": total["noisy"] / n if n else None,
                         "share_noisy_above_clean": total["above"] / n if n else None,
                         "n_open": n, "n_records": len(dataset)}
    return result


def measure(mllm, sources: list[tuple[str, str, str]], image_folder, deltas=DEFAULT_DELTAS,
            limit: int = DEFAULT_LIMIT, batch_size: int = 16, progress: bool = True) -> dict:
    """The gap per training file: {"tasks": {NAME: {"task", "path", "deltas": {str(delta): {...}}}}}; `sources`
    are (task, name, path) as train.py's --train."""
    tasks = {}
    for task, name, path in sources:
        store = loader.checked_mix(mllm, [(task, name, path)], limit, 0, MAX_LENGTH)  # drawn as train.py draws them
        gaps = confidence_gap(mllm, loader.LazySamples(store, image_folder, mllm, MAX_LENGTH), deltas,
                              batch_size=batch_size, progress=progress)
        tasks[name] = {"task": task, "path": str(path), "deltas": {f"{delta:g}": row for delta, row in gaps.items()}}
    return {"deltas": [float(d) for d in deltas], "limit": limit, "noise_seed": NOISE_SEED, "tasks": tasks}


def format_gap(result: dict) -> str:
    lines = ["| data set | task | delta | open samples | clean confidence I | noisy confidence I~ | I - I~ | "
             "share with I~ > I |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in result["tasks"].items():
        for delta, row in entry["deltas"].items():
            if not row["n_open"]:
                lines.append(f"| {name} | {entry['task']} | {delta} | 0 | – | – | – | – (no open-response sample) |")
                continue
            lines.append(f"| {name} | {entry['task']} | {delta} | {row['n_open']} | {row['clean_confidence']:.3f} | "
                         f"{row['noisy_confidence']:.3f} | {row['clean_confidence'] - row['noisy_confidence']:+.3f} "
                         f"| {row['share_noisy_above_clean']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    import evaluate
    import models

    parser = argparse.ArgumentParser(prog="evaluate.py confidence-gap", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run folder (config.json + final/), model folder, tiny-llava or tiny-vila")
    parser.add_argument("--train", action="append", help="TASK:NAME=PATH training file (repeatable; default: the "
                                                         "run's --train, else the testbed mix in --data)")
    parser.add_argument("--data", help="testbed / synthetic data folder with train_caption.json and train_choice.json "
                                       "(default: the run's data_dir, else data/testbed-seed0)")
    parser.add_argument("--image-folder", help="folder the records' images are relative to (default: the data "
                                               "folder, or the first --train file's folder)")
    parser.add_argument("--delta", type=float, action="append", help="noisy ratio of Eq. (2b), repeatable "
                                                                     "(default: 0.5, the paper's)")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="records per training file")
    parser.add_argument("--batch-size", type=int, default=16, help="records per forward")
    parser.add_argument("--out", help="folder for confidence_gap.json (default: the run or model folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", *evaluate.DTYPES],
                        help="auto: bfloat16 on CUDA, float32 on CPU (the confidences are computed in float32)")
    args = parser.parse_args(argv)
    if args.limit < 1 or args.batch_size < 1:
        raise ValueError(f"confidence-gap: --limit {args.limit} and --batch-size {args.batch_size}: expected >= 1")
    check_deltas(args.delta or ())  # before the model loads
    device = evaluate.parse_device(args.device)
    model_path, config = evaluate.resolve_checkpoint(args.checkpoint)
    specs = args.train or config.get("train") or []
    if specs:
        import train

        sources = [train.parse_train_spec(spec) for spec in specs]
        image_folder = args.image_folder or config.get("image_folder") or str(Path(sources[0][2]).parent)
    else:
        root = Path(args.data or config.get("data_dir") or "data/testbed-seed0")
        sources = [(task, f"{root.name}-{task}", str(root / f"train_{task}.json")) for task in ("caption", "choice")]
        missing = [path for _, _, path in sources if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"confidence-gap: {missing[0]} does not exist: pass --train TASK:NAME=PATH or a "
                                    "--data folder with train_caption.json / train_choice.json")
        image_folder = args.image_folder or str(root)
    mllm = models.load_model(model_path, dtype=evaluate.model_dtype(args.dtype, device), device=device)
    result = measure(mllm, sources, image_folder, deltas=tuple(args.delta or DEFAULT_DELTAS), limit=args.limit,
                     batch_size=args.batch_size)
    result["model"] = str(model_path)
    out = Path(args.out or (args.checkpoint if Path(args.checkpoint).is_dir() else "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "confidence_gap.json").write_text(json.dumps(result, indent=1) + "\n")
    print(format_gap(result))
    print(f"wrote {out / 'confidence_gap.json'}")
    return result
