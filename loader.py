"""Training samples on the fly: a record of records.py's store becomes a sample (tokens, labels, pixels) when the
DataLoader asks for it, in its worker processes (train.py --num-workers), never all of them up front on every rank.

- `LazySamples`: the dataset. __getitem__ opens the record's images and calls the model's `encode_record`
  (models.MLLM for LLaVA-1.5 / VILA1.5: data.py's piece-wise vicuna_v1; hf_models.HFMLLM: the chat template), the
  same functions the eager datasets (data.MultiTaskDataset, hf_models.HFDataset) run, so a lazy sample is bit-equal
  to the eager one of the same record (tests/test_loader.py). A negative index -1 - i is train.py's padding item:
  record i with no answer label.
- A record that fails while loading (an image missing or truncated, one the processor refuses, a prompt longer
  than max_length once the processor has expanded its images) stops the run naming it; with skip_bad_records its
  place in the batch is taken by the next record that loads, with no answer label (it adds nothing to any loss),
  and the item says why (`skipped`), which train.py counts per reason in metrics.jsonl and the log. The epoch
  goes on: an index already scheduled is never silently dropped or retried elsewhere.
- `vicuna_length_check`: for LLaVA-1.5 / VILA1.5 every record's length is known without its image, so it is
  checked before step 1, in the structural pass (records.mix): a bound from the text's UTF-8 size (a token covers
  at least one byte) settles almost every record without tokenising it; the rest are tokenised exactly.
  Generic families expand an image into a number of tokens that depends on its size: their lengths are checked
  while loading (above), the first record's before step 1; with --check-images, which reads every picture's size
  from its header, every record's before step 1 (`generic_length_check`).
- `batch_loader`: a DataLoader over train.py's micro-batches of one epoch (a list of index lists), collated by
  the model, `num_workers` worker processes (0: in the training process), two batches ahead per worker.

Not here: parsing and the structural pass (records.py), tokenisation itself (data.py, hf_models.py).

    TRITON_INTERPRET=1 python -m pytest -q tests/test_loader.py
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

import records
from data import IGNORE_INDEX, SYSTEM_PROMPT, DataError, assemble_turns, encode_turns, is_truncated, open_image

log = logging.getLogger("nrca.loader")


class LazySamples(torch.utils.data.Dataset):
    """records.CompactRecords -> training samples, each made when asked for (module docstring)."""

    def __init__(self, store, image_folder, mllm, max_length: int, skip_bad_records: bool = False):
        self.store, self.image_folder, self.mllm = store, Path(image_folder), mllm
        self.max_length, self.skip_bad_records = max_length, skip_bad_records
        if len(store) == 0:
            raise DataError("no usable record in the training mix")

    def __len__(self) -> int:
        return len(self.store)

    @property
    def records(self):
        """The records, as stored (records.CompactRecords: each a dict when indexed)."""
        return self.store

    def sample(self, index: int) -> dict:
        """Record `index` as a sample; DataError / FileNotFoundError naming it when it cannot be made."""
        record = self.store[index]
        encoded = encode_stored(record, self.image_folder, self.mllm, self.max_length)
        answer = record["turns"][0][1]
        return {"id": record["id"], "task": record["task"], "source": record["source"], **encoded,
                "answer": answer, "references": list(record.get("references") or [answer])}

    def __getitem__(self, index: int) -> dict:
        padding = index < 0  # train.py's padding item -1 - i: record i, no answer label
        index = -1 - index if padding else index
        try:
            item = self.sample(index)
        except (DataError, FileNotFoundError) as error:
            if not self.skip_bad_records:
                raise
            item = {**self.substitute(index), "skipped": str(error)}
            padding = True
        if padding:
            item = {**item, "labels": torch.full_like(item["labels"], IGNORE_INDEX)}
        return item

    def substitute(self, index: int) -> dict:
        """The next record after `index` that loads (its shapes fill the batch; its labels are dropped)."""
        for offset in range(1, len(self)):
            try:
                return self.sample((index + offset) % len(self))
            except (DataError, FileNotFoundError):
                continue
        raise DataError(f"no record of the training mix loads (the last tried: {index})")


def encode_stored(record: dict, image_folder: Path, mllm, max_length: int) -> dict:
    """A stored record through the model's `encode_record`, its images opened from `image_folder`; DataError /
    FileNotFoundError naming the record when it cannot be made."""
    where = records.record_where(record)
    images = [open_image(image_folder / path, where) for path in record["image"]]
    return mllm.encode_record(images, [tuple(turn) for turn in record["turns"]], max_length, where)


def checked_mix(mllm, sources, samples_per_dataset: int | None, seed: int, max_length: int,
                skip_bad_records: bool = False, skipped=None):
    """records.mix with what this model's tokenizer rules out: its special tokens in the text, and on LLaVA-1.5 /
    VILA1.5 a record too long for max_length (vicuna_length_check)."""
    check = vicuna_length_check(mllm, max_length) if mllm.kind != "hf" else None
    return records.mix(sources, samples_per_dataset, seed, skip_bad_records, skipped,
                       records.special_tokens(mllm.tokenizer), check)


def vicuna_length_check(mllm, max_length: int):
    """A `check(images, turns, where)` for records.mix on LLaVA-1.5 / VILA1.5: DataError when the first prompt
    leaves no room for an answer token (data.assemble_turns' rule), else whether the record will be truncated.
    The bound: prefix tokens + image tokens + the text's UTF-8 bytes + two per piece (SentencePiece's leading "▁"
    and the eos) never undercounts; only records above max_length by the bound are tokenised."""
    tokenizer = mllm.tokenizer
    bos = 0 if tokenizer.bos_token_id is None else 1
    prefix = bos + len(tokenizer(f"{SYSTEM_PROMPT} USER: ", add_special_tokens=False).input_ids)
    size = lambda text: len(text.encode("utf-8")) + 2

    def check(images, turns, where) -> bool:
        (question, answer), later = turns[0], turns[1:]
        image_tokens = mllm.num_image_tokens * len(images)
        bound = prefix + image_tokens + size(f"\n{question} ASSISTANT:") + size(answer)
        bound += sum(size(f"USER: {q} ASSISTANT:") + size(a) for q, a in later)
        if bound <= max_length:
            return False
        pieces = encode_turns(turns, tokenizer, where, image=bool(images))
        input_ids, _ = assemble_turns(*pieces, image_tokens, mllm.image_token_id, max_length, where)
        return is_truncated(input_ids, pieces, image_tokens)

    return check


def generic_length_check(mllm, max_length: int, image_folder):
    """A `length_error(record, sizes)` for records.check_images on a generic family (sizes: the record's pictures'
    (width, height) from their headers), None on LLaVA-1.5 / VILA1.5 (checked in the structural pass): why the
    record's first prompt leaves no room for an answer token within max_length (the rule of
    HFMLLM.encode_conversation, which would stop the run when the record's batch loads), or None. A bound settles
    almost every record without opening its pictures: the prompt of a one-letter question with a picture of that
    size (HFMLLM.image_tokens; measured once per template), plus the question's UTF-8 bytes (a token of a
    byte-level BPE, or of a SentencePiece with byte fallback, covers at least one byte; the template's special
    tokens around the question keep its tokens apart from the template's), plus 8; a record above it, and every
    multi-image record (the template may add text between its parts), is made exactly (encode_record)."""
    if getattr(mllm, "kind", "") != "hf":
        return None
    folder = Path(image_folder)
    probe = Image.new("RGB", (64, 64))
    frame = {n: len(mllm.processed_prompt(mllm.render([("Q", None)], n), [probe] * n)["input_ids"])
             - n * mllm.image_tokens(*probe.size) - 1 for n in (0, 1)}

    def length_error(record, sizes) -> str | None:
        where = records.record_where(record)
        try:
            if len(sizes) < 2:
                question = record["turns"][0][0]
                pictures = sum(mllm.image_tokens(*size) for size in sizes)
                if pictures + frame[len(sizes)] + len(question.encode("utf-8")) + 8 < max_length:
                    return None
            encode_stored(record, folder, mllm, max_length)
        except DataError as error:
            return str(error) if str(error).startswith(where) else f"{where}: {error}"
        return None

    return length_error


def collate_loaded(mllm):
    """The DataLoader's collate: the model's batch, plus why any item was skipped (`skipped`: list of str)."""

    def collate(items: list[dict]) -> dict:
        batch = mllm.collate(items)
        batch["skipped"] = [item["skipped"] for item in items if "skipped" in item]
        return batch

    return collate


def batch_loader(dataset: LazySamples, micro_batches: list[list[int]], mllm, num_workers: int = 0):
    """Iterate one epoch's micro-batches (index lists, padding indices negative) as collated batches. A record that
    fails in a worker process is raised here as the one-line error the worker raised (the DataLoader wraps it in
    the worker's traceback), so train.py names it as it would without workers."""
    # Its own generator: each iterator draws its workers' base seed from it, not from the global torch RNG that
    # training draws from (--lora-dropout) and a checkpoint restores, so a resumed epoch draws as the straight run.
    batches = torch.utils.data.DataLoader(dataset, batch_sampler=micro_batches, collate_fn=collate_loaded(mllm),
                                          num_workers=num_workers, prefetch_factor=2 if num_workers else None,
                                          persistent_workers=False, generator=torch.Generator().manual_seed(0))
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (DataError, FileNotFoundError) as error:
            text = str(error)
            if "Original Traceback" not in text:
                raise
            last = text.strip().splitlines()[-1]  # "data.DataError: <the worker's message>"
            raise type(error)(last.split(": ", 1)[-1]) from None
        yield batch
