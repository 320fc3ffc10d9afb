"""Evaluation of a fine-tuned MLLM the way the paper reports it (Sec. 4.1, Tables 1 and 4, Fig. 1 and 3).

- Generation: greedy answers of the model for every test record (sharded over ranks under torchrun),
  scored with metrics.py: CIDEr (x100, the paper's scale) for captions, top-1 accuracy (%) from the parsed
  option letter for multiple choice, and their mean AVG. The Table 4 / Fig. 1 layouts are in reporting.py.
- `--noisy`: the same evaluation on Noisy Visual Mixup inputs (noise.py, Eq. 2b, delta = 0.5, the
  paper's per-image statistics) with a fixed seed per record (Fig. 3).
- `--attention`: where the first generated token's attention goes (Table 1): shares of the system
  tokens (BOS + system prompt), the visual (image) tokens and the rest of the prompt, averaged over
  heads, then over all layers and over the middle third of the layers (layers L//3 .. L-L//3-1).

Test split files (data.py's `make_synthetic` writes them; convert real test sets to this format):
a JSON list (or JSONL) of LLaVA records `{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n<question>"}, ...]}`; caption records add `"references": [str, ...]`, choice records add
`"answer": "B"` (a letter) and optionally `"options": [str, ...]` (else options are read from the
question's "A. text" lines). Ids are unique per file; predictions are matched to references by id.

Run folder (what train.py writes and this file reads):
    RUN/config.json          train.py's TrainConfig; read: "data_dir" (test splits), "train" (then --test
                             is required), "method" (row name), "eval_max_new_tokens"
    RUN/final/               the fine-tuned model (any kind), loadable by models.load_model; after
                             --lora-rank the base + a peft adapter (merged on load); a folder holding only
                             the adapter (adapter_config.json + adapter_model.safetensors) loads onto its base
    RUN/metrics.jsonl        one JSON object per line; lines {"epoch": k, "eval": {...eval.json...}} are
                             the per-epoch evaluations (Fig. 1); other lines (training steps) are ignored
    RUN/eval_epoch{k}/       eval.json + predictions of epoch k (fallback source for `plot`)
    RUN/eval.json            written by `python evaluate.py RUN` (eval_noisy.json with --noisy)
    RUN/predictions_{task}.jsonl   one line per record: id, prompt, prediction, references | answer
eval.json holds: cider (x100, the paper's scale), bleu4 / rouge_l / meteor (x100), accuracy (%), avg
(mean of cider and accuracy, the tables' AVG), counts n_caption, n_choice, n_empty_predictions,
n_unparsable, n_option_text_matched, n_correct, the dataset names, the noise settings, for caption records
that carry their picture's "scene" (the testbed's) grounding.py's grounded_* scores, and, with --attention,
attention_{task}_{system|prompt|visual}_{all|mid}. A data folder may also hold a validation split
(val_caption.json, val_choice.json; `--split val`), which the testbed's sweeps choose settings on.

Not here: SPICE, upstream/general benchmarks (forgetting, arXiv 2503.04543), the Fig. 3 bar plot
(`table --noisy` prints the numbers), evaluating a model sharded with FSDP (ranks generate
independently; train.py evaluates the unsharded model).

Run:
    python evaluate.py runs/embedded                     # RUN/final on RUN's test split; prints CIDEr, accuracy, AVG
    python evaluate.py runs/embedded --noisy --attention # Fig. 3 / Table 1 numbers
    python evaluate.py tiny-llava --data data/synthetic --out runs/zero-shot   # a zero-shot "run"
    python evaluate.py /ckpt/llava --test caption:flickr30k=/d/f30k_test.json \\
        --test choice:scienceqa=/d/sqa_test.json --image-folder /d/images --out runs/llava_zero_shot
    torchrun --nproc_per_node=8 evaluate.py RUN          # shards the test set over ranks
    python evaluate.py table runs/nrca runs/full_ft --zero-shot runs/zero-shot   # Table 4 layout
    python evaluate.py plot runs/nrca runs/full_ft --out fig1.png                # Fig. 1 curves
    python evaluate.py score predictions_caption.jsonl data/synthetic/test_caption.json
    python evaluate.py confidence-gap RUN_OR_MODEL [--train TASK:NAME=PATH ...] [--delta 0.5 ...] [--limit N]
                                                         # is the model less sure on the noisy view? (confidence_gap.py)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from metrics import LETTERS, caption_metrics, choice_metrics, exact_match, options_from_question
from reporting import format_table, plot_curves, read_eval, read_json, read_text, run_name

TASKS = ("caption", "choice", "open")  # open: prompts as written, scored by exact match and CIDEr
SPLITS = ("test", "val")  # a data folder's evaluation splits: {split}_caption.json, {split}_choice.json
ATTENTION_PARTS = ("system", "prompt", "visual")


def split_files(split: str = "test") -> dict[str, str]:
    """{task: file name} of one evaluation split in a data folder."""
    if split not in SPLITS:
        raise ValueError(f"evaluation split {split!r}: expected one of {SPLITS}")
    return {task: f"{split}_{task}.json" for task in TASKS[:2]}


# ---------------------------------------------------------------------------------------------
# Test splits
# ---------------------------------------------------------------------------------------------
def parse_test_spec(spec: str) -> tuple[str, str, str]:
    """'caption:flickr30k=/data/f30k_test.json' -> ('caption', 'flickr30k', '/data/f30k_test.json')."""
    match = re.fullmatch(r"(caption|choice|open):([^=]+)=(.+)", spec)
    if match is None:
        raise ValueError(f"--test {spec!r}: expected TASK:NAME=PATH with TASK caption, choice or open")
    return match.group(1), match.group(2), match.group(3)


def load_test_split(path: str | Path, task: str) -> list[dict]:
    """Read and validate a test split (JSON list or JSONL); returns records with "question" added."""
    import records as record_files  # the training files' parser: line and column of a malformed file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"test split {path} ({task}) does not exist")
    return validate_test_records(list(record_files.iter_records(path)), task, str(path))


def validate_test_records(records: list[dict], task: str, source: str = "records") -> list[dict]:
    """Check test records (see the module docstring) and return copies with "id" as str, "question"
    (the human turn without the image placeholder), "task" and, for choice records, "options"."""
    path = source
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty list of {task} records")
    seen, out = set(), []
    for i, record in enumerate(records):
        where = f"{path} record {i} (id {record.get('id')!r})" if isinstance(record, dict) else f"{path} record {i}"
        if not isinstance(record, dict) or "id" not in record or "image" not in record:
            raise ValueError(f"{where}: needs 'id' and 'image'")
        key = str(record["id"])
        if key in seen:
            raise ValueError(f"{where}: duplicate id {key!r}; predictions are matched to references by id")
        seen.add(key)
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns or turns[0].get("from") != "human":
            raise ValueError(f"{where}: 'conversations' must start with a human turn")
        if len(turns) > 2:
            raise ValueError(f"{where}: {len(turns)} turns; evaluation is single-turn (the human turn, optionally "
                             "followed by its answer)")
        question = str(turns[0].get("value", "")).replace("<image>", "", 1).strip()  # as data.question_and_answer
        record = {**record, "id": key, "question": question, "task": task}
        if task == "open" and not record.get("references"):  # the answer turn (or "answer") is the reference
            answer = record.get("answer") or (turns[1].get("value") if len(turns) == 2 else None)
            record["references"] = [str(answer)] if isinstance(answer, str) and answer.strip() else None
        if task in ("caption", "open"):
            refs = record.get("references")
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
                raise ValueError(f"{where}: {task} records need 'references', a non-empty list of answers (for open "
                                 "records, an answer turn or 'answer' will do)")
        else:
            answer = str(record.get("answer", "")).strip()
            if len(answer) != 1 or answer.upper() not in LETTERS:
                raise ValueError(f"{where}: choice records need 'answer', one option letter, got "
                                 f"{record.get('answer')!r}")
            options = record.get("options") or options_from_question(question)
            if options and LETTERS.index(answer.upper()) >= len(options):
                raise ValueError(f"{where}: answer {answer!r} is not among its {len(options)} options")
            record["options"] = list(options)
        out.append(record)
    return out


def resolve_splits(data, tests: list[str] | None = None, split: str = "test") -> list[tuple[str, str, str]]:
    """(task, name, path) of each evaluation split: --test specs, else DATA/{split}_caption.json and
    DATA/{split}_choice.json (whichever exist; names from the file stems)."""
    if tests:
        return [parse_test_spec(spec) for spec in tests]
    root, files = Path(data), split_files(split)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (expected {files['caption']} "
                                f"and/or {files['choice']} in it, or pass --test TASK:NAME=PATH)")
    splits = [(task, Path(name).stem, str(root / name)) for task, name in files.items() if (root / name).is_file()]
    if not splits:
        raise FileNotFoundError(f"data folder {root} has neither {files['caption']} nor {files['choice']}")
    return splits


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def _record_seed(noise_seed: int, record_id: str) -> int:
    """A noise seed per record from (seed, id): the noisy view of an image does not depend on batching,
    sharding or --limit."""
    return (noise_seed * 1_000_003 + zlib.crc32(record_id.encode())) % (2**63 - 1)


def system_token_ids(tokenizer) -> list[int]:
    """Tokens of BOS + the system prompt that start every prompt (Table 1's "system" span); BOS is
    prepended explicitly, as data.encode_conversation does."""
    from data import SYSTEM_PROMPT

    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + tokenizer(SYSTEM_PROMPT, add_special_tokens=False).input_ids


def attention_shares(attentions: list[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_token_id: int, n_system: int) -> torch.Tensor:
    """Shares of the first generated token's attention on system / prompt / visual tokens (Table 1).

    attentions: list over L layers of (B, heads, T), the last prompt position's attention over the
    left-padded prompt (MLLM.generate(output_attentions=True)). System = the first n_system real
    tokens (BOS + system prompt), visual = image tokens, prompt = every other real token.
    Returns (B, L, 3) shares per layer, averaged over heads, each row summing to 1."""
    per_layer = torch.stack([a.float().mean(1) for a in attentions], 1)  # (B, L, T), mean over heads
    real = attention_mask.bool()  # (B, T)
    position = real.long().cumsum(-1) - 1  # (B, T): index within the unpadded prompt
    system = real & (position < n_system)
    visual = real & (input_ids == image_token_id) & ~system
    prompt = real & ~system & ~visual
    masks = torch.stack([system, prompt, visual], -1).to(per_layer.dtype)  # (B, T, 3)
    shares = torch.einsum("blt,btk->blk", per_layer, masks)  # (B, L, 3)
    return shares / shares.sum(-1, keepdim=True).clamp_min(1e-12)


def middle_layers(n_layers: int) -> range:
    """The middle third of the decoder layers (Table 1 "Mid"): L//3 .. L-L//3-1 (32 layers -> 10..21)."""
    return range(n_layers // 3, n_layers - n_layers // 3)


def _load_images(records: list[dict], image_folder: Path):
    from data import open_image

    return [open_image(image_folder / r["image"], f"test record {r['id']!r} ({r['task']})") for r in records]


def _prompt(mllm, image, record: dict) -> dict:
    """mllm.prompt, a picture its processor refuses (Qwen2-VL: aspect ratio over 200) named by the test record."""
    from data import DataError

    try:
        return mllm.prompt(image, record["question"])
    except DataError as error:
        raise DataError(f"test record {record['id']!r} ({record['task']}): {error}") from None


def generate_answers(mllm, records: list[dict], image_folder: Path, batch_size: int = 8, max_new_tokens: int = 24,
                     noisy: bool = False, noise_seed: int = 0, delta: float = 0.5, attention: bool = False,
                     progress: bool = False) -> list[dict]:
    """Greedy answers for records (this rank's share): [{"id", "prediction", "prompt_tokens", ["attention"]}],
    for either kind of model (models.py's interface: mllm.prompt, data.collate, mllm.generate). noisy: each
    image's Noisy Visual Mixup view (Eq. 2b, its own statistics) with a seed per record, drawn on the CPU before
    the batch moves to the model's device, so the view does not depend on batching, sharding, --limit or the
    device. attention: {"all": [system, prompt, visual], "mid": [...]} for
    the first generated token (LLaVA-1.5 / VILA1.5)."""
    from tqdm import tqdm

    import data
    from noise import noisy_pixel_values

    device, config = mllm.device, getattr(mllm.model, "config", None)
    out = []
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, dynamic_ncols=True):
        batch = records[start:start + batch_size]
        items = [_prompt(mllm, image, record) for image, record in zip(_load_images(batch, image_folder), batch,
                                                                        strict=True)]
        if noisy:
            for item, record in zip(items, batch, strict=True):
                generator = torch.Generator().manual_seed(_record_seed(noise_seed, record["id"]))
                item["pixel_values"] = noisy_pixel_values(item["pixel_values"], config, delta=delta, stats="image",
                                                          generator=generator)
        prompts = data.to_device(mllm.collate(items, left=True), device)
        input_ids, attention_mask = prompts["input_ids"], prompts["attention_mask"]  # (B, T), left-padded
        result = mllm.generate(input_ids, attention_mask, prompts["pixel_values"], max_new_tokens=max_new_tokens,
                               output_attentions=attention)
        tokens, shares = result, None
        if attention:
            tokens, attentions = result
            system_ids = torch.tensor(system_token_ids(mllm.tokenizer), device=device)  # (n_system,)
            for record, row, mask in zip(batch, input_ids, attention_mask, strict=True):
                if not torch.equal(row[mask.bool()][:len(system_ids)], system_ids):
                    raise ValueError(f"--attention: the prompt of record {record['id']!r} does not start with the "
                                     "tokens of BOS + SYSTEM_PROMPT, so the system span cannot be located")
            shares = attention_shares(attentions, input_ids, attention_mask, mllm.image_token_id, len(system_ids))
            mid = middle_layers(shares.shape[1])
            shares = {"all": shares.mean(1).tolist(), "mid": shares[:, mid.start:mid.stop].mean(1).tolist()}
        texts = mllm.tokenizer.batch_decode(tokens.cpu(), skip_special_tokens=True)
        for i, (record, text) in enumerate(zip(batch, texts, strict=True)):
            item = {"id": record["id"], "prediction": text.strip(), "prompt_tokens": len(items[i]["input_ids"])}
            if shares is not None:
                item["attention"] = {"all": shares["all"][i], "mid": shares["mid"][i]}
            out.append(item)
    return out


def _gather(items: list, world_size: int) -> list:
    if world_size == 1:
        return list(items)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def evaluate_model(mllm, data=None, out_dir=None, tests: list[str] | None = None, image_folder=None,
                   batch_size: int = 8, max_new_tokens: int = 24, limit: int = 0, noisy: bool = False,
                   noise_seed: int = 0, delta: float = 0.5, attention: bool = False, rank: int = 0,
                   world_size: int = 1, bleu: bool = True, rouge: bool = True, meteor: bool = False,
                   match_text: bool = True, progress: bool = False, meta: dict | None = None,
                   split: str = "test") -> dict:
    """Generate on the test split(s) and score them; every rank returns the same flat result dict
    (what eval.json holds). With world_size > 1 (an initialised process group) rank r generates records
    r::world_size of each split, the answers are gathered with all_gather_object, and rank 0 scores
    the union (CIDEr's idf needs the whole set) and writes out_dir/eval[_noisy].json and
    out_dir/predictions_{task}[_noisy].jsonl.

    data: a folder with test_caption.json / test_choice.json, or a dict {task: records} (records as
    in the test files); tests: TASK:NAME=PATH specs instead; image_folder: where record["image"] paths
    are relative to (default: each test file's folder, i.e. the data folder; "." for given records).
    limit: first N records per split (0: all). meta: extra JSON fields recorded first in eval.json (e.g.
    the model path). split: which of a data folder's splits, "test" or "val" (the testbed's validation split).
    Caption records that carry their picture's "scene" (the testbed's) also get grounding.py's scores."""
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"evaluate_model: world_size={world_size} needs an initialised torch.distributed "
                           "process group (torchrun)")
    if isinstance(data, dict):
        splits = [(task, task, None) for task in data]
    else:
        splits = resolve_splits(data, tests, split)
    suffix = "_noisy" if noisy else ""
    result = {**(meta or {}), "noisy": noisy, "noise_seed": noise_seed if noisy else None,
              "delta": delta if noisy else None, "max_new_tokens": max_new_tokens}
    predictions_files = {}
    for task, name, path in splits:
        if task not in TASKS:
            raise ValueError(f"evaluate_model: unknown task {task!r}; expected one of {TASKS}")
        if path is None:
            records = validate_test_records(data[task], task, f"data[{task!r}]")
            folder = Path(image_folder or ".")
        else:
            records = load_test_split(path, task)
            folder = Path(image_folder) if image_folder else Path(path).parent
        if limit:
            records = records[:limit]
        mine = generate_answers(mllm, records[rank::world_size], folder, batch_size, max_new_tokens, noisy,
                                noise_seed, delta, attention, progress=progress and rank == 0)
        answers = _gather(mine, world_size)
        if rank != 0:
            continue
        by_id = {}
        for item in answers:
            if item["id"] in by_id:
                raise RuntimeError(f"evaluate_model: id {item['id']!r} was generated twice across ranks")
            by_id[item["id"]] = item
        if set(by_id) != {r["id"] for r in records}:
            raise RuntimeError(f"evaluate_model: gathered {len(by_id)} answers for {len(records)} {task} records")
        result[f"{task}_dataset"] = name
        result.update(_score_task(task, records, by_id, bleu, rouge, meteor, match_text))
        if attention:
            result.update(_attention_summary(task, [by_id[r["id"]]["attention"] for r in records]))
        predictions_files[task] = [_prediction_line(task, record, by_id[record["id"]]) for record in records]
    if rank == 0:
        result["n_empty_predictions"] = sum(not line["prediction"] for lines in predictions_files.values()
                                            for line in lines)  # scored 0 / counted unparsable
        if "cider" in result and "accuracy" in result:
            result["avg"] = (result["cider"] + result["accuracy"]) / 2  # the tables' AVG column
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            for task, lines in predictions_files.items():
                with (out_dir / f"predictions_{task}{suffix}.jsonl").open("w") as f:
                    f.writelines(json.dumps(line) + "\n" for line in lines)
            (out_dir / f"eval{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    if world_size > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def grounded(predictions: dict, records: list[dict]) -> dict:
    """grounding.py's phrasing-invariant scores for the caption records that carry a scene ({} if none does)."""
    scenes = {r["id"]: r["scene"] for r in records if isinstance(r.get("scene"), dict)}
    if not scenes:
        return {}
    import grounding

    return grounding.grounded_scores(predictions, scenes)


def _score_task(task: str, records: list[dict], by_id: dict, bleu: bool, rouge: bool, meteor: bool,
                match_text: bool) -> dict:
    predictions = {r["id"]: by_id[r["id"]]["prediction"] for r in records}
    if task == "caption":
        scores = caption_metrics(predictions, {r["id"]: r["references"] for r in records}, bleu=bleu, rouge=rouge,
                                 meteor=meteor, allow_empty=True)
        out = {"cider": 100 * scores["cider"], "n_caption": len(records)}
        for key in ("bleu4", "rouge_l", "meteor"):
            if key in scores:
                out[key] = 100 * scores[key]
        for record in records:
            by_id[record["id"]]["cider"] = scores["cider_per_id"][record["id"]]
        return {**out, **grounded(predictions, records)}
    if task == "open":
        references = {r["id"]: r["references"] for r in records}
        scores = caption_metrics(predictions, references, bleu=False, rouge=False, meteor=False, allow_empty=True)
        matched = exact_match(predictions, references)
        for record in records:
            by_id[record["id"]].update(cider=scores["cider_per_id"][record["id"]],
                                       exact=matched["per_id"][record["id"]])
        return {"open_exact_match": matched["exact_match"], "open_cider": 100 * scores["cider"],
                "n_open_answers": len(records)}
    scores = choice_metrics(predictions, {r["id"]: r["answer"] for r in records},
                            {r["id"]: r["options"] for r in records}, match_text=match_text)
    for record in records:
        by_id[record["id"]].update(scores["per_id"][record["id"]])
    return {key: value for key, value in scores.items() if key != "per_id"}


def _attention_summary(task: str, shares: list[dict]) -> dict:
    out = {}
    for span in ("all", "mid"):
        for k, part in enumerate(ATTENTION_PARTS):
            out[f"attention_{task}_{part}_{span}"] = sum(s[span][k] for s in shares) / len(shares)
    return out


def _prediction_line(task: str, record: dict, item: dict) -> dict:
    line = {"id": record["id"], "prompt": record["question"], "prediction": item["prediction"]}
    if task == "caption":
        line.update(references=record["references"], cider=item.get("cider"))
    elif task == "open":
        line.update(references=record["references"], exact=item.get("exact"), cider=item.get("cider"))
    else:
        line.update(answer=record["answer"].upper(), letter=item.get("letter"), correct=item.get("correct"))
    if "attention" in item:
        line["attention"] = item["attention"]
    return line


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str) -> tuple[str, dict]:
    """A run folder (config.json + final/) -> (RUN/final, config); a model folder or a built-in name
    ("tiny-llava", "tiny-vila") -> (path, {}). Missing things raise naming what is missing."""
    import models

    if path in models.BUILT_IN:
        return path, {}
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint or run folder {folder} does not exist")
    if (folder / "final").is_dir():
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        return str(folder / "final"), config
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json")
        if "out_dir" in config and "method" in config:  # train.py's TrainConfig, not a model config
            raise FileNotFoundError(f"run folder {folder} has no final/ model (training unfinished? "
                                    f"checkpoint-* folders hold trainable tensors only, not a loadable model)")
        return str(folder), {}
    if (folder / "adapter_config.json").is_file():  # a peft adapter alone (train.py --lora-rank): onto its base
        return str(folder), {}
    raise FileNotFoundError(f"{folder} is neither a run folder (config.json + final/) nor a model folder "
                            "(a checkpoint's config.json) nor a LoRA adapter (adapter_config.json)")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def check_options(args) -> torch.device:
    """main_evaluate's option ranges, before any model loads; returns the device."""
    checks = [(args.batch_size >= 1, f"--batch-size {args.batch_size}: expected >= 1"),
              (args.max_new_tokens is None or args.max_new_tokens >= 1,
               f"--max-new-tokens {args.max_new_tokens}: expected >= 1"),
              (args.limit >= 0, f"--limit {args.limit}: expected >= 0 (0: all records)"),
              (0 <= args.delta <= 1, f"--delta {args.delta}: expected in [0, 1] (Eq. 2b)")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; expected a folder for eval.json and the predictions")
    return parse_device(args.device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_device(name: str) -> torch.device:
    """--device of the command-line tools: cpu or cuda[:N], one that exists here (else a named error)."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r}: not a device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); pass --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected cpu or cuda[:N]")
    return device


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype of the command-line tools: auto is bfloat16 on CUDA, float32 on CPU."""
    return DTYPES.get(name, torch.bfloat16 if device.type == "cuda" else torch.float32)


def _summary_line(result: dict) -> str:
    parts = []
    if "cider" in result:
        parts.append(f"CIDEr {result['cider']:.2f} ({result.get('caption_dataset')}, n={result['n_caption']})")
    if "accuracy" in result:
        parts.append(f"accuracy {result['accuracy']:.2f} ({result.get('choice_dataset')}, n={result['n_choice']}, "
                     f"unparsable={result['n_unparsable']})")
    if "avg" in result:
        parts.append(f"AVG {result['avg']:.2f}")
    if "open_exact_match" in result:
        parts.append(f"open: exact match {result['open_exact_match']:.2f} %, CIDEr {result['open_cider']:.2f} "
                     f"({result.get('open_dataset')}, n={result['n_open_answers']})")
    if "grounded_all" in result:
        parts.append(f"grounded: all attributes right {result['grounded_all']:.1f} %, fabricated detail "
                     f"{result['grounded_fabricated']:.1f} %")
    parts.append(f"empty predictions {result.get('n_empty_predictions', 0)}")
    return " | ".join(parts)


def main_evaluate(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a run folder or a checkpoint.")
    parser.add_argument("checkpoint", help="run folder (config.json + final/), model folder, tiny-llava or tiny-vila")
    parser.add_argument("--data", help="folder with test_caption.json / test_choice.json (default: the run's "
                                       "config.json data_dir)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="which split of --data: test, or val (the "
                                                                        "testbed's validation split)")
    parser.add_argument("--test", action="append", help="TASK:NAME=PATH test split instead of --data (repeatable)")
    parser.add_argument("--image-folder", help="folder record images are relative to (default: the data folder)")
    parser.add_argument("--out", help="where eval.json and predictions go (default: the run/checkpoint folder)")
    parser.add_argument("--noisy", action="store_true", help="Noisy Visual Mixup inputs (Fig. 3)")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noisy inputs")
    parser.add_argument("--delta", type=float, default=0.5, help="noisy ratio, Eq. (2b)")
    parser.add_argument("--attention", action="store_true", help="first-token attention shares (Table 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call on one rank")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="generation length (default: the run's "
                                                                         "eval_max_new_tokens, else 24)")
    parser.add_argument("--limit", type=int, default=0, help="first N records per split (0: all)")
    parser.add_argument("--meteor", action="store_true", help="also METEOR (starts a 2 GB java process)")
    parser.add_argument("--no-text-match", action="store_true", help="no exact option-text fallback for letters")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)
    import models

    device = check_options(args)
    model_path, config = resolve_checkpoint(args.checkpoint)
    if config.get("train") and not (args.data or args.test):
        raise ValueError(f"{args.checkpoint} was trained on --train datasets {config['train']}; pass their test "
                         "splits with --test TASK:NAME=PATH (and --image-folder)")
    data = args.data or config.get("data_dir")
    if data is None and not args.test:
        raise ValueError(f"no test data: pass --data DIR or --test TASK:NAME=PATH ({args.checkpoint} has no "
                         "config.json with data_dir)")
    out = args.out or (args.checkpoint if Path(args.checkpoint).is_dir() else None)
    if out is None:
        raise ValueError(f"pass --out DIR for {args.checkpoint}")
    world, rank, local_rank = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0),
                                                                      ("LOCAL_RANK", 0)))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        mllm = models.load_model(model_path, dtype=model_dtype(args.dtype, device), device=device)
        result = evaluate_model(
            mllm, data, out_dir=out if rank == 0 else None, tests=args.test,
            image_folder=args.image_folder, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens or config.get("eval_max_new_tokens") or 24, limit=args.limit,
            noisy=args.noisy, noise_seed=args.noise_seed, delta=args.delta, attention=args.attention, rank=rank,
            world_size=world, meteor=args.meteor, match_text=not args.no_text_match, progress=True,
            meta={"model": model_path, "data": args.test or str(data), "split": None if args.test else args.split},
            split=args.split)
        if rank == 0:
            print(_summary_line(result))
            if args.attention:
                for key, value in result.items():
                    if key.startswith("attention_"):
                        print(f"{key} {value:.4f}")
        if world > 1:
            dist.barrier()  # no rank tears gloo/NCCL down while another still has messages in flight to it
        return result
    finally:
        if world > 1:
            dist.destroy_process_group()


def main_table(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="evaluate.py table", description="Table 4-style markdown table.")
    parser.add_argument("runs", nargs="+", help="run folders (or eval .json files)")
    parser.add_argument("--zero-shot", action="append", default=[], help="zero-shot run (repeatable, one per "
                                                                          "dataset pair)")
    parser.add_argument("--names", nargs="+", help="row names (default: config method + folder name)")
    parser.add_argument("--noisy", action="store_true", help="read eval_noisy.json (Fig. 3 numbers)")
    args = parser.parse_args(argv)
    names = args.names or [run_name(r) for r in args.runs]
    if len(names) != len(args.runs):
        raise ValueError(f"table: {len(names)} names for {len(args.runs)} runs")
    table = format_table([(n, read_eval(r, args.noisy)) for n, r in zip(names, args.runs, strict=True)],
                         [read_eval(z, args.noisy) for z in args.zero_shot])
    print(table)
    return table


def main_plot(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="evaluate.py plot", description="Fig. 1-style metric-vs-epoch curves.")
    parser.add_argument("runs", nargs="+", help="run folders with per-epoch evals")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--metrics", nargs="+", default=["cider", "accuracy", "avg"])
    parser.add_argument("--zero-shot", help="zero-shot run drawn at epoch 0")
    parser.add_argument("--names", nargs="+", help="legend names")
    args = parser.parse_args(argv)
    out = plot_curves(args.runs, args.out, tuple(args.metrics), args.zero_shot, args.names)
    print(f"wrote {out}")
    return out


def read_predictions(path: str | Path) -> dict[str, str]:
    """{id: prediction} from a predictions JSONL (evaluate_model's predictions_{task}.jsonl, or a user's);
    a malformed line stops with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist")
    content = read_text(path)
    try:
        whole = json.loads(content)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        raise ValueError(f"{path}: a JSON array; expected JSON lines, one object with 'id' and 'prediction' per line "
                         "(what evaluate.py writes in predictions_{task}.jsonl)")
    predictions = {}
    for n, text in enumerate(content.splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {n}: not JSON ({error.msg} at column {error.colno}); "
                             "expected one object with 'id' and 'prediction' per line") from None
        if not isinstance(line, dict) or "id" not in line or "prediction" not in line:
            raise ValueError(f"{path} line {n}: needs 'id' and 'prediction' (one JSON object per line)")
        if not isinstance(line["prediction"], str):
            raise ValueError(f"{path} line {n}: 'prediction' is a {type(line['prediction']).__name__} "
                             f"({line['prediction']!r}), expected the model's text")
        if not isinstance(line["id"], (str, int)) or isinstance(line["id"], bool):
            raise ValueError(f"{path} line {n}: 'id' is a {type(line['id']).__name__}, expected a string or number")
        if str(line["id"]) in predictions:
            raise ValueError(f"{path} line {n}: duplicate id {line['id']!r}")
        predictions[str(line["id"])] = line["prediction"]
    return predictions


def main_score(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="evaluate.py score",
                                     description="Score a predictions JSONL (id, prediction) against a test split.")
    parser.add_argument("predictions", help="JSONL with 'id' and 'prediction' per line")
    parser.add_argument("references", help="test split JSON (caption records with references / choice with answer)")
    parser.add_argument("--task", choices=TASKS, help="default: caption if the split has 'references'")
    parser.add_argument("--meteor", action="store_true")
    parser.add_argument("--allow-empty", action="store_true", help="score empty captions as 0 instead of stopping")
    args = parser.parse_args(argv)
    predictions = read_predictions(args.predictions)
    task = args.task or ("caption" if "references" in (_first_record(args.references) or {}) else "choice")
    records = load_test_split(args.references, task)
    if task == "caption":
        scores = caption_metrics(predictions, {r["id"]: r["references"] for r in records}, meteor=args.meteor,
                                 allow_empty=args.allow_empty)
        result = {**{k: 100 * v for k, v in scores.items() if k != "cider_per_id"}, **grounded(predictions, records)}
    else:
        scores = choice_metrics(predictions, {r["id"]: r["answer"] for r in records},
                                {r["id"]: r["options"] for r in records})
        result = {k: v for k, v in scores.items() if k != "per_id"}
    print(json.dumps(result, indent=2))
    return result


def _first_record(path: str):
    """The first record of a test split, to guess its task (None if the file cannot say; load_test_split
    then names the problem)."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return records[0] if isinstance(records, list) and records and isinstance(records[0], dict) else None


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    import confidence_gap

    commands = {"table": main_table, "plot": main_plot, "score": main_score, "confidence-gap": confidence_gap.main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return main_evaluate(argv)


if __name__ == "__main__":
    import cli

    cli.run(main)
