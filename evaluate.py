"""Evaluation of a fine-tuned MLLM the way the paper reports it (Sec. 4.1, Tables 1 and 4, Fig. 1 and 3).

- Captioning (open-response): greedy captions scored with CIDEr against all references of each image,
  using pycocoevalcap's `PTBTokenizer` + `Cider`. That `Cider` class *is* CIDEr-D (Vedantam et al.,
  2015): tf-idf weighted 1..4-gram vectors without stemming, the candidate's n-gram counts clipped at
  the reference's (`min(vec_hyp, vec_ref)`), a Gaussian length penalty exp(-(l_hyp - l_ref)^2 / (2 * 6^2)),
  averaged over references and n, times 10; document frequencies come from the references of the set
  being scored (so a score depends on the whole set: sharded runs are scored on the gathered union).
  COCO-caption reports this number as "CIDEr" and the paper's tables print it times 100 (76.00 = 0.76).
  Optional BLEU-4, ROUGE-L and METEOR (METEOR starts a 2 GB java process; off by default).
  `COCOEvalCap.evaluate()` is never called (its SPICE step downloads models). References keep their
  own structure: a record's "references" list is used as is (the released script splits at commas).
- Multiple choice (fixed-choice): top-1 accuracy from the option letter the model writes
  (`parse_choice`); when no letter can be read, IconQA-style exact match of the answer text against
  one option (`match_option_text`); anything else is wrong and counted as unparsable.
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
    RUN/final/               the fine-tuned model, loadable by models.load_model
    RUN/metrics.jsonl        one JSON object per line; lines {"epoch": k, "eval": {...eval.json...}} are
                             the per-epoch evaluations (Fig. 1); other lines (training steps) are ignored
    RUN/eval_epoch{k}/       eval.json + predictions of epoch k (fallback source for `plot`)
    RUN/eval.json            written by `python evaluate.py RUN` (eval_noisy.json with --noisy)
    RUN/predictions_{task}.jsonl   one line per record: id, prompt, prediction, references | answer
eval.json holds: cider (x100, the paper's scale), bleu4 / rouge_l / meteor (x100), accuracy (%), avg
(mean of cider and accuracy, the tables' AVG), counts n_caption, n_choice, n_empty_predictions,
n_unparsable, n_option_text_matched, n_correct, the dataset names, the noise settings and, with
--attention, attention_{task}_{system|prompt|visual}_{all|mid}.

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

TASKS = ("caption", "choice")
DEFAULT_SPLIT_FILES = {"caption": "test_caption.json", "choice": "test_choice.json"}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ATTENTION_PARTS = ("system", "prompt", "visual")
# Control characters and Unicode line/paragraph separators become spaces before java's PTBTokenizer
# (-preserveLines) sees them: a line break inside a caption would shift every following caption onto the
# wrong image, and other control characters (random-weight models emit them) are "untokenizable".
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# ---------------------------------------------------------------------------------------------
# Captioning metrics
# ---------------------------------------------------------------------------------------------
def check_matching_ids(what: str, predictions: dict, expected: dict, expected_name: str, lacking: str) -> None:
    """Predictions are matched to references/answers by id, never by position: the id sets must be equal."""
    missing = sorted(set(expected) - set(predictions), key=str)
    extra = sorted(set(predictions) - set(expected), key=str)
    if missing or extra:
        raise ValueError(f"{what}: prediction ids do not match {expected_name} ids: {len(missing)} {expected_name} "
                         f"id(s) without a prediction {missing[:10]}, {len(extra)} prediction id(s) without "
                         f"{lacking} {extra[:10]}")
    if not predictions:
        raise ValueError(f"{what}: no predictions to score")


def _check_caption_inputs(predictions: dict, references: dict, allow_empty: bool) -> None:
    """Ids must match exactly (never by position); predictions non-empty strings; references non-empty lists."""
    if not isinstance(predictions, dict) or not isinstance(references, dict):
        raise TypeError(f"caption metrics: predictions and references must be dicts keyed by id, got "
                        f"{type(predictions).__name__} and {type(references).__name__}")
    check_matching_ids("caption metrics", predictions, references, "reference", "references")
    for key, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise TypeError(f"caption metrics: prediction of id {key!r} must be a str, got {type(prediction).__name__}")
        if not allow_empty and not prediction.strip():
            raise ValueError(f"caption metrics: empty prediction for id {key!r} (pass allow_empty=True to score "
                             "empty captions as 0)")
    for key, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)) or not refs:
            raise ValueError(f"caption metrics: references of id {key!r} must be a non-empty list of str, got {refs!r}")
        for ref in refs:
            if not isinstance(ref, str) or not ref.strip():
                raise ValueError(f"caption metrics: reference of id {key!r} is empty or not a str: {ref!r}")


def ptb_tokenize(captions: dict) -> dict:
    """{key: [caption, ...]} -> {key: [tokenized lower-case caption without punctuation, ...]} with
    pycocoevalcap's PTBTokenizer (one java call). Empty captions stay empty strings."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    cleaned = {key: [_LINE_BREAKS.sub(" ", c).strip() for c in caps] for key, caps in captions.items()}
    to_tokenize = {key: [{"caption": c} for c in caps] for key, caps in cleaned.items() if any(caps)}
    tokenized = PTBTokenizer().tokenize(to_tokenize) if to_tokenize else {}
    out = {}
    for key, caps in cleaned.items():
        got = tokenized.get(key, [""] * len(caps))
        if len(got) != len(caps):
            raise RuntimeError(f"PTBTokenizer returned {len(got)} captions for key {key!r}, expected {len(caps)}")
        out[key] = got
    return out


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]], bleu: bool = True,
                    rouge: bool = True, meteor: bool = False, allow_empty: bool = False) -> dict:
    """Score captions against references, matched by id. Returns raw pycocoevalcap scores (CIDEr on its
    own scale, e.g. 0.76; multiply by 100 for the paper's tables):
    {"cider", "cider_per_id": {id: score}, ["bleu4"], ["rouge_l"], ["meteor"]}.

    Empty predictions raise ValueError naming the id unless allow_empty=True, which scores them 0
    (an empty candidate has no n-grams) while their references still count in CIDEr's idf."""
    from pycocoevalcap.cider.cider import Cider

    _check_caption_inputs(predictions, references, allow_empty)
    ids = sorted(predictions, key=str)
    both = ptb_tokenize({**{("prediction", i): [predictions[i]] for i in ids},
                         **{("references", i): list(references[i]) for i in ids}})
    res = {i: both[("prediction", i)] for i in ids}  # {id: [candidate]}
    gts = {i: both[("references", i)] for i in ids}  # {id: [reference, ...]}
    score, per_image = Cider().compute_score(gts, res)
    out = {"cider": float(score), "cider_per_id": {i: float(s) for i, s in zip(ids, per_image, strict=True)}}
    if bleu:
        from pycocoevalcap.bleu.bleu import Bleu

        out["bleu4"] = float(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    if rouge:
        from pycocoevalcap.rouge.rouge import Rouge

        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer
    return out


def cider(predictions: dict[str, str], references: dict[str, list[str]],
          allow_empty: bool = False) -> tuple[float, dict[str, float]]:
    """CIDEr-D (pycocoevalcap `Cider`, see the module docstring) of captions against all references of
    each image, after PTB tokenisation. Returns (corpus score, {id: per-image score}) on pycocoevalcap's
    scale (x100 for the paper's tables). Ids must match exactly; an empty prediction is an error."""
    out = caption_metrics(predictions, references, bleu=False, rouge=False, allow_empty=allow_empty)
    return out["cider"], out["cider_per_id"]


# ---------------------------------------------------------------------------------------------
# Multiple-choice metrics
# ---------------------------------------------------------------------------------------------
# A whole answer that is only a letter: "B", "B.", "B)", "B:", "(B)"; lower case accepted here only
# ("b"), because a lone letter cannot be the article "a".
_BARE_LETTER = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])[.):]?)$")
# A capital letter with its option text: "B. a red circle", "B) ...", "B: ...", "(B) ...". "A dog" is
# not an answer (article), nor is "B.C".
_LETTER_WITH_TEXT = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.):])\s+\S")
# "The answer is B.", "the correct answer is (C)", "Answer: D" anywhere in the text (first one wins);
# the letter must be a capital not followed by another letter ("The answer is a dog" -> None).
_ANSWER_IS = re.compile(r"(?i:\banswer\s*(?:is\s*:?|:))\s*\(?([A-Z])(?![A-Za-z])")


def parse_choice(text: str, n_options: int) -> str | None:
    """The option letter a model's answer names, or None (unparsable: counted wrong).

    Accepted, after stripping whitespace: a bare letter ("B", "B.", "B)", "(B)", also lower case "b"),
    a capital letter followed by its option text ("B. a red circle", "(B) red", "B) red", "B: red"), or
    "... answer is B" / "Answer: (B)" anywhere. The letter must be one of the first `n_options`
    ("E" with 4 options is None). Everything else, e.g. "A dog", "I think B", "A, B", is None."""
    if not isinstance(text, str):
        raise TypeError(f"parse_choice: text must be a str, got {type(text).__name__}")
    if not isinstance(n_options, int) or not 1 <= n_options <= len(LETTERS):
        raise ValueError(f"parse_choice: n_options must be an int in [1, 26], got {n_options!r}")
    text = text.strip()
    match = _BARE_LETTER.match(text) or _LETTER_WITH_TEXT.match(text) or _ANSWER_IS.search(text)
    if match is None:
        return None
    letter = next(g for g in match.groups() if g).upper()
    return letter if LETTERS.index(letter) < n_options else None


def _normalise_option(text: str) -> str:
    return " ".join(text.strip().rstrip(".").strip().casefold().split())


def match_option_text(text: str, options: list[str]) -> str | None:
    """IconQA-style exact match: the letter of the one option whose text equals the answer (case,
    surrounding whitespace and a final period ignored), or None when none or several options match."""
    answer = _normalise_option(text)
    if not answer:
        return None
    hits = [LETTERS[i] for i, option in enumerate(options) if _normalise_option(str(option)) == answer]
    return hits[0] if len(hits) == 1 else None


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$")


_INLINE_OPTION = re.compile(r"\(([A-Z])\)\s*(.*?)(?=\s*\([A-Z]\)|$)", re.DOTALL)


def options_from_question(question: str) -> list[str]:
    """Options written as consecutive lines "A. text" / "(A) text" / "A) text" starting at A, else inline
    after "Options:" as "(A) text (B) text" (LLaVA's ScienceQA prompt); [] if none."""
    options = []
    for line in question.splitlines():
        match = _OPTION_LINE.match(line)
        if match and match.group(1) == LETTERS[len(options)]:
            options.append(match.group(2))
    if not options and "Options:" in question:
        inline = question.split("Options:", 1)[1].split("\n", 1)[0]
        for letter, text in _INLINE_OPTION.findall(inline):
            if letter != LETTERS[len(options)]:
                break
            options.append(text.strip())
    return options


def choice_metrics(predictions: dict[str, str], answers: dict[str, str],
                   options: dict[str, list[str]] | None = None, match_text: bool = True) -> dict:
    """Top-1 accuracy (%) of letters parsed from predictions against answer letters, matched by id.
    options[id] (list of option texts) sets n_options and allows the exact-text fallback; without
    options any letter A-Z is accepted. Returns accuracy, n_choice, n_correct, n_unparsable,
    n_option_text_matched and per_id {id: {"letter", "correct"}}."""
    check_matching_ids("choice metrics", predictions, answers, "answer", "an answer")
    options = options or {}
    per_id, n_correct, n_unparsable, n_text = {}, 0, 0, 0
    for key in sorted(predictions, key=str):
        answer = str(answers[key]).strip().upper()
        if len(answer) != 1 or answer not in LETTERS:
            raise ValueError(f"choice metrics: answer of id {key!r} must be one letter A-Z, got {answers[key]!r}")
        opts = options.get(key) or []
        letter = parse_choice(predictions[key], len(opts) if opts else len(LETTERS))
        if letter is None and match_text and opts:
            letter = match_option_text(predictions[key], opts)
            n_text += letter is not None
        n_unparsable += letter is None
        correct = letter == answer
        n_correct += correct
        per_id[key] = {"letter": letter, "correct": correct}
    return {"accuracy": 100.0 * n_correct / len(predictions), "n_choice": len(predictions), "n_correct": n_correct,
            "n_unparsable": n_unparsable, "n_option_text_matched": n_text, "per_id": per_id}


# ---------------------------------------------------------------------------------------------
# Test splits
# ---------------------------------------------------------------------------------------------
def parse_test_spec(spec: str) -> tuple[str, str, str]:
    """'caption:flickr30k=/data/f30k_test.json' -> ('caption', 'flickr30k', '/data/f30k_test.json')."""
    match = re.fullmatch(r"(caption|choice):([^=]+)=(.+)", spec)
    if match is None:
        raise ValueError(f"--test {spec!r}: expected TASK:NAME=PATH with TASK caption or choice")
    return match.group(1), match.group(2), match.group(3)


def load_test_split(path: str | Path, task: str) -> list[dict]:
    """Read and validate a test split (JSON list or JSONL); returns records with "question" added."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"test split {path} ({task}) does not exist")
    text = path.read_text()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: neither a JSON list nor JSONL ({error})") from None
    return validate_test_records(records, task, str(path))


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
        question = str(turns[0].get("value", "")).replace("<image>", "", 1).strip()  # as data.question_and_answer
        record = {**record, "id": key, "question": question, "task": task}
        if task == "caption":
            refs = record.get("references")
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
                raise ValueError(f"{where}: caption records need 'references', a non-empty list of captions")
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


def resolve_splits(data, tests: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(task, name, path) of each test split: --test specs, else DATA/test_caption.json and
    DATA/test_choice.json (whichever exist; names from the file stems)."""
    if tests:
        return [parse_test_spec(spec) for spec in tests]
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (expected {DEFAULT_SPLIT_FILES['caption']} "
                                f"and/or {DEFAULT_SPLIT_FILES['choice']} in it, or pass --test TASK:NAME=PATH)")
    splits = [(task, Path(name).stem, str(root / name)) for task, name in DEFAULT_SPLIT_FILES.items()
              if (root / name).is_file()]
    if not splits:
        raise FileNotFoundError(f"data folder {root} has neither {DEFAULT_SPLIT_FILES['caption']} nor "
                                f"{DEFAULT_SPLIT_FILES['choice']}")
    return splits


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def _record_seed(noise_seed: int, record_id: str) -> int:
    """A noise seed per record from (seed, id): the noisy view of an image does not depend on batching,
    sharding or --limit."""
    return (noise_seed * 1_000_003 + zlib.crc32(record_id.encode())) % (2**63 - 1)


def _noisy(pixel_values: torch.Tensor, ids: list[str], noise_seed: int, delta: float) -> torch.Tensor:
    from noise import noisy_mixup

    out = []
    for row, record_id in zip(pixel_values, ids, strict=True):
        generator = torch.Generator(device=row.device).manual_seed(_record_seed(noise_seed, record_id))
        out.append(noisy_mixup(row[None], delta=delta, stats="image", generator=generator))  # Eq. (2b), (1, C, H, W)
    return torch.cat(out)  # (B, C, H, W)


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


def _prompt_ids(mllm, question: str, max_length: int = 1_000_000) -> list[int]:
    """Prompt token ids exactly as training conditions on them: data.py's tokenize_conversation (vicuna_v1
    template, image placeholder expanded to num_image_tokens image tokens) of the question with a
    placeholder answer, cut before the first label token (so the prompt ends at "ASSISTANT:")."""
    import data

    input_ids, labels = data.tokenize_conversation(question, "A", mllm.tokenizer, mllm.num_image_tokens,
                                                   mllm.image_token_id, max_length)
    answer = (labels != -100).nonzero()
    if len(answer) == 0:
        raise ValueError(f"data.tokenize_conversation left no answer label for question {question[:80]!r}")
    return input_ids[: int(answer[0])].tolist()


def _load_images(records: list[dict], image_folder: Path):
    from PIL import Image

    images = []
    for record in records:
        path = image_folder / record["image"]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} of test record {record['id']!r} ({record['task']}) does not exist")
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def generate_answers(mllm, records: list[dict], image_folder: Path, batch_size: int = 8, max_new_tokens: int = 24,
                     noisy: bool = False, noise_seed: int = 0, delta: float = 0.5, attention: bool = False,
                     progress: bool = False) -> list[dict]:
    """Greedy answers for records (this rank's share): [{"id", "prediction", "prompt_tokens", ["attention"]}].
    attention: {"all": [system, prompt, visual], "mid": [...]} for the first generated token."""
    from tqdm import tqdm

    import data

    device = mllm.device
    system_ids = torch.tensor(system_token_ids(mllm.tokenizer), device=device)  # (n_system,)
    out = []
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, dynamic_ncols=True):
        batch = records[start:start + batch_size]
        rows = [_prompt_ids(mllm, record["question"]) for record in batch]
        rows = [torch.tensor(row, dtype=torch.long, device=device) for row in rows]
        input_ids = data.pad_sequences(rows, mllm.pad_token_id, left=True)  # (B, T)
        attention_mask = data.pad_sequences([torch.ones_like(row) for row in rows], 0, left=True)  # (B, T)
        pixel_values = mllm.preprocess(_load_images(batch, image_folder)).to(device)  # (B, C, H, W)
        if noisy:
            pixel_values = _noisy(pixel_values, [r["id"] for r in batch], noise_seed, delta)
        result = mllm.generate(input_ids, attention_mask, pixel_values, max_new_tokens=max_new_tokens,
                               output_attentions=attention)
        tokens, shares = result, None
        if attention:
            tokens, attentions = result
            for record, row, mask in zip(batch, input_ids, attention_mask, strict=True):
                if not torch.equal(row[mask.bool()][:len(system_ids)], system_ids):
                    raise ValueError(f"--attention: the prompt of record {record['id']!r} does not start with the "
                                     "tokens of BOS + SYSTEM_PROMPT, so the system span cannot be located")
            shares = attention_shares(attentions, input_ids, attention_mask, mllm.image_token_id, len(system_ids))
            mid = middle_layers(shares.shape[1])
            shares = {"all": shares.mean(1).tolist(), "mid": shares[:, mid.start:mid.stop].mean(1).tolist()}
        texts = mllm.tokenizer.batch_decode(tokens.cpu(), skip_special_tokens=True)
        for i, (record, text) in enumerate(zip(batch, texts, strict=True)):
            item = {"id": record["id"], "prediction": text.strip(), "prompt_tokens": len(rows[i])}
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
                   match_text: bool = True, progress: bool = False, meta: dict | None = None) -> dict:
    """Generate on the test split(s) and score them; every rank returns the same flat result dict
    (what eval.json holds). With world_size > 1 (an initialised process group) rank r generates records
    r::world_size of each split, the answers are gathered with all_gather_object, and rank 0 scores
    the union (CIDEr's idf needs the whole set) and writes out_dir/eval[_noisy].json and
    out_dir/predictions_{task}[_noisy].jsonl.

    data: a folder with test_caption.json / test_choice.json, or a dict {task: records} (records as
    in the test files); tests: TASK:NAME=PATH specs instead; image_folder: where record["image"] paths
    are relative to (default: each test file's folder, i.e. the data folder; "." for given records).
    limit: first N records per split (0: all). meta: extra JSON fields recorded first in eval.json (e.g.
    the model path)."""
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"evaluate_model: world_size={world_size} needs an initialised torch.distributed "
                           "process group (torchrun)")
    if isinstance(data, dict):
        splits = [(task, task, None) for task in data]
    else:
        splits = resolve_splits(data, tests)
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
        return out
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
    if path in ("tiny-llava", "tiny-vila"):
        return path, {}
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint or run folder {folder} does not exist")
    if (folder / "final").is_dir():
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        return str(folder / "final"), config
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        if "out_dir" in config and "method" in config:  # train.py's TrainConfig, not a model config
            raise FileNotFoundError(f"run folder {folder} has no final/ model (training unfinished? "
                                    f"checkpoint-* folders hold trainable tensors only, not a loadable model)")
        return str(folder), {}
    raise FileNotFoundError(f"{folder} is neither a run folder (config.json + final/) nor a model folder "
                            "(config.json of a LLaVA or VILA checkpoint)")


def read_eval(run: str | Path, noisy: bool = False) -> dict:
    """RUN/eval.json (eval_noisy.json), else the last per-epoch eval in RUN/metrics.jsonl; a .json file as is."""
    run = Path(run)
    if run.is_file():
        return json.loads(run.read_text())
    path = run / ("eval_noisy.json" if noisy else "eval.json")
    if path.is_file():
        return json.loads(path.read_text())
    epochs = [] if noisy else epoch_evals(run)
    if epochs:
        return epochs[-1][1]
    raise FileNotFoundError(f"run {run}: no {path.name}" + ("" if noisy else " and no per-epoch evals in "
                                                                           "metrics.jsonl / eval_epoch*/eval.json")
                            + f"; run `python evaluate.py {run}{' --noisy' if noisy else ''}` first")


def epoch_evals(run: str | Path) -> list[tuple[float, dict]]:
    """[(epoch, eval dict)] sorted by epoch from RUN/metrics.jsonl lines with "epoch" and "eval"; if there
    are none, from RUN/eval_epoch{k}/eval.json."""
    run = Path(run)
    found = {}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for n, line in enumerate(metrics.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{metrics} line {n}: not JSON") from None
            if isinstance(entry, dict) and isinstance(entry.get("eval"), dict) and "epoch" in entry:
                found[float(entry["epoch"])] = entry["eval"]  # a resumed run's repeat replaces the earlier one
    if not found:
        for folder in run.glob("eval_epoch*"):
            match = re.fullmatch(r"eval_epoch(\d+)", folder.name)
            if match and (folder / "eval.json").is_file():
                found[float(match.group(1))] = json.loads((folder / "eval.json").read_text())
    return sorted(found.items())


def run_name(run: str | Path) -> str:
    run = Path(run)
    config = run / "config.json"
    if run.is_dir() and config.is_file():
        method = json.loads(config.read_text()).get("method")
        if method:
            return f"{method} ({run.name})"
    return run.stem if run.is_file() else run.name


# ---------------------------------------------------------------------------------------------
# Table 4 layout and Fig. 1 curves
# ---------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _delta(value, base) -> str:
    if value is None or base is None:
        return "–"
    d = value - base
    return f"+ {d:.2f}" if d >= 0 else f"- {-d:.2f}"


def format_table(runs: list[tuple[str, dict]], zero_shot: list[dict] | None = None) -> str:
    """Markdown table laid out like the paper's Table 4: one row per run, a column block per
    (caption dataset, choice dataset) pair with CIDEr (x100), accuracy (%) and AVG; the best tuned value
    of each column in bold, the second underlined; a "+" row under each run with its change against
    the zero-shot evaluation of the same datasets (the paper's "+" row, E of arXiv 2503.04543)."""
    def pair(result):
        return result.get("caption_dataset", "caption"), result.get("choice_dataset", "choice")

    pairs = []
    for _, result in runs + [("", z) for z in (zero_shot or [])]:
        if pair(result) not in pairs:
            pairs.append(pair(result))
    base = {pair(z): z for z in (zero_shot or [])}
    rows = {}  # name -> {pair: result}
    for name, result in runs:
        rows.setdefault(name, {})[pair(result)] = result
    keys = ("cider", "accuracy", "avg")
    columns = [(p, k) for p in pairs for k in keys]
    values = {name: [cells.get(p, {}).get(k) for p, k in columns] for name, cells in rows.items()}
    marks = {}
    for c in range(len(columns)):
        ranked = sorted({v[c] for v in values.values() if v[c] is not None}, reverse=True)
        for name, v in values.items():
            if len(rows) > 1 and v[c] is not None and v[c] == ranked[0]:
                marks[name, c] = "**{}**"
            elif len(rows) > 2 and len(ranked) > 1 and v[c] is not None and v[c] == ranked[1]:
                marks[name, c] = "<u>{}</u>"
    header = ["Methods"] + [p[0] if k == "cider" else p[1] if k == "accuracy" else "AVG" for p, k in columns]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(columns) + "|"]
    if base:
        lines.append("| Zero-shot | " + " | ".join(_fmt(base.get(p, {}).get(k)) for p, k in columns) + " |")
    for name, v in values.items():
        cells = [marks.get((name, c), "{}").format(_fmt(x)) for c, x in enumerate(v)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if base:
            deltas = [_delta(x, base.get(p, {}).get(k)) for x, (p, k) in zip(v, columns, strict=True)]
            lines.append("| + vs zero-shot | " + " | ".join(deltas) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[str | Path], out: str | Path, metrics=("cider", "accuracy", "avg"),
                zero_shot: str | Path | None = None, names: list[str] | None = None) -> Path:
    """Fig. 1-style curves: one panel per metric, score against epoch, one line per run, from each run's
    per-epoch evals (see epoch_evals). A zero-shot eval, if given, is drawn at epoch 0 of every line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    titles = {"cider": "captioning CIDEr x100 (open-response)", "accuracy": "multiple-choice accuracy % (fixed-choice)",
              "avg": "AVG", "bleu4": "BLEU-4", "rouge_l": "ROUGE-L", "meteor": "METEOR"}
    start = read_eval(zero_shot) if zero_shot is not None else None
    names = names or [run_name(r) for r in runs]
    if len(names) != len(runs):
        raise ValueError(f"plot: {len(names)} names for {len(runs)} runs")
    curves = []
    for run in runs:
        points = epoch_evals(run)
        if not points:
            raise FileNotFoundError(f"plot: run {run} has no per-epoch evals (metrics.jsonl lines with 'epoch' and "
                                    "'eval', or eval_epoch{k}/eval.json)")
        if start is not None:
            points = [(0.0, start)] + points
        curves.append(points)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        drawn = False
        for name, points in zip(names, curves, strict=True):
            xs = [e for e, r in points if r.get(metric) is not None]
            ys = [r[metric] for _, r in points if r.get(metric) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=name)
                drawn = True
        ax.set_title(titles.get(metric, metric))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _summary_line(result: dict) -> str:
    parts = []
    if "cider" in result:
        parts.append(f"CIDEr {result['cider']:.2f} ({result.get('caption_dataset')}, n={result['n_caption']})")
    if "accuracy" in result:
        parts.append(f"accuracy {result['accuracy']:.2f} ({result.get('choice_dataset')}, n={result['n_choice']}, "
                     f"unparsable={result['n_unparsable']})")
    if "avg" in result:
        parts.append(f"AVG {result['avg']:.2f}")
    parts.append(f"empty predictions {result.get('n_empty_predictions', 0)}")
    return " | ".join(parts)


def main_evaluate(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate a run folder or a checkpoint.")
    parser.add_argument("checkpoint", help="run folder (config.json + final/), model folder, tiny-llava or tiny-vila")
    parser.add_argument("--data", help="folder with test_caption.json / test_choice.json (default: the run's "
                                       "config.json data_dir)")
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
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)
    import models

    model_path, config = resolve_checkpoint(args.checkpoint)
    if config.get("train") and not (args.data or args.test):
        raise SystemExit(f"evaluate.py: {args.checkpoint} was trained on --train datasets {config['train']}; pass "
                         "their test splits with --test TASK:NAME=PATH (and --image-folder)")
    data = args.data or config.get("data_dir")
    if data is None and not args.test:
        raise SystemExit(f"evaluate.py: no test data: pass --data DIR or --test TASK:NAME=PATH ({args.checkpoint} "
                         "has no config.json with data_dir)")
    out = args.out or (args.checkpoint if Path(args.checkpoint).is_dir() else None)
    if out is None:
        raise SystemExit(f"evaluate.py: pass --out DIR for {args.checkpoint}")
    world, rank, local_rank = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0),
                                                                      ("LOCAL_RANK", 0)))
    device = torch.device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        mllm = models.load_model(model_path, dtype=dtype, device=device)
        result = evaluate_model(
            mllm, data, out_dir=out if rank == 0 else None, tests=args.test,
            image_folder=args.image_folder, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens or config.get("eval_max_new_tokens") or 24, limit=args.limit,
            noisy=args.noisy, noise_seed=args.noise_seed, delta=args.delta, attention=args.attention, rank=rank,
            world_size=world, meteor=args.meteor, match_text=not args.no_text_match, progress=True,
            meta={"model": model_path, "data": args.test or str(data)})
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
        raise SystemExit(f"evaluate.py table: {len(names)} names for {len(args.runs)} runs")
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


def main_score(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="evaluate.py score",
                                     description="Score a predictions JSONL (id, prediction) against a test split.")
    parser.add_argument("predictions", help="JSONL with 'id' and 'prediction' per line")
    parser.add_argument("references", help="test split JSON (caption records with references / choice with answer)")
    parser.add_argument("--task", choices=TASKS, help="default: caption if the split has 'references'")
    parser.add_argument("--meteor", action="store_true")
    args = parser.parse_args(argv)
    lines = [json.loads(line) for line in Path(args.predictions).read_text().splitlines() if line.strip()]
    predictions = {}
    for n, line in enumerate(lines, 1):
        if "id" not in line or "prediction" not in line:
            raise SystemExit(f"{args.predictions} line {n}: needs 'id' and 'prediction'")
        if str(line["id"]) in predictions:
            raise SystemExit(f"{args.predictions} line {n}: duplicate id {line['id']!r}")
        predictions[str(line["id"])] = line["prediction"]
    task = args.task or ("caption" if "references" in json.loads(Path(args.references).read_text())[0] else "choice")
    records = load_test_split(args.references, task)
    if task == "caption":
        scores = caption_metrics(predictions, {r["id"]: r["references"] for r in records}, meteor=args.meteor)
        result = {k: 100 * v for k, v in scores.items() if k != "cider_per_id"}
    else:
        scores = choice_metrics(predictions, {r["id"]: r["answer"] for r in records},
                                {r["id"]: r["options"] for r in records})
        result = {k: v for k, v in scores.items() if k != "per_id"}
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"table": main_table, "plot": main_plot, "score": main_score}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return main_evaluate(argv)


if __name__ == "__main__":
    main()
