"""Data for multi-task MLLM fine-tuning (paper Sec. 4.1): the vicuna_v1 template, LLaVA/DataOptim
records, multi-task mixing, image loading, collation, and the synthetic embedded-default data set.

- Template (vicuna_v1, both LLaVA-1.5 and VILA1.5):
  "{SYSTEM_PROMPT} USER: <image>\\n{question} ASSISTANT: {answer}</s>" and, for every further exchange of
  a multi-turn record, "USER: {question} ASSISTANT: {answer}</s>"; labels keep every answer's tokens and
  its </s>, everything else is -100, as LLaVA's `preprocess_v1` (haotian-liu/LLaVA 44e0562, 2023-10-05,
  the LLaVA-1.5 release; VILA 1c88211 labels the same tokens, with a round-length correction for its
  legacy=False tokenizer, see sentencepiece_tokenizer.py). The image placeholder becomes
  `num_image_tokens` copies of the model's image token id. Tokenisation is done piece by piece (see
  `encode_conversation`) so the label mask is exact by construction.
- Records: BAAI DataOptim / LLaVA JSON (a list) or JSONL, `{"id", "image", "conversations": [{"from":
  "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`: turns alternate human, gpt,
  one image whose placeholder is in the first human turn. Evaluation (evaluate.py) is single-turn.
- Multi-task mix (Sec. 4.1): k random records per dataset (paper: 10,000) with a seed; caption records
  get one of the paper's five caption instructions sampled per record; multiple-choice questions end
  with "Answer with the option's letter from the given choices directly."; each record keeps its task
  ("caption" / "choice") and source (dataset name).
- Images: opened with PIL as RGB; the model's `preprocess` does LLaVA's pad-to-square (mean colour,
  `pad_to_square` below) or VILA's straight resize.
- Batches (`collate`) for both kinds of model (models.py): (B, C, H, W) pixels, or a transformers processor's
  dict of image tensors (`merge_images`: packed patches concatenated, tiles zero-padded); right-padded for
  training, left-padded prompts for generation; text-only samples (pixel_values None) add `has_image`.
  `usable_records` is the check every eager dataset runs (train.py loads lazily: records.py, loader.py).
- Bad input (missing/unreadable image, malformed JSON, no answer turn, prompt longer than max_length)
  raises `DataError` / `FileNotFoundError` naming the file, the record id and the problem;
  `skip_bad_records=True` turns record-level errors into skips that are logged one by one and kept in
  a `skipped` list. A malformed JSON file always raises (no record of it can be trusted), and so does a data set
  with no record (an empty file, an empty JSON list, every record skipped): it would silently leave the mix.

Records with several images or none (text-only) and prompts kept as written go through train.py's lazy path
(records.py, loader.py), which uses the tokenisation here; the eager datasets here take one image per record.

Not here: the model's image processors (models.py), evaluation splits' scoring (evaluate.py).

Run:
    python data.py synthetic data/synthetic            # the embedded default's data (~1 s)
    python data.py convert-iconqa /data/iconqa_data iconqa_train.json --split train
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

log = logging.getLogger("nrca.data")

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Paper Sec. 4.1: one of five instructions is sampled per caption record.
CAPTION_PROMPTS = (
    "Describe the image as simply as possible with a sentence or phrase",
    "Give a brief summary of what you see",
    "Provide a short description of the image",
    "Write a short description for the image",
    "Briefly describe the content of the image",
)
# Paper Sec. 4.1: suffix of every multiple-choice question.
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
TASKS = ("caption", "choice")
IGNORE_INDEX = -100


class DataError(ValueError):
    """A bad file or record; the message names the file, the record (id and index) and the problem."""


def pad_to_square(image: Image.Image, background_rgb: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's pad-to-square: centre the image on a square canvas of the mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_rgb)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# ---------------------------------------------------------------------------------------------
# vicuna_v1 template and tokenisation
# ---------------------------------------------------------------------------------------------
def build_prompt(question: str) -> str:
    """vicuna_v1 prompt up to the answer: "{SYSTEM} USER: <image>\\n{question} ASSISTANT:"."""
    return f"{SYSTEM_PROMPT} USER: {IMAGE_PLACEHOLDER}\n{question} ASSISTANT:"


def adds_prefix_space(tokenizer) -> bool:
    """True for SentencePiece-style tokenizers (Llama/Vicuna, "▁" metaspace) that put a space in front
    of every separately tokenised piece themselves; byte-level BPE (the tiny models) does not."""
    ids = tokenizer("a", add_special_tokens=False).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return bool(tokens) and str(tokens[0]).startswith("\u2581")


def encode_conversation(question: str, answer: str, tokenizer, where: str = "conversation", image: bool = True):
    """Text token ids of one turn as three pieces: (prefix, suffix, answer).

    prefix = <s> + "{SYSTEM} USER: " (bos prepended here, not by the tokenizer's post-processor),
    suffix = "\\n{question} ASSISTANT:", answer = " {answer}" (the space LLaVA's joint tokenisation puts
    before the answer; SentencePiece tokenizers add it themselves, so it is not doubled) + </s>.
    Pieces are tokenised separately and concatenated, as LLaVA's `tokenizer_image_token` does around
    the image placeholder: the label boundary then falls exactly between pieces, with no guessing
    about merges across it. For byte-level BPE the result equals tokenising the whole string, because
    the pre-tokenizer already splits at these spaces and at "\\n".
    """
    if IMAGE_PLACEHOLDER in question:
        raise DataError(f"{where}: the question holds another {IMAGE_PLACEHOLDER!r} placeholder after removing the "
                        "first; only one image per record is supported")
    if IMAGE_PLACEHOLDER in answer:
        raise DataError(f"{where}: the answer holds an {IMAGE_PLACEHOLDER!r} placeholder")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    if not image:  # a text-only record: LLaVA tokenises its prompt in one piece (no image to split it at)
        prompt = bos + tokenizer(f"{SYSTEM_PROMPT} USER: {question} ASSISTANT:", add_special_tokens=False).input_ids
        return prompt, [], _answer_ids(answer, tokenizer, where)
    prefix = bos + tokenizer(f"{SYSTEM_PROMPT} USER: ", add_special_tokens=False).input_ids
    suffix = tokenizer(f"\n{question} ASSISTANT:", add_special_tokens=False).input_ids
    return prefix, suffix, _answer_ids(answer, tokenizer, where)


def _answer_ids(answer: str, tokenizer, where: str) -> list[int]:
    """ " {answer}" + </s> (the space as in encode_conversation)."""
    if not answer.strip():
        raise DataError(f"{where}: the answer is empty")
    if tokenizer.eos_token_id is None:
        raise DataError(f"{where}: the tokenizer has no eos token (expected '</s>')")
    answer_text = answer.strip() if adds_prefix_space(tokenizer) else f" {answer.strip()}"
    return tokenizer(answer_text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def encode_turns(turns: list[tuple[str, str]], tokenizer, where: str = "conversation", image: bool = True):
    """Token ids of a conversation, (question, answer) per exchange -> (prefix, rounds), rounds a list of
    (prompt ids, answer ids + </s>) per exchange.

    The first exchange is `encode_conversation`'s (prefix | image | "\\n{q1} ASSISTANT:" | " {a1}</s>"); each
    later one is "USER: {q} ASSISTANT:" | " {a}</s>", the text vicuna_v1 puts after a "</s>". Each piece is
    tokenised on its own, as LLaVA's `preprocess_v1` (44e0562) counts a round's length: it tokenises every
    round "USER: ... ASSISTANT: a" on its own (its own leading "▁" for SentencePiece) and requires the
    whole conversation to have the same length, else it masks the sample out. A text-only record (image=False)
    has its first prompt in one piece, "{SYSTEM} USER: {q1} ASSISTANT:", and no image to expand."""
    if not turns:
        raise DataError(f"{where}: no exchange (human, gpt) to train on")
    prefix, suffix, answer_ids = encode_conversation(turns[0][0], turns[0][1], tokenizer, where, image)
    rounds = [(suffix, answer_ids)]
    for i, (question, answer) in enumerate(turns[1:], 2):
        here = f"{where} exchange {i}"
        if IMAGE_PLACEHOLDER in question or IMAGE_PLACEHOLDER in answer:
            raise DataError(f"{here}: an {IMAGE_PLACEHOLDER!r} placeholder after the first human turn; one image "
                            "per record, in its first human turn")
        prompt = tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False).input_ids
        rounds.append((prompt, _answer_ids(answer, tokenizer, here)))
    return prefix, rounds


def assemble_turns(prefix, rounds, num_image_tokens: int, image_token_id: int, max_length: int,
                   where: str = "conversation"):
    """(prefix, rounds) of `encode_turns` -> (input_ids (T,), labels (T,)), the image placeholder expanded
    to num_image_tokens image tokens; labels are every answer's ids and </s>, -100 elsewhere.

    Truncation to max_length, from the end:
    - the first exchange's prompt is never cut (so no image token ever is); if it leaves no room for one
      answer token, DataError;
    - a later exchange is kept whole (prompt, answer and </s>) or dropped whole with the ones after it, so
      no turn is left with its prompt but part of its answer;
    - when the first exchange alone does not fit, its answer's tail is cut and with it its </s> (teaching
      the model to stop mid-sentence would be a wrong signal); at least one answer label stays.
    """
    first_prompt, first_answer = rounds[0]
    prompt = list(prefix) + [image_token_id] * num_image_tokens + list(first_prompt)
    room = max_length - len(prompt)
    if room < 1:
        raise DataError(f"{where}: the prompt is {len(prompt)} tokens ({num_image_tokens} image tokens) and leaves "
                        f"no room for an answer token within max_length={max_length}; raise --max-length or "
                        "shorten the question")
    answer = list(first_answer)[:room]
    input_ids, labels = prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
    for round_prompt, round_answer in rounds[1:] if len(answer) == len(first_answer) else []:
        if len(input_ids) + len(round_prompt) + len(round_answer) > max_length:
            break
        input_ids += list(round_prompt) + list(round_answer)
        labels += [IGNORE_INDEX] * len(round_prompt) + list(round_answer)
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)  # (T,), (T,)


def assemble_conversation(pieces, num_image_tokens: int, image_token_id: int, max_length: int,
                          where: str = "conversation"):
    """(prefix, suffix, answer) ids -> (input_ids (T,), labels (T,)) with the image placeholder expanded.

    Truncation to max_length never cuts the prompt (and so never an image token): it cuts the tail of
    the answer. A cut answer loses its </s> as well, because teaching the model to stop in the middle
    of a sentence would be a wrong signal; such a sample keeps at least one answer label. A prompt that
    leaves no room for one answer token raises DataError. (One exchange of `assemble_turns`.)
    """
    prefix, suffix, answer_ids = pieces
    return assemble_turns(prefix, [(suffix, answer_ids)], num_image_tokens, image_token_id, max_length, where)


def is_truncated(input_ids, pieces, num_image_tokens: int) -> bool:
    """Whether `assemble_turns` cut a conversation: its ids are fewer than (prefix, rounds) `pieces` hold."""
    return len(input_ids) < len(pieces[0]) + num_image_tokens + sum(len(p) + len(a) for p, a in pieces[1])


def tokenize_conversation(question: str, answer: str, tokenizer, num_image_tokens: int, image_token_id: int,
                          max_length: int, where: str = "conversation"):
    """vicuna_v1 ids of one turn: (input_ids (T,), labels (T,)); labels are -100 except answer + </s>.

    See `encode_conversation` (piece-wise tokenisation) and `assemble_conversation` (truncation)."""
    pieces = encode_conversation(question, answer, tokenizer, where)
    return assemble_conversation(pieces, num_image_tokens, image_token_id, max_length, where)


def tokenize_turns(turns: list[tuple[str, str]], tokenizer, num_image_tokens: int, image_token_id: int,
                   max_length: int, where: str = "conversation"):
    """vicuna_v1 ids of a conversation, (question, answer) per exchange: (input_ids (T,), labels (T,)); labels
    are every answer's ids and </s>, -100 elsewhere. See `encode_turns` and `assemble_turns` (truncation)."""
    return assemble_turns(*encode_turns(turns, tokenizer, where), num_image_tokens, image_token_id, max_length, where)


# ---------------------------------------------------------------------------------------------
# Records: LLaVA / DataOptim JSON and JSONL
# ---------------------------------------------------------------------------------------------
def _record_name(path, index: int, record) -> str:
    record_id = record.get("id") if isinstance(record, dict) else None
    return f"{path}: record {index} (id {record_id!r})"


def question_and_answer(record: dict, where: str) -> tuple[str, str]:
    """The first human question (image placeholder removed) and the first gpt answer of a record."""
    return conversation_turns(record, where)[0]


def conversation_turns(record: dict, where: str, n_images: int = 1) -> list[tuple[str, str]]:
    """(question, answer) of every exchange of a record, stripped. Turns must alternate human, gpt, starting with
    human and ending with gpt; DataError names the turn otherwise. The record's image placeholders must number
    `n_images` (its images) and sit in human turns: with one image (LLaVA's data), exactly one placeholder in the
    first human turn, removed from the question (LLaVA puts the image first); with none (text-only), none; with
    several (the generic families), the placeholders stay in the questions where they are written."""
    if "question" in record and "answer" in record and "conversations" not in record:
        return [(str(record["question"]), str(record["answer"]))]
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns, got {turns!r:.80}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise DataError(f"{where}: turn {i} must be an object with 'from' and a string 'value', got {turn!r:.80}")
    if turns[0]["from"] != "human":
        raise DataError(f"{where}: the first turn must be from 'human', got {turns[0]['from']!r}")
    if len(turns) < 2 or turns[1]["from"] != "gpt":
        raise DataError(f"{where}: no answer turn (a second turn from 'gpt')")
    for i, turn in enumerate(turns):
        if turn["from"] != ("human", "gpt")[i % 2]:
            raise DataError(f"{where}: turn {i} is from {turn['from']!r}, expected {('human', 'gpt')[i % 2]!r} "
                            "(turns alternate human, gpt)")
    if len(turns) % 2:
        raise DataError(f"{where}: the last turn ({len(turns) - 1}) is from 'human' with no answer after it")
    in_reply = [i for i in range(1, len(turns), 2) if IMAGE_PLACEHOLDER in turns[i]["value"]]
    if in_reply:
        raise DataError(f"{where}: reply turn {in_reply[0]} holds an {IMAGE_PLACEHOLDER!r} placeholder (images belong "
                        "in human turns)")
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if n_images == 1 and IMAGE_PLACEHOLDER not in turns[0]["value"]:
        raise DataError(f"{where}: the first human turn has no {IMAGE_PLACEHOLDER!r} placeholder")
    if n_images == 1 and placeholders > 1:
        raise DataError(f"{where}: the conversation holds several {IMAGE_PLACEHOLDER!r} placeholders; one image per "
                        "record, in its first human turn, is supported")
    if placeholders != n_images:
        raise DataError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER!r} placeholder(s) in the conversation for "
                        f"{n_images} image(s) in 'image'; they must match")
    exchanges = []
    for i in range(0, len(turns), 2):
        question = turns[i]["value"]
        question = (question.replace(IMAGE_PLACEHOLDER, "", 1) if n_images == 1 else question).strip()
        answer = turns[i + 1]["value"].strip()
        if not question and (i > 0 or n_images == 0):
            raise DataError(f"{where}: human turn {i} is empty")
        if not answer:
            raise DataError(f"{where}: the answer turn is empty (turn {i + 1})")
        exchanges.append((question, answer))
    return exchanges


def validate_record(record, where: str) -> None:
    """Raise DataError unless record is a LLaVA record (see conversation_turns) with an id and an image path."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if record.get("id") is None or str(record["id"]) == "":
        raise DataError(f"{where}: missing 'id'")
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: missing 'image' field (a relative image path); text-only records are not "
                        "supported")
    conversation_turns(record, where)


def _parse_json_or_jsonl(path: Path) -> list:
    import records  # the one parser (records.iter_records imports this module)

    return list(records.iter_records(path))


def load_records(path, skip_bad_records: bool = False, skipped: list | None = None) -> list[dict]:
    """Read and validate a JSON list or JSONL file of LLaVA records; ids become str.

    A malformed file raises DataError with line and column. A bad record raises DataError naming the
    file, index, id and problem; with skip_bad_records it is left out, logged, and its message appended
    to `skipped` (when given)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file {path} does not exist")
    good = []
    for index, record in enumerate(_parse_json_or_jsonl(path)):
        where = _record_name(path, index, record)
        try:
            validate_record(record, where)
        except DataError as error:
            if not skip_bad_records:
                raise
            log.warning("skipping bad record: %s", error)
            if skipped is not None:
                skipped.append(str(error))
            continue
        good.append({**record, "id": str(record["id"])})
    return good


# ---------------------------------------------------------------------------------------------
# Multi-task mixing (paper Sec. 4.1)
# ---------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One downstream dataset of the mix."""

    name: str  # dataset name kept in every record ("flickr30k", "scienceqa", ...)
    path: str  # LLaVA JSON / JSONL file
    task: str  # "caption" (open-response, CIDEr) or "choice" (fixed-choice, accuracy)
    image_folder: str | None = None  # when set, image paths become image_folder / image (else the dataset's)


def with_choice_suffix(question: str) -> str:
    """The question ending with CHOICE_SUFFIX on its own line, never twice."""
    question = question.rstrip()
    return question if question.endswith(CHOICE_SUFFIX) else f"{question}\n{CHOICE_SUFFIX}"


def paper_question(task: str, question: str, rng: random.Random) -> str:
    """A single-turn record's prompt as the paper writes it (Sec. 4.1): a caption record gets one of the five
    CAPTION_PROMPTS (drawn from `rng`), a choice question the CHOICE_SUFFIX."""
    return rng.choice(CAPTION_PROMPTS) if task == "caption" else with_choice_suffix(question)


def draw(n: int, k: int | None, rng: random.Random, name: str) -> list[int]:
    """k of n record indices without replacement, in draw order (all of them shuffled, logged, when n <= k; k = None
    asks for all, not logged). The one draw of the mix: records.mix (lazy) and mix_datasets (eager) share it."""
    if k is not None and n > k:
        return rng.sample(range(n), k)
    if k is not None:
        log.warning("%s: %d records <= samples_per_dataset=%d; using all of them", name, n, k)
    chosen = list(range(n))
    rng.shuffle(chosen)
    return chosen


def mix_datasets(sources, samples_per_dataset: int = 10_000, seed: int = 0, skip_bad_records: bool = False,
                 skipped: list | None = None) -> list[dict]:
    """k random records per dataset, prompts rewritten as in the paper (Sec. 4.1).

    sources: Source objects or (name, path, task) tuples. Per dataset, a generator seeded by (seed, name)
    draws k = samples_per_dataset records without replacement (all of them, logged, when fewer) and,
    for caption records, one of the five CAPTION_PROMPTS per record (replacing the original
    instruction); choice questions get CHOICE_SUFFIX appended unless already there. A multi-turn record
    keeps its conversation as written (the paper's prompts are for single-turn records). Returned
    records: the original fields plus "question", "answer" (the first exchange), "task", "source" and
    (rewritten) "conversations"; dataset order, then draw order (the trainer shuffles)."""
    if samples_per_dataset < 1:
        raise ValueError(f"samples_per_dataset must be >= 1, got {samples_per_dataset}")
    mixed = []
    names = set()
    for source in sources:
        source = source if isinstance(source, Source) else Source(*source)
        if source.task not in TASKS:
            raise ValueError(f"dataset {source.name!r} ({source.path}): task must be one of {TASKS}, "
                             f"got {source.task!r}")
        if source.name in names:
            raise ValueError(f"dataset name {source.name!r} appears twice in the mix")
        names.add(source.name)
        bad = []
        records = load_records(source.path, skip_bad_records=skip_bad_records, skipped=bad)
        if skipped is not None:
            skipped.extend(bad)
        if not records:  # every record skipped: the task would silently leave the mix
            raise DataError(f"dataset {source.name!r} ({source.path}): no usable record, all {len(bad)} skipped as "
                            f"bad (first: {bad[0] if bad else '-'})")
        rng = random.Random(f"{seed}/{source.name}")  # str seeds are stable across runs and processes
        for index in draw(len(records), samples_per_dataset, rng, f"dataset {source.name} ({source.path})"):
            record = records[index]
            turns = conversation_turns(record, _record_name(source.path, index, record))
            question, answer = turns[0]
            image = record["image"]
            if source.image_folder is not None:
                image = str(Path(source.image_folder) / image)
            if len(turns) > 1:
                mixed.append({**record, "image": image, "question": question, "answer": answer, "task": source.task,
                              "source": source.name})
                continue
            question = paper_question(source.task, question, rng)
            mixed.append({**record, "image": image, "question": question, "answer": answer, "task": source.task,
                          "source": source.name,
                          "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                                            {"from": "gpt", "value": answer}]})
    return mixed


# ---------------------------------------------------------------------------------------------
# Dataset and collation
# ---------------------------------------------------------------------------------------------
def open_image(path: Path, where: str, header_only: bool = False) -> Image.Image | tuple[int, int]:
    """PIL RGB image, or FileNotFoundError / DataError naming the file and the record. With header_only,
    only the header is read (unknown or non-image files fail; truncated pixel data does not) and its (width,
    height) returned."""
    if path.is_dir():
        raise DataError(f"{where}: image {path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.size if header_only else image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{where}: image {path} cannot be read: {error}") from None


def record_name(index: int, record) -> str:
    """How errors name a training dataset's record: its position, id and source dataset."""
    if not isinstance(record, dict):
        return f"record {index}"
    return f"record {index} (id {record.get('id')!r}, source {record.get('source')!r})"


def usable_records(records, image_folder, prepare, skip_bad_records: bool = False):
    """The eager checks every training dataset runs before the first step: each record's structure
    (validate_record), `prepare(record, where)` (tokenisation: raises DataError for a bad record, returns what
    the dataset keeps of it) and its image's existence and header. Returns (kept records, what prepare returned
    for each, skipped messages). A bad record stops the run, naming it, unless skip_bad_records: then it is
    left out and logged, and the messages are returned. No usable record at all is an error either way."""
    kept, prepared, skipped = [], [], []
    for index, record in enumerate(records):
        where = record_name(index, record)
        try:
            validate_record(record, where)
            value = prepare(record, where)
            open_image(Path(image_folder) / record["image"], where, header_only=True)
        except (DataError, FileNotFoundError) as error:
            if not skip_bad_records:
                raise
            log.warning("skipping bad record: %s", error)
            skipped.append(str(error))
            continue
        kept.append(record)
        prepared.append(value)
    if skipped:
        log.warning("skipped %d of %d records (skip_bad_records=True)", len(skipped), len(skipped) + len(kept))
    if not kept:
        raise DataError(f"no usable record among {len(skipped)} (skipped: {skipped[:3]})")
    return kept, prepared, skipped


class MultiTaskDataset(torch.utils.data.Dataset):
    """Records -> dict(id, task, source, input_ids (T,), labels (T,), pixel_values (C, H, W), ...).

    Validation is eager for everything cheap, so a run fails (or reports its skips) before training
    starts: record structure, tokenisation and the max_length check for every record, and each image's
    existence plus its header (`Image.open` reads only the header: unknown or non-image files fail here).
    Full decoding happens lazily in __getitem__; a file whose header is fine but whose pixel data is
    truncated raises there (naming file and record) even with skip_bad_records, because an index the
    trainer already scheduled cannot be dropped silently.

    preprocess(list[PIL.Image]) -> (B, 3, H, W) comes from the model (pad-to-square / resize + norm).
    With skip_bad_records, bad records are left out; `self.skipped` lists "record: reason" for each, and
    every skip is logged.
    """

    def __init__(self, records, image_folder, tokenizer, preprocess, num_image_tokens: int, image_token_id: int,
                 max_length: int, skip_bad_records: bool = False):
        self.image_folder = Path(image_folder)
        self.preprocess = preprocess
        self.num_image_tokens, self.image_token_id, self.max_length = num_image_tokens, image_token_id, max_length

        def tokenize(record, where):
            turns = conversation_turns(record, where)
            pieces = encode_turns(turns, tokenizer, where)
            input_ids, _ = assemble_turns(*pieces, num_image_tokens, image_token_id, max_length, where)
            return turns[0], pieces, is_truncated(input_ids, pieces, num_image_tokens)

        self.records, prepared, self.skipped = usable_records(records, self.image_folder, tokenize, skip_bad_records)
        self.records = [{**record, "question": question, "answer": answer}
                        for record, ((question, answer), _, _) in zip(self.records, prepared, strict=True)]
        self.pieces = [pieces for _, pieces, _ in prepared]
        self.n_truncated = sum(truncated for _, _, truncated in prepared)  # cut to max_length (assemble_turns)
        if self.n_truncated:
            log.warning("%d of %d records are longer than max_length=%d and were truncated (an answer's tail, or "
                        "whole later turns; see assemble_turns)", self.n_truncated, len(self.records), max_length)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        where = record_name(index, record)
        input_ids, labels = assemble_turns(*self.pieces[index], self.num_image_tokens, self.image_token_id,
                                           self.max_length, where)
        image = open_image(self.image_folder / record["image"], where)
        pixel_values = self.preprocess([image])[0]  # (C, H, W)
        prompt_length = int((labels != IGNORE_INDEX).nonzero()[0])  # the first exchange's prompt
        return {"id": str(record["id"]), "task": record.get("task", ""), "source": record.get("source", ""),
                "input_ids": input_ids, "labels": labels, "pixel_values": pixel_values,
                "prompt_length": prompt_length, "answer": record["answer"],
                "references": list(record.get("references") or [record["answer"]])}


def pad_sequences(rows: list[torch.Tensor], value: int, left: bool = False, width: int = 0) -> torch.Tensor:
    """1-D rows -> one (B, T) tensor on their device and dtype, T = max(longest row, width), padded with
    `value` on the right (training) or on the left (generation)."""
    width = max([len(row) for row in rows] + [width])
    out = rows[0].new_full((len(rows), width), value)  # (B, T)
    for i, row in enumerate(rows):
        if left:
            out[i, width - len(row):] = row
        else:
            out[i, :len(row)] = row
    return out


TOKEN_ALIGNED = ("mm_token_type_ids", "token_type_ids")  # processor outputs of shape (B, T), padded like ids


def collate(batch: list[dict], pad_token_id: int, left: bool = False) -> dict:
    """Samples of either model kind -> one batch: input_ids, attention_mask (B, T), labels (-100 on padding)
    when the samples have labels, pixel_values, and ids / tasks / sources (lists of str) when they carry
    id / task / source. Right-padded for training; left=True left-pads (prompts for generation).
    pixel_values: (C, H, W) per sample are stacked to (B, C, H, W), one-image batches (1, C, H, W) are
    concatenated; dicts of a transformers processor's tensors (models.py's generic path) are merged by
    `merge_images`."""
    if not batch:
        raise ValueError("collate: empty batch")
    rows = [item["input_ids"] for item in batch]
    out = {"input_ids": pad_sequences(rows, pad_token_id, left=left),  # (B, T)
           "attention_mask": pad_sequences([torch.ones_like(row) for row in rows], 0, left=left)}  # (B, T)
    if "labels" in batch[0]:
        out["labels"] = pad_sequences([item["labels"] for item in batch], IGNORE_INDEX, left=left)  # (B, T)
    has_image = [item["pixel_values"] is not None and (not isinstance(item["pixel_values"], dict) or
                                                        bool(set(item["pixel_values"]) - set(TOKEN_ALIGNED)))
                 for item in batch]
    if not all(has_image):  # text-only samples (no picture, no noisy view: NRCA gives them CE only)
        out["has_image"] = torch.tensor(has_image)  # (B,)
    pixels = [item["pixel_values"] for item in batch if item["pixel_values"] is not None]  # text-only: None
    if not pixels:
        out["pixel_values"] = None
    elif isinstance(pixels[0], dict):
        out["pixel_values"] = merge_images(pixels, left=left)
    else:
        out["pixel_values"] = torch.stack(pixels) if pixels[0].dim() == 3 else torch.cat(pixels)  # (N_img, C, H, W)
    for key, name in (("id", "ids"), ("task", "tasks"), ("source", "sources")):
        if key in batch[0]:
            out[name] = [item[key] for item in batch]
    return out


def merge_images(parts: list[dict], left: bool = False) -> dict:
    """Per-sample dicts of a processor's image tensors (leading dim 1) -> one batch dict. Packed patches
    (Qwen2-VL) are concatenated along the patch axis; tiled layouts (1, n_tiles, C, H, W) and Idefics3's
    pixel_attention_mask are zero-padded to the largest n_tiles, H and W (what the processors do in a batched
    call: the models drop all-zero tiles and mask zero pixels); token-aligned extras are padded like input_ids."""
    with_images = [part for part in parts if set(part) - set(TOKEN_ALIGNED)]  # a text-only sample has none
    keys = set(with_images[0]) if with_images else set()
    for part in with_images:
        if set(part) != keys:
            raise ValueError(f"data.merge_images: samples carry different image keys {sorted(keys)} vs "
                             f"{sorted(part)}")
    merged = {}
    for key in sorted(keys | {key for part in parts for key in part}):
        if key in TOKEN_ALIGNED and any(key not in part for part in parts):
            raise ValueError(f"data.merge_images: {key} is missing from some samples")
        tensors = [part[key] for part in (parts if key in TOKEN_ALIGNED else with_images)]
        tiled = "image_grid_thw" not in keys and (key == "pixel_attention_mask" or tensors[0].dim() == 5)
        if key in TOKEN_ALIGNED:
            merged[key] = pad_sequences([t[0] for t in tensors], 0, left=left)  # (B, T)
        elif tiled:
            shape = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors), strict=True)]
            padded = []
            for t in tensors:
                out = t.new_zeros(t.shape[0], *shape)  # (images, n, [C,] H, W): OneVision has a row per image
                out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
                padded.append(out)
            merged[key] = torch.cat(padded)
        else:
            merged[key] = torch.cat(tensors)  # packed patches, (B, C, H, W), image_grid_thw, image_sizes, ...
    return merged


def to_device(batch: dict, device) -> dict:
    """Every tensor of a batch (nested dicts too) on `device`; other values as they are."""
    return {key: to_device(value, device) if isinstance(value, dict) else
            value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


# ---------------------------------------------------------------------------------------------
# Synthetic embedded-default vocabulary (shared by make_synthetic and tokenizer_corpus).
# ---------------------------------------------------------------------------------------------
SYNTH_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SYNTH_SHAPES = ("circle", "square", "triangle")
SYNTH_COUNTS = ("one", "two", "three")
SYNTH_POSITIONS = ("left", "right", "top", "bottom")
SYNTH_SIZES = ("small", "large")
OPTION_LETTERS = "ABCDEFGHIJ"
# Caption paraphrases; slots: {count} {size} {colour} {shapes} {position}.
SYNTH_CAPTION_TEMPLATES = (
    "{count} {size} {colour} {shapes} on the {position}",
    "there are {count} {size} {colour} {shapes} on the {position}",
    "{count} {size} {colour} {shapes} at the {position} of the image",
    "on the {position} there are {count} {size} {colour} {shapes}",
    "the image shows {count} {size} {colour} {shapes} on the {position}",
)
SYNTH_QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "Which shape is shown?",
    "count": "How many shapes are there?",
    "position": "Where are the shapes?",
    "size": "What size are the shapes?",
}


def _plural(shape: str, count: str) -> str:
    return shape if count == "one" else shape + "s"


def tokenizer_corpus() -> list[str]:
    """Texts a tiny byte-level BPE tokenizer is trained on (deterministic, same list every call).

    Covers the vicuna_v1 template words, the system prompt, the five caption prompts, the choice
    suffix, lettered option lines, and every word of the synthetic data set (colours, shapes,
    counts, positions, sizes, caption paraphrases, questions), so that synthetic prompts and answers
    tokenize into few, stable tokens.
    """
    texts = [SYSTEM_PROMPT, "USER:", "ASSISTANT:", "USER: ASSISTANT:", CHOICE_SUFFIX]
    texts += [f"{SYSTEM_PROMPT} USER: {IMAGE_PLACEHOLDER}\n{p} ASSISTANT:" for p in CAPTION_PROMPTS]
    texts += list(CAPTION_PROMPTS)
    texts += list(SYNTH_QUESTIONS.values())
    values = {
        "colour": list(SYNTH_COLOURS), "shape": list(SYNTH_SHAPES), "count": list(SYNTH_COUNTS),
        "position": list(SYNTH_POSITIONS), "size": list(SYNTH_SIZES),
    }
    for kind, question in SYNTH_QUESTIONS.items():
        options = values[kind]
        lines = "\n".join(f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options))
        texts.append(f"{question}\n{lines}\n{CHOICE_SUFFIX}")
    texts += [f"{letter}. " for letter in OPTION_LETTERS] + list(OPTION_LETTERS)
    # A letter answer follows "ASSISTANT:" after a space: " B" must be one token, so that a fixed-choice
    # label is letter + </s> = 2 tokens, as with LLaVA's tokenizer (the open/fixed split of Eq. 5b).
    texts += [f"ASSISTANT: {letter}" for letter in OPTION_LETTERS] * 4
    for words in values.values():
        texts += list(words)
    for template in SYNTH_CAPTION_TEMPLATES:
        for count in SYNTH_COUNTS:
            for shape in SYNTH_SHAPES:
                for colour in SYNTH_COLOURS:
                    for size in SYNTH_SIZES:
                        for position in SYNTH_POSITIONS:
                            texts.append(template.format(count=count, size=size, colour=colour,
                                                         shapes=_plural(shape, count), position=position))
    return texts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _synthetic_scene(rng: random.Random, image_size: int):
    """One random scene: its attributes and the drawn image. Shapes of one colour, shape and size sit
    in one half of a plain canvas (left/right halves stack them vertically, top/bottom horizontally)."""
    scene = {"colour": rng.choice(list(SYNTH_COLOURS)), "shape": rng.choice(SYNTH_SHAPES),
             "count": rng.choice(SYNTH_COUNTS), "position": rng.choice(SYNTH_POSITIONS),
             "size": rng.choice(SYNTH_SIZES)}
    n = SYNTH_COUNTS.index(scene["count"]) + 1
    side = float(image_size)
    r = side * (0.12 if scene["size"] == "large" else 0.06)
    jitter = side * 0.03
    image = Image.new("RGB", (image_size, image_size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    for i in range(n):
        along = side * (i + 1) / (n + 1) + rng.uniform(-jitter, jitter)  # spread along the half's long side
        across = side * (0.25 if scene["position"] in ("left", "top") else 0.75) + rng.uniform(-jitter, jitter)
        cx, cy = (across, along) if scene["position"] in ("left", "right") else (along, across)
        _draw_shape(draw, scene["shape"], cx, cy, r, SYNTH_COLOURS[scene["colour"]])
    return scene, image


def synthetic_captions(scene: dict) -> list[str]:
    """The five reference paraphrases of a scene; the first is the canonical training caption."""
    shapes = _plural(scene["shape"], scene["count"])
    return [t.format(count=scene["count"], size=scene["size"], colour=scene["colour"], shapes=shapes,
                     position=scene["position"]) for t in SYNTH_CAPTION_TEMPLATES]


def _synthetic_choice(rng: random.Random, scene: dict):
    """A multiple-choice question about one attribute: (question with lettered options, options, letter)."""
    kind = rng.choice(list(SYNTH_QUESTIONS))
    values = {"colour": list(SYNTH_COLOURS), "shape": list(SYNTH_SHAPES), "count": list(SYNTH_COUNTS),
              "position": list(SYNTH_POSITIONS), "size": list(SYNTH_SIZES)}[kind]
    options = list(values)
    rng.shuffle(options)
    letter = OPTION_LETTERS[options.index(scene[kind])]
    lines = "\n".join(f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options))
    return f"{SYNTH_QUESTIONS[kind]}\n{lines}\n{CHOICE_SUFFIX}", options, letter


def make_synthetic(out_dir, n_train: int = 400, n_test: int = 40, seed: int = 0, image_size: int = 64) -> dict:
    """Write the synthetic multi-task set (embedded default) to out_dir; returns {file name: count}.

    Per image one caption record and one multiple-choice record. Files:
      images/{split}_{i:05d}.png   64 x 64 PIL drawings: 1-3 shapes, one colour / shape / size, in one half
      train_caption.json, train_choice.json   LLaVA records (train captions: the canonical phrasing)
      test_caption.json   + "references": the five paraphrases of the scene
      test_choice.json    + "answer": the letter, "options": the option texts
    Deterministic for a given seed (same bytes)."""
    if n_train < 1 or n_test < 1 or image_size < 16:
        raise ValueError(f"make_synthetic: need n_train, n_test >= 1 and image_size >= 16, got {n_train}, {n_test}, "
                         f"{image_size}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        captions, choices = [], []
        for i in range(n):
            scene, image = _synthetic_scene(rng, image_size)
            image_path = f"images/{split}_{i:05d}.png"
            image.save(out_dir / image_path)
            references = synthetic_captions(scene)
            prompt = rng.choice(CAPTION_PROMPTS)
            caption = {"id": f"synthetic-{split}-{i:05d}-caption", "image": image_path,
                       "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
                                         {"from": "gpt", "value": references[0]}]}
            question, options, letter = _synthetic_choice(rng, scene)
            choice = {"id": f"synthetic-{split}-{i:05d}-choice", "image": image_path,
                      "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                                        {"from": "gpt", "value": letter}]}
            if split == "test":
                caption["references"] = references
                choice.update(answer=letter, options=options)
            captions.append(caption)
            choices.append(choice)
        for task, records in (("caption", captions), ("choice", choices)):
            name = f"{split}_{task}.json"
            (out_dir / name).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
            files[name] = len(records)
    return files


# ---------------------------------------------------------------------------------------------
# IconQA (not in DataOptim): convert its release to LLaVA records
# ---------------------------------------------------------------------------------------------
def convert_iconqa(root, out_path, split: str = "train", limit: int | None = None) -> int:
    """IconQA multiple-choice text questions ("choose_txt") -> LLaVA JSON; returns the record count.

    Release layout: ROOT/problems.json ({pid: {"question", "choices": [...], "answer": index, ...}}),
    ROOT/pid_splits.json ({"choose_txt_train": [pid, ...], ...}) and images at
    ROOT/iconqa/{split}/choose_txt/{pid}/image.png (or ROOT/{split}/choose_txt/{pid}/image.png).
    Each record: question + "A. ..." option lines + CHOICE_SUFFIX, answer = the letter; "answer" and
    "options" are also stored (the test-split format evaluate.py reads). Image paths are absolute, so
    the file mixes with datasets that live under another --image-folder."""
    root = Path(root)
    for name in ("problems.json", "pid_splits.json"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"IconQA root {root}: {name} not found (expected the release's iconqa_data folder)")
    problems = json.loads((root / "problems.json").read_text(encoding="utf-8"))
    splits = json.loads((root / "pid_splits.json").read_text(encoding="utf-8"))
    key = f"choose_txt_{split}"
    if key not in splits:
        raise DataError(f"{root / 'pid_splits.json'}: no key {key!r} (has {sorted(splits)[:8]})")
    image_root = root / "iconqa" if (root / "iconqa" / split).is_dir() else root
    records = []
    for pid in splits[key][:limit]:
        pid = str(pid)
        where = f"{root / 'problems.json'}: problem {pid!r}"
        problem = problems.get(pid)
        if problem is None:
            raise DataError(f"{where}: listed in pid_splits.json[{key!r}] but missing")
        choices, answer = problem.get("choices"), problem.get("answer")
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(OPTION_LETTERS):
            raise DataError(f"{where}: 'choices' must be a list of 2..{len(OPTION_LETTERS)} options, got {choices!r}")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: 'answer' must be an index into the {len(choices)} choices, got {answer!r}")
        image = image_root / split / "choose_txt" / pid / "image.png"
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image {image} does not exist")
        options = [str(c) for c in choices]
        lines = "\n".join(f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options))
        question = with_choice_suffix(f"{str(problem.get('question', '')).strip()}\n{lines}")
        letter = OPTION_LETTERS[answer]
        records.append({"id": f"iconqa-{split}-{pid}", "image": str(image.resolve()),
                        "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                                          {"from": "gpt", "value": letter}],
                        "answer": letter, "options": options})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return len(records)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="nrca data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic = commands.add_parser("synthetic", help="write the synthetic multi-task data set (embedded default)")
    synthetic.add_argument("out_dir")
    synthetic.add_argument("--n-train", type=int, default=400, help="train images (1 caption + 1 choice record each)")
    synthetic.add_argument("--n-test", type=int, default=40, help="test images")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--image-size", type=int, default=64)
    iconqa = commands.add_parser("convert-iconqa", help="IconQA release (choose_txt) -> LLaVA JSON")
    iconqa.add_argument("root", help="the release's iconqa_data folder (problems.json, pid_splits.json)")
    iconqa.add_argument("out", help="output JSON file")
    iconqa.add_argument("--split", default="train", choices=("train", "val", "test"))
    iconqa.add_argument("--limit", type=int, default=None, help="first N problems only")
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        files = make_synthetic(args.out_dir, args.n_train, args.n_test, args.seed, args.image_size)
        print(f"wrote {args.out_dir}: " + ", ".join(f"{name} ({n} records)" for name, n in files.items()))
    else:
        n = convert_iconqa(args.root, args.out, args.split, args.limit)
        print(f"wrote {args.out}: {n} IconQA {args.split} records")


if __name__ == "__main__":
    import cli

    cli.run(main)
